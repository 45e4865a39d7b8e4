"""The DiT family: diffusers' ``WanTransformer3DModel`` as a portrait denoiser (reference concat + audio blocks)."""

from __future__ import annotations

from typing import Optional

import torch

from prefalign.denoisers.audio import AudioEncoder
from prefalign.denoisers.base import CheckpointWithConditions, PortraitDenoiser
from prefalign.denoisers.codecs import Codec


#: Image tokens Wan I2V's CLIP image context has (ViT-H/14: 256 patches + class token) and text tokens it expects.
I2V_IMAGE_TOKENS, I2V_TEXT_TOKENS = 257, 512


class WanDenoiser(PortraitDenoiser):
    """A Wan DiT (``WanTransformer3DModel``) with a reference image, speech and (optionally) a skeleton.

    The reference enters the way the backbone's input channels say (``C`` = the codec's latent channels):

    - ``2C`` (our layout, built from a config): noisy latents with the reference latent concatenated on channels
      at every latent frame;
    - ``2C + r`` (Wan2.1 I2V checkpoints, ``r`` = temporal ratio): Wan's own image-to-video input: noisy latents,
      a frame mask of ``r`` channels, and the latents of the reference followed by grey frames. Its CLIP image
      context is fed as a fixed all-zero context, like the text: identity comes through the channels;
    - ``C`` (Wan2.1 T2V checkpoints): the patch embedding is widened to ``2C`` with zero weights for the new
      reference channels, so the pretrained prediction is unchanged, and our layout is used.

    Speech enters through per-block audio cross-attention, the skeleton through temporal motion modulation on the
    patch embedding (see ``PortraitDenoiser``). Text is not used: the text context is a fixed all-zero sequence.

    Args:
        codec (Codec): pixels ↔ latents; the transformer's channels follow from it.
        audio_encoder (AudioEncoder | None): speech features per video frame.
        pretrained (str | None): Hub id or local folder of a diffusers Wan checkpoint (``from_pretrained``), e.g.
            ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` or ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``.
        subfolder (str | None): the transformer's subfolder inside ``pretrained``.
        config (dict | None): ``WanTransformer3DModel`` arguments to build a model from scratch (demo, tests);
            ``out_channels`` is set from the codec and ``in_channels`` to ``2C`` unless given as ``2C + r``.
        torch_dtype (str): weights' dtype (``float32``, ``bfloat16``).
        variant (str | None): weights variant to load, e.g. ``fp16``.
        text_tokens (int): length of the all-zero text context (I2V checkpoints need Wan's 512).
        gradient_checkpointing (bool): recompute blocks in backward to save memory.
        fps, audio_window, audio_heads, train_audio_encoder, pooled_audio_token, pose_keypoints, pose_sigma:
            see ``PortraitDenoiser``.
    """

    # Self-attention and feed-forward of every block. Not the cross-attention (attn2): its context (text, CLIP
    # image) is a constant here, so adapters there would get no gradient or act as a mere bias.
    default_lora_targets = (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2",
    )  # fmt: skip

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
        pooled_audio_token: bool = False,
        pose_keypoints: Optional[int] = None,
        pose_sigma: float = 1.0,
    ):
        super().__init__(
            codec, audio_encoder, fps, audio_window, audio_heads, train_audio_encoder, pooled_audio_token,
            pose_keypoints, pose_sigma,
        )  # fmt: skip
        from diffusers import WanTransformer3DModel

        if (pretrained is None) == (config is None):
            raise ValueError("WanDenoiser needs exactly one of `pretrained` (a Hub id or folder) or `config`")
        c, r = codec.latent_channels, codec.temporal_ratio
        self.pretrained = pretrained  # recorded in checkpoints and model cards
        if pretrained is not None:
            self.backbone = WanTransformer3DModel.from_pretrained(
                pretrained, subfolder=subfolder, torch_dtype=getattr(torch, torch_dtype), variant=variant
            ).train()  # from_pretrained returns eval mode; the module's mode is Lightning's to set
        else:
            config = {"in_channels": 2 * c, **config, "out_channels": c}
            self.backbone = WanTransformer3DModel(**config)
            if torch_dtype != "float32":
                self.backbone.to(getattr(torch, torch_dtype))
        cfg = self.backbone.config
        if cfg.out_channels != c:
            raise ValueError(f"the Wan transformer predicts {cfg.out_channels} channels but the codec's latents have {c}")
        self.widened = cfg.in_channels == c
        if self.widened:
            widen_input(self.backbone, 2 * c)
            cfg = self.backbone.config
        if cfg.in_channels not in (2 * c, 2 * c + r):
            raise ValueError(
                f"the Wan transformer takes {cfg.in_channels} input channels; with {c}-channel latents it must be "
                f"{c} (T2V, widened), {2 * c} (reference concat) or {2 * c + r} (Wan I2V)"
            )
        self.layout = "i2v" if cfg.in_channels == 2 * c + r else "concat"
        if cfg.added_kv_proj_dim is not None:
            text_tokens = I2V_TEXT_TOKENS  # Wan's attention splits the context as [image tokens, 512 text tokens]
        self.register_buffer("text", torch.zeros(1, text_tokens, cfg.text_dim), persistent=False)
        image = torch.zeros(1, I2V_IMAGE_TOKENS, cfg.image_dim) if cfg.image_dim is not None else None
        self.register_buffer("image_context", image, persistent=False)
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.attach_audio([dim] * len(self.backbone.blocks), list(self.backbone.blocks))
        self.attach_motion(dim, cfg.patch_size[1], self.backbone.patch_embedding)
        if gradient_checkpointing:
            self.backbone.enable_gradient_checkpointing(CheckpointWithConditions(self))

    def new_modules(self) -> dict[str, torch.nn.Module]:
        modules = super().new_modules()
        if self.widened:  # its reference channels are new: trained in full alongside LoRA
            modules["backbone.patch_embedding"] = self.backbone.patch_embedding
        return modules

    def encode_reference(self, reference: torch.Tensor, num_frames: int) -> torch.Tensor:
        if self.layout == "concat":
            return super().encode_reference(reference, num_frames)
        # Wan I2V: the reference as the first frame of an otherwise grey video, encoded as one clip.
        grey = reference.new_full((reference.shape[0], num_frames - 1, *reference.shape[1:]), 0.5)
        return self.codec.encode(torch.cat([reference[:, None], grey], dim=1))

    def backbone_forward(self, noisy_latents: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        b, _, f = noisy_latents.shape[:3]
        reference = cond["reference"].to(noisy_latents.dtype)
        if self.layout == "concat":
            x = torch.cat([noisy_latents, reference.expand(-1, -1, f, -1, -1)], dim=1)
        else:
            mask = torch.zeros_like(noisy_latents[:, : self.codec.temporal_ratio])
            mask[:, :, 0] = 1  # the first frame is given
            x = torch.cat([noisy_latents, mask, reference], dim=1)
        text = cond.get("text", self.text).to(x.dtype).expand(b, -1, -1)
        image = None if self.image_context is None else self.image_context.to(x.dtype).expand(b, -1, -1)
        return self.backbone(x, t, text, encoder_hidden_states_image=image, return_dict=False)[0]


def widen_input(backbone, in_channels: int) -> None:
    """Give a Wan transformer's patch embedding ``in_channels`` inputs; the new ones get zero weights, so the
    prediction is unchanged (T2V → reference concat)."""
    old = backbone.patch_embedding
    new = torch.nn.Conv3d(
        in_channels, old.out_channels, old.kernel_size, old.stride, device=old.weight.device, dtype=old.weight.dtype
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    backbone.patch_embedding = new
    backbone.register_to_config(in_channels=in_channels)
