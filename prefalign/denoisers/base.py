"""The PortraitDenoiser contract: a diffusers video backbone plus what the portrait papers add to it."""

from __future__ import annotations

from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn

from prefalign.data.errors import DataError
from prefalign.denoisers.audio import AudioConditioning, AudioEncoder
from prefalign.denoisers.codecs import Codec


class PortraitDenoiser(nn.Module):
    """``forward(noisy_latents, t, cond) -> prediction`` for a reference image, speech and (later) a skeleton.

    A subclass builds ``self.backbone`` (a diffusers model) and calls :meth:`attach_audio` once it
    knows the backbone's width and blocks. The denoiser owns the codec and the audio encoder, and the
    conditioning modules it adds to the backbone start at zero output, so a pretrained backbone's
    prediction is unchanged until they learn.

    Args:
        codec (Codec): pixels ↔ latents (``PixelCodec`` for the demo, ``WanVAECodec`` for real weights).
        audio_encoder (AudioEncoder | None): speech features per video frame; ``None`` trains without audio.
        fps (float): video frame rate the audio is aligned to.
        audio_window (int): video frames of audio each frame attends to (odd).
        audio_heads (int): heads of the per-block audio cross-attention.
        train_audio_encoder (bool): train the audio encoder's weights too (it is frozen otherwise).
    """

    backbone: nn.Module
    audio_conditioning: Optional[AudioConditioning]
    #: Module names that LoRA adapts by default in this backbone family.
    default_lora_targets: tuple[str, ...] = ()

    def __init__(
        self,
        codec: Codec,
        audio_encoder: Optional[AudioEncoder] = None,
        fps: float = 25.0,
        audio_window: int = 5,
        audio_heads: int = 4,
        train_audio_encoder: bool = False,
    ):
        super().__init__()
        self.codec = codec.requires_grad_(False)
        self.audio_encoder = audio_encoder
        if audio_encoder is not None and not train_audio_encoder:
            audio_encoder.requires_grad_(False)
        self.fps = fps
        self.audio_window = audio_window
        self.audio_heads = audio_heads
        self.audio_conditioning = None
        self._audio_tokens: Optional[torch.Tensor] = None

    # --- building -------------------------------------------------------------------------------------------------
    def attach_audio(self, dim: int, blocks: nn.ModuleList) -> None:
        """Add a zero-initialised audio cross-attention after every block, as a forward hook (state dict keys of
        the backbone stay those of diffusers, so ``from_pretrained`` and LoRA target names are untouched)."""
        if self.audio_encoder is None:
            return
        self.audio_conditioning = AudioConditioning(
            feature_dim=self.audio_encoder.feature_dim,
            num_levels=self.audio_encoder.num_levels,
            dim=dim,
            num_blocks=len(blocks),
            heads=self.audio_heads,
            window=self.audio_window,
            temporal_ratio=self.codec.temporal_ratio,
        )
        for index, block in enumerate(blocks):
            block.register_forward_hook(_AudioHook(self, index))

    def new_modules(self) -> dict[str, nn.Module]:
        """The conditioning modules this denoiser adds to its backbone (trained alongside LoRA or full weights)."""
        return {"audio_conditioning": self.audio_conditioning} if self.audio_conditioning is not None else {}

    # --- pixels, latents and conditions ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, H, W]`` in [0, 1] → latents ``[B, C, F, h, w]``."""
        return self.codec.encode(video)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        h, w = self.codec.latent_size(height, width)
        return self.codec.latent_channels, self.codec.num_latent_frames(num_frames), h, w

    def condition(self, batch: dict, num_frames: Optional[int] = None) -> dict:
        """The model's conditions from a batch: the reference latent and the audio features.

        ``num_frames`` defaults to the batch's video length; prediction batches without video give it.
        """
        reference = batch.get("reference")
        if reference is None:
            raise DataError("the denoiser needs a reference image (or a video whose first frame serves)", field="reference")
        if num_frames is None:
            if "video" not in batch:
                raise DataError("number of frames unknown: give a video or the frame count", field="video")
            num_frames = batch["video"].shape[1]
        self.codec.num_latent_frames(num_frames)
        cond = {"reference": self.codec.encode(reference[:, None]), "num_frames": num_frames}
        if self.audio_encoder is not None:
            if batch.get("audio") is None:
                raise DataError("this denoiser is audio-conditioned but the batch has no audio", field="audio")
            cond["audio"] = self.audio_encoder(batch["audio"], num_frames, self.fps)
        return cond

    @staticmethod
    def drop_conditions(cond: dict, keep: torch.Tensor) -> dict:
        """Zero the audio of samples where ``keep`` is False (classifier-free guidance's unconditional branch)."""
        if "audio" not in cond:
            return cond
        mask = keep.to(cond["audio"].dtype).view(-1, *([1] * (cond["audio"].dim() - 1)))
        return {**cond, "audio": cond["audio"] * mask}

    # --- prediction -------------------------------------------------------------------------------------------------
    def forward(self, noisy_latents: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """Predict the process's target for ``noisy_latents [B, C, F, h, w]`` at model time ``t [B]``."""
        tokens = None
        if self.audio_conditioning is not None and "audio" in cond:
            tokens = self.audio_conditioning.tokens(cond["audio"].to(noisy_latents.dtype))
        reference = cond["reference"].to(noisy_latents.dtype).expand(-1, -1, noisy_latents.shape[2], -1, -1)
        self._audio_tokens = tokens
        try:
            return self.backbone_forward(torch.cat([noisy_latents, reference], dim=1), t, cond)
        finally:
            self._audio_tokens = None

    def backbone_forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError


class _AudioHook:
    """Forward hook on backbone block ``index``: adds the audio cross-attention to the block's output.

    A callable object rather than a closure, so that ``copy.deepcopy`` of a denoiser (the frozen reference
    under full fine-tuning) gives hooks that point at the copy, not at the original.
    """

    def __init__(self, owner: PortraitDenoiser, index: int):
        self.owner = owner
        self.index = index

    def __call__(self, module, args, output):
        tokens = self.owner._audio_tokens
        if tokens is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = self.owner.audio_conditioning.inject(self.index, hidden, tokens)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class CheckpointWithConditions:
    """Gradient checkpointing for backbone blocks that also carries the per-forward audio tokens.

    Block hooks read the tokens from the denoiser; checkpointing recomputes a block in backward, when the
    denoiser may hold another call's tokens (or none). Passing them as an explicit checkpoint input makes the
    recomputation see exactly the tokens of its own forward. Given to diffusers' ``enable_gradient_checkpointing``.
    """

    def __init__(self, owner: PortraitDenoiser):
        self.owner = owner

    def __call__(self, block: nn.Module, *args):
        return torch.utils.checkpoint.checkpoint(self._run, block, self.owner._audio_tokens, *args, use_reentrant=False)

    def _run(self, block: nn.Module, tokens: Optional[torch.Tensor], *args):
        saved = self.owner._audio_tokens
        self.owner._audio_tokens = tokens
        try:
            return block(*args)
        finally:
            self.owner._audio_tokens = saved
