"""Skeleton conditioning by temporal motion modulation (Hallo4).

Pose comes per video frame, but a latent frame stands for ``r`` video frames (the codec's temporal ratio).
Hallo4 keeps every frame's motion: each frame's keypoint maps are patchified to ``dim / r`` channels on the
backbone's token grid, the ``r`` frames of a latent frame are stacked along channels into one ``dim``-sized
token, and a zero-initialised projection adds it to the patch tokens. The first frame fills its latent frame
on its own (replicated ``r`` times), as a causal video VAE encodes it.
"""

from __future__ import annotations

import torch
from torch import nn

from prefalign.data.errors import DataError


def render_keypoints(pose: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Gaussian maps of keypoints: ``[B, T, K, 2]`` (x, y in [0, 1] of the frame) → ``[B, T, K, height, width]``.

    ``sigma`` is in pixels of the map. Keypoints outside the frame give (nearly) empty maps.
    """
    xs = (torch.arange(width, device=pose.device, dtype=torch.float32) + 0.5) / width
    ys = (torch.arange(height, device=pose.device, dtype=torch.float32) + 0.5) / height
    p = pose.float()
    dx = (xs - p[..., 0:1]) * width  # [B, T, K, W] in map pixels
    dy = (ys - p[..., 1:2]) * height  # [B, T, K, H]
    return torch.exp(-(dy[..., :, None] ** 2 + dx[..., None, :] ** 2) / (2 * sigma**2))


class MotionModulation(nn.Module):
    """Pose per video frame → motion tokens ``[B, dim, F, h, w]`` aligned with the backbone's patch tokens.

    Args:
        num_keypoints (int): keypoints per frame ``K`` (8 in TalkingShapes).
        dim (int): the channels of the tokens it adds to (a DiT's hidden size, a UNet's first block width).
        temporal_ratio (int): ``r``, video frames per latent frame (4 for Wan's VAE, 1 for a per-frame VAE).
        stride (int): pixels per token along each side (the codec's spatial ratio times the patch size).
        render_scale (int): keypoint maps are rendered at this many map pixels per token side, then patchified.
        sigma (float): keypoint blob radius in map pixels.
    """

    def __init__(
        self, num_keypoints: int, dim: int, temporal_ratio: int, stride: int, render_scale: int = 4, sigma: float = 1.0
    ):
        super().__init__()
        if dim % temporal_ratio:
            raise ValueError(f"motion modulation: dim {dim} is not divisible by the temporal ratio {temporal_ratio}")
        self.num_keypoints = num_keypoints
        self.temporal_ratio = temporal_ratio
        self.stride = stride
        self.render_scale = render_scale
        self.sigma = sigma
        q = render_scale
        self.patchify = nn.Sequential(
            nn.Conv2d(num_keypoints, dim // temporal_ratio, kernel_size=q, stride=q),
            nn.SiLU(),
            nn.Conv2d(dim // temporal_ratio, dim // temporal_ratio, kernel_size=1),
        )
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def frame_tokens(self, pose: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, T, K, 2]`` → per-frame features ``[B, T, dim/r, h, w]`` on the token grid of a ``height×width`` video."""
        b, t, k, _ = pose.shape
        if k != self.num_keypoints:
            raise DataError(f"pose has {k} keypoints per frame, the motion module takes {self.num_keypoints}", field="pose")
        if height % self.stride or width % self.stride:
            raise DataError(f"frame size {height}x{width} is not divisible by the token stride {self.stride}", field="pose")
        q = self.render_scale
        h, w = height // self.stride * q, width // self.stride * q
        maps = render_keypoints(pose, h, w, self.sigma).to(self.proj.weight.dtype)
        return self.patchify(maps.flatten(0, 1)).unflatten(0, (b, t))

    def forward(self, pose: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, T, K, 2]`` with ``T = r·n + 1`` → motion tokens ``[B, dim, F, h, w]`` with ``F = n + 1``."""
        b, t = pose.shape[:2]
        r = self.temporal_ratio
        if (t - 1) % r:
            raise DataError(f"pose has {t} frames; this codec takes {r}·n+1", field="pose")
        frames = self.frame_tokens(pose, height, width)  # [B, T, c, h, w]
        frames = torch.cat([frames[:, :1].expand(b, r - 1, *frames.shape[2:]), frames], dim=1)
        stacked = frames.unflatten(1, (-1, r)).flatten(2, 3)  # [B, F, r·c = dim, h, w]: r frames on channels
        tokens = self.proj(stacked.movedim(2, -1)).movedim(-1, 1)  # [B, dim, F, h, w]
        return tokens
