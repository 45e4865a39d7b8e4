"""The DiT family: diffusers' ``WanTransformer3DModel`` as a portrait denoiser (reference concat + audio blocks)."""

from __future__ import annotations

from typing import Optional

import torch

from prefalign.denoisers.audio import AudioEncoder
from prefalign.denoisers.base import CheckpointWithConditions, PortraitDenoiser
from prefalign.denoisers.codecs import Codec


class WanDenoiser(PortraitDenoiser):
    """A Wan DiT (``WanTransformer3DModel``) that sees the noisy latents with the reference latent concatenated
    on channels (image-to-video style) and speech through per-block audio cross-attention.

    Args:
        codec (Codec): pixels ↔ latents; the transformer's channels follow from it.
        audio_encoder (AudioEncoder | None): speech features per video frame.
        pretrained (str | None): Hub id or local folder of a diffusers Wan checkpoint (``from_pretrained``).
        subfolder (str | None): the transformer's subfolder inside ``pretrained``.
        config (dict | None): ``WanTransformer3DModel`` arguments to build a model from scratch (demo, tests);
            ``in_channels`` and ``out_channels`` are set from the codec.
        torch_dtype (str): weights' dtype when loading (``float32``, ``bfloat16``).
        variant (str | None): weights variant to load, e.g. ``fp16``.
        text_tokens (int): length of the fixed (all-zero) text context fed to Wan's text cross-attention;
            portraits are driven by speech, not prompts.
        gradient_checkpointing (bool): recompute blocks in backward to save memory.
        fps, audio_window, audio_heads, train_audio_encoder: see ``PortraitDenoiser``.
    """

    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")

    def __init__(
        self,
        codec: Codec,
        audio_encoder: Optional[AudioEncoder] = None,
        pretrained: Optional[str] = None,
        subfolder: Optional[str] = "transformer",
        config: Optional[dict] = None,
        torch_dtype: str = "float32",
        variant: Optional[str] = None,
        text_tokens: int = 1,
        gradient_checkpointing: bool = False,
        fps: float = 25.0,
        audio_window: int = 5,
        audio_heads: int = 4,
        train_audio_encoder: bool = False,
    ):
        super().__init__(codec, audio_encoder, fps, audio_window, audio_heads, train_audio_encoder)
        from diffusers import WanTransformer3DModel

        if (pretrained is None) == (config is None):
            raise ValueError("WanDenoiser needs exactly one of `pretrained` (a Hub id or folder) or `config`")
        channels = {"in_channels": 2 * codec.latent_channels, "out_channels": codec.latent_channels}
        if pretrained is not None:
            self.backbone = WanTransformer3DModel.from_pretrained(
                pretrained, subfolder=subfolder, torch_dtype=getattr(torch, torch_dtype), variant=variant
            )
        else:
            for key, value in channels.items():
                if config.get(key, value) != value:
                    raise ValueError(f"WanDenoiser config: {key}={config[key]} but the codec needs {value}")
            self.backbone = WanTransformer3DModel(**{**config, **channels})
        found = {key: self.backbone.config[key] for key in channels}
        if found != channels:
            raise ValueError(
                f"the Wan transformer has {found} but the codec with reference concat needs {channels}"
            )
        cfg = self.backbone.config
        self.register_buffer("text", torch.zeros(1, text_tokens, cfg.text_dim), persistent=False)
        self.attach_audio(cfg.num_attention_heads * cfg.attention_head_dim, self.backbone.blocks)
        if gradient_checkpointing:
            self.backbone.enable_gradient_checkpointing(CheckpointWithConditions(self))

    def backbone_forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        text = cond.get("text", self.text).to(x.dtype).expand(x.shape[0], -1, -1)
        return self.backbone(x, t, text, return_dict=False)[0]
