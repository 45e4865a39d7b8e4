"""The UNet family: diffusers' ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion) as a portrait denoiser."""

from __future__ import annotations

from typing import Optional

import torch

from prefalign.denoisers.audio import AudioEncoder
from prefalign.denoisers.base import CheckpointWithConditions, PortraitDenoiser
from prefalign.denoisers.codecs import Codec, SVDVAECodec


class SVDDenoiser(PortraitDenoiser):
    """A Stable Video Diffusion UNet (``UNetSpatioTemporalConditionModel``) with a reference image, speech and
    (optionally) a skeleton.

    The reference enters as SVD's own image conditioning: the UNet takes ``2C`` channels (``C`` = the codec's
    latent channels), the noisy latents with the reference latent concatenated on every frame. SVD's CLIP image
    context is fed as a fixed all-zero context (identity comes through the channels), and its ``added_time_ids``
    are the constants ``(fps − 1, motion_bucket_id, noise_aug_strength)``; the reference image is not noise
    augmented, ``noise_aug_strength`` only tells the model which level to expect.

    Speech enters through an audio cross-attention after every spatio-temporal transformer of the down, mid and
    up blocks (widths per resolution), the skeleton through temporal motion modulation on ``conv_in`` (see
    ``PortraitDenoiser``). The UNet folds frames into the batch, so both are laid out per frame.

    Time: the process's model time goes in as the UNet's ``timestep`` unchanged. The released SVD checkpoints
    were trained with EDM preconditioning (continuous sigma, ``c_noise = log(σ)/4`` as timestep, v-prediction);
    no EDM wrapper is applied here: the recipes pair this denoiser with the ``Diffusion`` process with
    ``prediction: v``, and fine-tuning adapts the time embedding to its discrete timesteps.

    Args:
        codec (Codec): pixels ↔ latents; the UNet's channels follow from it (``SVDVAECodec`` for real weights).
        audio_encoder (AudioEncoder | None): speech features per video frame.
        pretrained (str | None): Hub id or local folder of a diffusers SVD checkpoint (``from_pretrained``), e.g.
            ``stabilityai/stable-video-diffusion-img2vid-xt``.
        subfolder (str | None): the UNet's subfolder inside ``pretrained``.
        config (dict | None): ``UNetSpatioTemporalConditionModel`` arguments to build a model from scratch (demo,
            tests); ``in_channels`` and ``out_channels`` default to ``2C`` and ``C``.
        torch_dtype (str): weights' dtype (``float32``, ``bfloat16``).
        variant (str | None): weights variant to load, e.g. ``fp16``.
        motion_bucket_id (float): SVD's motion conditioning (higher: more motion).
        noise_aug_strength (float): the reference's noise level SVD is told (its added time id).
        reference_scale (float | None): factor on the reference latent before the concat. SVD was trained on the
            VAE's unscaled latent of the image while the codec's latents are scaled, so ``None`` gives
            ``1 / scaling_factor`` with ``SVDVAECodec`` and 1 with other codecs.
        gradient_checkpointing (bool): recompute blocks in backward to save memory.
        fps, audio_window, audio_heads, train_audio_encoder, pooled_audio_token, pose_keypoints, pose_sigma:
            see ``PortraitDenoiser``; ``fps`` is also SVD's frame-rate condition.
    """

    # Self-attention and feed-forwards of the spatial and temporal transformer blocks. Not the cross-attention
    # (attn2): its context is all zeros, so it outputs a constant and adapters there would get no gradient.
    default_lora_targets = (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "ff.net.0.proj", "ff.net.2", "ff_in.net.0.proj", "ff_in.net.2",
    )  # fmt: skip

    def __init__(
        self,
        codec: Codec,
        audio_encoder: Optional[AudioEncoder] = None,
        pretrained: Optional[str] = None,
        subfolder: Optional[str] = "unet",
        config: Optional[dict] = None,
        torch_dtype: str = "float32",
        variant: Optional[str] = None,
        motion_bucket_id: float = 127.0,
        noise_aug_strength: float = 0.02,
        reference_scale: Optional[float] = None,
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
        from diffusers import UNetSpatioTemporalConditionModel
        from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

        if (pretrained is None) == (config is None):
            raise ValueError("SVDDenoiser needs exactly one of `pretrained` (a Hub id or folder) or `config`")
        c, dtype = codec.latent_channels, getattr(torch, torch_dtype)
        self.pretrained = pretrained  # recorded in checkpoints and model cards
        if pretrained is not None:
            self.backbone = UNetSpatioTemporalConditionModel.from_pretrained(
                pretrained, subfolder=subfolder, torch_dtype=dtype, variant=variant
            ).train()  # from_pretrained returns eval mode; the module's mode is Lightning's to set
        else:
            config = {"in_channels": 2 * c, "out_channels": c, **config}
            self.backbone = UNetSpatioTemporalConditionModel(**config)
            if dtype != torch.float32:  # diffusers warns on any cast of a built model
                self.backbone.to(dtype)
        cfg = self.backbone.config
        if cfg.out_channels != c:
            raise ValueError(f"the SVD UNet predicts {cfg.out_channels} channels but the codec's latents have {c}")
        if cfg.in_channels != 2 * c:
            raise ValueError(
                f"the SVD UNet takes {cfg.in_channels} input channels; with {c}-channel latents it must be {2 * c} "
                "(noisy latents and the reference latent, SVD's image conditioning)"
            )
        if cfg.projection_class_embeddings_input_dim != 3 * cfg.addition_time_embed_dim:
            raise ValueError(
                f"the SVD UNet embeds {cfg.projection_class_embeddings_input_dim} features of added time ids; "
                f"SVD's three (fps, motion bucket, noise augmentation) give 3 × {cfg.addition_time_embed_dim}"
            )
        context_dims = cfg.cross_attention_dim
        context_dims = {context_dims} if isinstance(context_dims, int) else set(context_dims)
        if len(context_dims) != 1:
            raise ValueError(f"the SVD UNet's blocks take one shared context; got cross_attention_dim {context_dims}")
        if reference_scale is None:
            reference_scale = 1 / codec.scaling_factor if isinstance(codec, SVDVAECodec) else 1.0
        self.reference_scale = reference_scale
        self.register_buffer("image_context", torch.zeros(1, 1, context_dims.pop()), persistent=False)
        time_ids = torch.tensor([[fps - 1, motion_bucket_id, noise_aug_strength]])  # SVD is told fps − 1
        self.register_buffer("time_ids", time_ids, persistent=False)

        unet = self.backbone
        blocks = [
            module
            for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks)  # forward order
            for module in block.modules()
            if isinstance(module, TransformerSpatioTemporalModel)
        ]
        self.attach_audio([block.in_channels for block in blocks], blocks)
        self.attach_motion(cfg.block_out_channels[0], 1, unet.conv_in)
        if gradient_checkpointing:
            # diffusers checkpoints the resnets and spatial transformer blocks, not the hooked transformers as a
            # whole; the conditions-carrying checkpoint keeps the hooks right should a hooked module be recomputed.
            unet.enable_gradient_checkpointing(CheckpointWithConditions(self))

    def encode_reference(self, reference: torch.Tensor, num_frames: int) -> torch.Tensor:
        return super().encode_reference(reference, num_frames) * self.reference_scale

    def inject_audio(self, index: int, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The UNet's hidden states are ``[B·F, C, h, w]``: regrouped to ``[B, F, h·w, C]`` for the attention."""
        b, f = tokens.shape[:2]
        n, c, h, w = hidden.shape
        if n != b * f:
            raise ValueError(f"audio tokens for {b}×{f} frames but the UNet block holds {n} frames")
        grouped = hidden.reshape(b, f, c, h * w).transpose(2, 3)
        out = self.audio_conditioning.inject(index, grouped, tokens)
        return out.transpose(2, 3).reshape(n, c, h, w)

    def add_motion(self, embedded: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """Motion tokens ``[B, dim, F, h, w]`` added to ``conv_in``'s output ``[B·F, dim, h, w]``."""
        return embedded + motion.transpose(1, 2).flatten(0, 1).to(embedded.dtype)

    def backbone_forward(self, noisy_latents: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        b, _, f = noisy_latents.shape[:3]
        reference = cond["reference"].to(noisy_latents.dtype)
        x = torch.cat([noisy_latents, reference.expand(-1, -1, f, -1, -1)], dim=1).transpose(1, 2)  # [B, F, 2C, h, w]
        context = self.image_context.to(x.dtype).expand(b, -1, -1)
        time_ids = self.time_ids.to(x.dtype).expand(b, -1)
        out = self.backbone(x, t, context, time_ids, return_dict=False)[0]
        return out.transpose(1, 2)  # [B, C, F, h, w]
