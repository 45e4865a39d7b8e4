"""The PortraitDenoiser contract: a diffusers video backbone plus what the portrait papers add to it."""

from __future__ import annotations

from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn

from prefalign.data.errors import DataError
from prefalign.denoisers.audio import AudioConditioning, AudioEncoder
from prefalign.denoisers.codecs import Codec
from prefalign.denoisers.motion import MotionModulation


class PortraitDenoiser(nn.Module):
    """``forward(noisy_latents, t, cond) -> prediction`` for a reference image, speech and a skeleton.

    A subclass builds ``self.backbone`` (a diffusers model) and calls :meth:`attach_audio` and
    :meth:`attach_motion` once it knows the backbone's widths and modules. The denoiser owns the codec and
    the audio encoder, and the conditioning modules it adds to the backbone start at zero output, so a
    pretrained backbone's prediction is unchanged until they learn. The modules are attached as forward
    hooks: the backbone's state dict keys stay diffusers', so ``from_pretrained`` and LoRA target names
    are untouched.

    Args:
        codec (Codec): pixels ↔ latents (``PixelCodec`` for the demo, ``WanVAECodec`` for real weights).
        audio_encoder (AudioEncoder | None): speech features per video frame; ``None`` trains without audio.
        fps (float): video frame rate the audio is aligned to.
        audio_window (int): video frames of audio each frame attends to (odd).
        audio_heads (int): heads of the per-block audio cross-attention.
        train_audio_encoder (bool): train the audio encoder's weights too (it is frozen otherwise).
        pooled_audio_token (bool): give every latent frame a clip-level pooled (prosodic) audio token besides
            its local windows (ReFree-S2V's multi-level speech).
        pose_keypoints (int | None): keypoints per frame of the skeleton track (8 in TalkingShapes); enables
            temporal motion modulation (Hallo4) and makes ``pose`` a required input. ``None``: no skeleton.
        pose_sigma (float): keypoint blob radius in render pixels (see ``MotionModulation``).
    """

    backbone: nn.Module
    audio_conditioning: Optional[AudioConditioning]
    motion: Optional[MotionModulation]
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
        pooled_audio_token: bool = False,
        pose_keypoints: Optional[int] = None,
        pose_sigma: float = 1.0,
    ):
        super().__init__()
        self.codec = codec.requires_grad_(False)
        self.audio_encoder = audio_encoder
        if audio_encoder is not None and not train_audio_encoder:
            audio_encoder.requires_grad_(False)
        self.fps = fps
        self.audio_window = audio_window
        self.audio_heads = audio_heads
        self.pooled_audio_token = pooled_audio_token
        self.pose_keypoints = pose_keypoints
        self.pose_sigma = pose_sigma
        self.audio_conditioning = None
        self.motion = None
        self._audio_tokens: Optional[torch.Tensor] = None
        self._motion_tokens: Optional[torch.Tensor] = None

    # --- building -------------------------------------------------------------------------------------------------
    def attach_audio(self, dims: list[int], blocks: list[nn.Module]) -> None:
        """Add a zero-initialised audio cross-attention after each of ``blocks`` (of hidden sizes ``dims``)."""
        if self.audio_encoder is None:
            return
        self.audio_conditioning = AudioConditioning(
            feature_dim=self.audio_encoder.feature_dim,
            num_levels=self.audio_encoder.num_levels,
            dims=list(dims),
            heads=self.audio_heads,
            window=self.audio_window,
            temporal_ratio=self.codec.temporal_ratio,
            pooled_token=self.pooled_audio_token,
        )
        for index, block in enumerate(blocks):
            block.register_forward_hook(_AudioHook(self, index))

    def attach_motion(self, dim: int, patch_size: int, embedding: nn.Module) -> None:
        """Add temporal motion modulation to the output of ``embedding`` (the backbone's patch embedding, whose
        tokens have ``dim`` channels and cover ``patch_size`` latent pixels per side)."""
        if self.pose_keypoints is None:
            return
        self.motion = MotionModulation(
            num_keypoints=self.pose_keypoints,
            dim=dim,
            temporal_ratio=self.codec.temporal_ratio,
            stride=self.codec.spatial_ratio * patch_size,
            sigma=self.pose_sigma,
        )
        embedding.register_forward_hook(_MotionHook(self))

    def new_modules(self) -> dict[str, nn.Module]:
        """The conditioning modules this denoiser adds to its backbone (trained alongside LoRA or full weights),
        by their path in the denoiser."""
        modules = {"audio_conditioning": self.audio_conditioning, "motion": self.motion}
        return {name: module for name, module in modules.items() if module is not None}

    @property
    def required_fields(self) -> tuple[str, ...]:
        """Batch fields this denoiser's conditions are made from."""
        fields = ("reference",)
        if self.audio_encoder is not None:
            fields += ("audio",)
        if self.motion is not None:
            fields += ("pose",)
        return fields

    # --- where the hooks put what they add: the backbone family's layout -------------------------------------------
    def inject_audio(self, index: int, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s audio residual on its output; the default takes DiT tokens ``[B, F·S, dim]``."""
        b, n, d = hidden.shape
        grouped = hidden.reshape(b, tokens.shape[1], n // tokens.shape[1], d)
        return self.audio_conditioning.inject(index, grouped, tokens).reshape(b, n, d)

    def add_motion(self, embedded: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """Motion tokens ``[B, dim, F, h, w]`` added to the patch embedding's output (the default: same layout)."""
        return embedded + motion.to(embedded.dtype)

    # --- pixels, latents and conditions ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, H, W]`` in [0, 1] → latents ``[B, C, F, h, w]``."""
        return self.codec.encode(video)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    def latents(self, batch: dict, field: str = "video") -> torch.Tensor:
        """The latents of a batch's clips (``video``) or rejected clips (``rejected``): cached ones
        (``latents`` / ``rejected_latents``, from ``prefalign preprocess``) when the batch has them, else encoded."""
        cached = batch.get("latents" if field == "video" else f"{field}_latents")
        if cached is not None:
            return cached
        if field not in batch:
            raise DataError(f"the batch has neither '{field}' pixels nor cached latents", field=field)
        return self.encode_video(batch[field])

    @property
    def audio_encoder_frozen(self) -> bool:
        return self.audio_encoder is not None and not any(p.requires_grad for p in self.audio_encoder.parameters())

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        h, w = self.codec.latent_size(height, width)
        return self.codec.latent_channels, self.codec.num_latent_frames(num_frames), h, w

    def condition(self, batch: dict, num_frames: Optional[int] = None) -> dict:
        """The model's conditions from a batch: the reference latent and the audio features.

        ``num_frames`` defaults to the batch's video length, or its ``num_frames`` (prediction batches and
        cached latents). Cached ``audio_features`` replace the audio encoder while it is frozen.
        """
        reference = batch.get("reference")
        if reference is None:
            raise DataError("the denoiser needs a reference image (or a video whose first frame serves)", field="reference")
        if num_frames is None:
            num_frames = frames_of(batch)
        self.codec.num_latent_frames(num_frames)
        cond = {"reference": self.encode_reference(reference, num_frames), "num_frames": num_frames}
        if self.audio_encoder is not None:
            if batch.get("audio") is None:
                raise DataError("this denoiser is audio-conditioned but the batch has no audio", field="audio")
            features = batch.get("audio_features")
            if features is not None and self.audio_encoder_frozen and features.shape[1] == num_frames:
                cond["audio"] = features
            else:
                cond["audio"] = self.audio_encoder(batch["audio"], num_frames, self.fps)
        if self.motion is not None:
            pose = batch.get("pose")
            if pose is None:
                raise DataError("this denoiser is skeleton-conditioned (pose_keypoints) but the batch has no pose", field="pose")
            if pose.shape[1] != num_frames:
                raise DataError(f"pose has {pose.shape[1]} frames for a {num_frames}-frame video", field="pose")
            cond["pose"] = pose
        return cond

    def chunk_inputs(self, batch: dict, start: int, size: int) -> dict:
        """The conditions of frames ``[start, start + size)`` of a long clip (chunked generation): the reference,
        the audio of those frames (zero-padded past its end by the encoder) and the pose (its last frame repeated)."""
        part = {"reference": batch["reference"]}
        if self.audio_encoder is not None:
            spf = self.audio_encoder.sample_rate / self.fps  # audio samples per video frame
            part["audio"] = batch["audio"][:, round(start * spf) : round((start + size) * spf)]
        if batch.get("pose") is not None:
            pose = batch["pose"][:, start : start + size]
            part["pose"] = torch.cat([pose, pose[:, -1:].expand(-1, size - pose.shape[1], -1, -1)], dim=1)
        return part

    def encode_reference(self, reference: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The reference image ``[B, 3, H, W]`` as the latent the backbone takes (default: one latent frame)."""
        return self.codec.encode(reference[:, None])

    @staticmethod
    def drop_conditions(cond: dict, keep: torch.Tensor) -> dict:
        """Zero the audio of samples where ``keep`` is False (classifier-free guidance's unconditional branch).

        The skeleton is kept: it is a structural condition, like the reference image, not the guided one."""
        if "audio" not in cond:
            return cond
        mask = keep.to(cond["audio"].dtype).view(-1, *([1] * (cond["audio"].dim() - 1)))
        return {**cond, "audio": cond["audio"] * mask}

    # --- prediction -------------------------------------------------------------------------------------------------
    def forward(self, noisy_latents: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """Predict the process's target for ``noisy_latents [B, C, F, h, w]`` at model time ``t [B]``."""
        tokens = motion = None
        if self.audio_conditioning is not None and "audio" in cond:
            tokens = self.audio_conditioning.tokens(cond["audio"])
        if self.motion is not None and "pose" in cond:
            s = self.codec.spatial_ratio
            motion = self.motion(cond["pose"], noisy_latents.shape[-2] * s, noisy_latents.shape[-1] * s)
        self._audio_tokens, self._motion_tokens = tokens, motion
        try:
            return self.backbone_forward(noisy_latents, t, cond)
        finally:
            self._audio_tokens = self._motion_tokens = None

    def backbone_forward(self, noisy_latents: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """Run the backbone on ``noisy_latents [B, C, F, h, w]`` with the reference in the family's layout."""
        raise NotImplementedError


def frames_of(batch: dict) -> int:
    """A batch's clip length in frames: its video's, else its ``num_frames`` (conditions to animate, cached latents)."""
    if "video" in batch:
        return batch["video"].shape[1]
    if "num_frames" in batch:
        return int(batch["num_frames"][0])
    raise DataError("number of frames unknown: give a video or the frame count", field="video")


def join_chunks(chunks: list[torch.Tensor], overlap: int, num_frames: int) -> torch.Tensor:
    """Videos ``[B, T, ...]`` made chunk by chunk, each starting with the last ``overlap`` frames of the one before,
    joined into one ``num_frames`` long."""
    return torch.cat([chunks[0]] + [chunk[:, overlap:] for chunk in chunks[1:]], dim=1)[:, :num_frames]


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
        hidden = self.owner.inject_audio(self.index, hidden, tokens)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _MotionHook:
    """Forward hook on the backbone's patch embedding: adds the motion tokens of the current forward."""

    def __init__(self, owner: PortraitDenoiser):
        self.owner = owner

    def __call__(self, module, args, output):
        motion = self.owner._motion_tokens
        return output if motion is None else self.owner.add_motion(output, motion)


class CheckpointWithConditions:
    """Gradient checkpointing for backbone blocks that also carries the per-forward condition tokens.

    Block hooks read the audio and motion tokens from the denoiser; checkpointing recomputes a block in backward,
    when the denoiser may hold another call's tokens (or none). Passing them as explicit checkpoint inputs makes the
    recomputation see exactly the tokens of its own forward. Given to diffusers' ``enable_gradient_checkpointing``.
    """

    def __init__(self, owner: PortraitDenoiser):
        self.owner = owner

    def __call__(self, block: nn.Module, *args):
        owner = self.owner
        return torch.utils.checkpoint.checkpoint(
            self._run, block, owner._audio_tokens, owner._motion_tokens, *args, use_reentrant=False
        )

    def _run(self, block: nn.Module, audio: Optional[torch.Tensor], motion: Optional[torch.Tensor], *args):
        owner = self.owner
        saved = owner._audio_tokens, owner._motion_tokens
        owner._audio_tokens, owner._motion_tokens = audio, motion
        try:
            return block(*args)
        finally:
            owner._audio_tokens, owner._motion_tokens = saved
