"""TalkingShapes evaluation metrics: lip sync, jitter and identity drift as batched pure torch functions.

Videos are ``[B, T, 3, H, W]`` floats in [0, 1]; every function runs on any device and returns one value per clip.
"""

from __future__ import annotations

from fractions import Fraction

import torch

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
DARK_THRESHOLD = 0.3
"""Luminance below which a pixel counts as mouth (or eye): the world keeps everything else at >= 0.35."""


def _float_at_least_32(dtype: torch.dtype) -> torch.dtype:
    # Pixel counts and correlations lose digits in half precision (bf16 cannot even count to 257).
    return torch.promote_types(dtype, torch.float32)


def _check_video(video: torch.Tensor) -> None:
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"expected video [B, T, 3, H, W], got {tuple(video.shape)}")


def frame_envelope(audio: torch.Tensor, sample_rate: int, fps: float, num_frames: int) -> torch.Tensor:
    """RMS of the audio over each frame's span [f / fps, (f+1) / fps), as the TalkingShapes world defines it.

    Args:
        audio (torch.Tensor): ``[B, S]`` mono samples.
        sample_rate (int): in Hz.
        fps (float): video frames per second.
        num_frames (int): T; frames past the end of the audio get 0, samples past frame T are ignored.

    Returns:
        torch.Tensor: ``[B, T]``.
    """
    if audio.ndim != 2:
        raise ValueError(f"expected audio [B, S], got {tuple(audio.shape)}")
    batch, num_samples = audio.shape
    # Exact integer frame boundaries (fps as a fraction), identical to prefalign.data.synthetic.frame_index.
    rate = Fraction(fps).limit_denominator(100000)
    samples = torch.arange(num_samples, dtype=torch.int64, device=audio.device)
    index = torch.div(samples * rate.numerator, sample_rate * rate.denominator, rounding_mode="floor")
    index = index.clamp(max=num_frames)  # bucket num_frames collects the samples past the last frame
    energy = torch.zeros(batch, num_frames + 1, dtype=audio.dtype, device=audio.device)
    energy.index_add_(1, index, audio.square())
    counts = torch.zeros(num_frames + 1, dtype=audio.dtype, device=audio.device)
    counts.index_add_(0, index, torch.ones_like(index, dtype=audio.dtype))
    return (energy[:, :num_frames] / counts[:num_frames].clamp(min=1)).sqrt()


def luminance(video: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma ``0.299 R + 0.587 G + 0.114 B`` of ``[B, T, 3, H, W]`` -> ``[B, T, H, W]``."""
    _check_video(video)
    weights = torch.tensor(LUMA_WEIGHTS, dtype=video.dtype, device=video.device)
    return torch.einsum("btchw,c->bthw", video, weights)


def mouth_box(
    pose: torch.Tensor, height: int, width: int, half_width: float = 0.4, half_height: float = 0.5
) -> torch.Tensor:
    """Pixels whose centre lies in the box mouth ± (half_width·d, half_height·d), d the eye distance in pixels.

    Args:
        pose (torch.Tensor): ``[B, T, 8, 2]`` TalkingShapes keypoints in [0, 1] (eyes 1 and 2, mouth 3).

    Returns:
        torch.Tensor: ``[B, T, H, W]`` bool.
    """
    if pose.ndim != 4 or pose.shape[2] < 4 or pose.shape[3] != 2:
        raise ValueError(f"pose: the mouth box needs keypoints [B, T, K >= 4, 2] in the TalkingShapes layout (eyes 1 "
                         f"and 2, mouth 3), got shape {list(pose.shape)}")
    scale = torch.tensor([width, height], dtype=pose.dtype, device=pose.device)
    points = pose * scale  # pixel units
    eye_distance = (points[:, :, 1] - points[:, :, 2]).norm(dim=-1)
    mouth = points[:, :, 3]
    xs = torch.arange(width, dtype=pose.dtype, device=pose.device) + 0.5
    ys = torch.arange(height, dtype=pose.dtype, device=pose.device) + 0.5
    in_x = (xs.view(1, 1, 1, width) - mouth[..., 0, None, None]).abs() <= half_width * eye_distance[..., None, None]
    in_y = (ys.view(1, 1, height, 1) - mouth[..., 1, None, None]).abs() <= half_height * eye_distance[..., None, None]
    return in_x & in_y


def training_mouth_box(pose: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The box mouth ± (0.6·d, 0.8·d) that training works on (SFT's ``mouth_weight``, GRPO's ``explore: mouth``,
    ``JitterPenalty(exclude_mouth=True)``): :func:`mouth_box` with margins wide enough for the widest open mouth.
    ``[B, T, H, W]`` bool."""
    return mouth_box(pose, height, width, half_width=0.6, half_height=0.8)


def mouth_openness(
    video: torch.Tensor,
    pose: torch.Tensor | None = None,
    threshold: float = DARK_THRESHOLD,
) -> torch.Tensor:
    """Number of dark pixels per frame: the mouth is the only dark area whose size changes.

    Args:
        video (torch.Tensor): ``[B, T, 3, H, W]`` in [0, 1].
        pose (torch.Tensor | None): ``[B, T, 8, 2]`` keypoints in [0, 1]; if given, only pixels whose centre lies
            in the box mouth ± (0.4 d, 0.5 d) count, d being the eye distance in pixels.
        threshold (float): luminance below which a pixel is dark.

    Returns:
        torch.Tensor: ``[B, T]`` pixel counts (float).
    """
    dark = luminance(video) < threshold
    if pose is not None:
        batch, frames, height, width = dark.shape
        if pose.shape != (batch, frames, 8, 2):
            raise ValueError(f"expected pose [{batch}, {frames}, 8, 2], got {tuple(pose.shape)}")
        dark = dark & mouth_box(pose, height, width)
    return dark.sum(dim=(-2, -1)).to(_float_at_least_32(video.dtype))


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pearson correlation along the last dim; 0 where either side is (numerically) constant, never NaN.

    Args:
        a (torch.Tensor): ``[..., N]``.
        b (torch.Tensor): ``[..., N]``.
        eps (float): a side whose standard deviation is below ``eps`` times its largest magnitude counts as
            constant (so float rounding of a constant signal does not produce a spurious correlation).

    Returns:
        torch.Tensor: ``[...]`` in [-1, 1].
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    std_a = a.square().mean(dim=-1).sqrt()
    std_b = b.square().mean(dim=-1).sqrt()
    tiny = torch.finfo(a.dtype).tiny
    constant = (std_a <= eps * a.abs().amax(dim=-1) + tiny) | (std_b <= eps * b.abs().amax(dim=-1) + tiny)
    correlation = (a * b).mean(dim=-1) / (std_a * std_b).clamp(min=tiny)
    return torch.where(constant, torch.zeros_like(correlation), correlation.clamp(-1.0, 1.0))


def sync_score(
    video: torch.Tensor,
    audio: torch.Tensor,
    sample_rate: int,
    fps: float,
    pose: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lip sync: Pearson correlation of mouth openness with the audio envelope over frames.

    Args:
        video (torch.Tensor): ``[B, T, 3, H, W]`` in [0, 1].
        audio (torch.Tensor): ``[B, S]`` mono, starting with frame 0.
        sample_rate (int): audio rate in Hz.
        fps (float): video frame rate.
        pose (torch.Tensor | None): ``[B, T, 8, 2]``; restricts the openness count to the mouth box.

    Returns:
        torch.Tensor: ``[B]`` in [-1, 1]; ground truth scores near 1, a still mouth 0.
    """
    openness = mouth_openness(video, pose)
    envelope = frame_envelope(audio.to(openness.dtype), sample_rate, fps, video.shape[1])
    return pearson(openness, envelope)


def _second_difference_energy(video: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    _check_video(video)
    if video.shape[1] < 3:
        raise ValueError(f"jitter needs at least 3 frames, got {video.shape[1]}")
    second = video[:, 2:] - 2 * video[:, 1:-1] + video[:, :-2]
    if keep is None:
        return second.square().flatten(1).mean(dim=1)
    batch, frames, _, height, width = video.shape
    if keep.shape != (batch, frames, height, width) or keep.dtype != torch.bool:
        raise ValueError(f"keep must be bool [{batch}, {frames}, {height}, {width}], got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    # A second difference at frame t reads frames t-1, t and t+1: it counts where the pixel is kept in all three.
    counted = (keep[:, 2:] & keep[:, 1:-1] & keep[:, :-2]).unsqueeze(2).to(second.dtype)
    total = (second.square() * counted).flatten(1).sum(dim=1)
    return total / (counted.flatten(1).sum(dim=1) * video.shape[2])  # 0/0 = NaN: nothing counted


def jitter(video: torch.Tensor, ground_truth: torch.Tensor | None = None,
           keep: torch.Tensor | None = None) -> torch.Tensor:
    """Temporal jitter: mean squared second difference of the frames over time, pixels and channels.

    Smooth motion has small second differences; flicker and shaking have large ones.

    Args:
        video (torch.Tensor): ``[B, T, 3, H, W]`` in [0, 1], T >= 3.
        ground_truth (torch.Tensor | None): same shape; if given, the result is the excess over the ground truth's
            own jitter, which is negative when the video is smoother than the ground truth (a frozen video is).
        keep (torch.Tensor | None): ``[B, T, H, W]`` bool, the pixels to count (e.g. the complement of the mouth
            box); the second difference at frame t counts where frames t-1, t and t+1 all keep the pixel, and the
            mean is over the counted elements (the ground truth's too). A clip with nothing counted gives NaN.

    Returns:
        torch.Tensor: ``[B]``.
    """
    energy = _second_difference_energy(video, keep)
    if ground_truth is not None:
        if ground_truth.shape != video.shape:
            raise ValueError(f"ground truth {tuple(ground_truth.shape)} differs from video {tuple(video.shape)}")
        energy = energy - _second_difference_energy(ground_truth, keep)
    return energy


def identity_drift(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Colour distance to the reference: mean over frames of the L2 distance between mean RGB colours.

    The dark-pixel sync count can be gamed by darkening the image instead of moving the mouth; that shifts every
    frame's mean colour away from the reference image's, which this catches. The mouth itself moves the mean a
    little, so ground truth scores small but not zero.

    Args:
        video (torch.Tensor): ``[B, T, 3, H, W]`` in [0, 1].
        reference (torch.Tensor): ``[B, 3, H', W']`` in [0, 1] (only its mean colour is used).

    Returns:
        torch.Tensor: ``[B]``, 0 to sqrt(3).
    """
    _check_video(video)
    if reference.ndim != 4 or reference.shape[:2] != (video.shape[0], 3):
        raise ValueError(f"expected reference [{video.shape[0]}, 3, H, W], got {tuple(reference.shape)}")
    frame_colour = video.mean(dim=(-2, -1))  # [B, T, 3]
    reference_colour = reference.mean(dim=(-2, -1))  # [B, 3]
    return (frame_colour - reference_colour[:, None]).norm(dim=-1).mean(dim=1)


def dark_centroid(video: torch.Tensor, threshold: float = DARK_THRESHOLD) -> torch.Tensor:
    """Centre of the dark pixels (eyes and mouth) per frame, in pixels: where the face is.

    Returns:
        torch.Tensor: ``[B, T, 2]`` as (x, y); the frame centre for a frame without dark pixels.
    """
    dark = (luminance(video) < threshold).to(_float_at_least_32(video.dtype))  # [B, T, H, W]
    height, width = dark.shape[-2:]
    xs = torch.arange(width, dtype=dark.dtype, device=dark.device) + 0.5
    ys = torch.arange(height, dtype=dark.dtype, device=dark.device) + 0.5
    count = dark.sum(dim=(-2, -1))
    x = (dark.sum(dim=-2) * xs).sum(dim=-1) / count.clamp(min=1)
    y = (dark.sum(dim=-1) * ys).sum(dim=-1) / count.clamp(min=1)
    centre = torch.stack([x, y], dim=-1)
    empty = (count == 0)[..., None]
    return torch.where(empty, torch.tensor([width / 2, height / 2], dtype=dark.dtype, device=dark.device), centre)


def head_offset(video: torch.Tensor, ground_truth: torch.Tensor) -> torch.Tensor:
    """How far the generated face is from where the ground truth (and so the skeleton) puts it: the mean over
    frames of the distance, in pixels, between the dark-pixel centres of the video and of the ground truth.

    A model that follows the pose track keeps it near 0; one that ignores it lets the head drift elsewhere.

    Returns:
        torch.Tensor: ``[B]`` in pixels.
    """
    if ground_truth.shape != video.shape:
        raise ValueError(f"ground truth {tuple(ground_truth.shape)} differs from video {tuple(video.shape)}")
    return (dark_centroid(video) - dark_centroid(ground_truth)).norm(dim=-1).mean(dim=1)


def _check_pair(video: torch.Tensor, target: torch.Tensor) -> None:
    _check_video(video)
    if target.shape != video.shape:
        raise ValueError(f"target {tuple(target.shape)} differs from video {tuple(video.shape)}")


SSIM_CHUNK = 64
"""Frames per SSIM call: torchmetrics holds several float64 copies of its input, too much for a long HD clip."""


def ssim(video: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structural similarity to the target (torchmetrics, 11×11 Gaussian window, data range 1), per frame, averaged
    over the clip's frames. Computed in float64 (float32 is off by up to 3e-4), which is slow on a CPU: about 10 ms
    per 32×32 frame.

    Args:
        video (torch.Tensor): ``[B, T, 3, H, W]`` in [0, 1], H and W at least 6.
        target (torch.Tensor): the same shape, e.g. the ground truth.

    Returns:
        torch.Tensor: ``[B]`` float32 (or wider), 1 for identical clips.
    """
    # Imported here: torchmetrics takes over a second to import, and only SSIM and PSNR need it.
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(video, target)
    # Variances come out as E[x²] − E[x]², which float32 gets wrong by ~1e-7: next to the 9e-4 stabiliser that
    # moves SSIM by up to 3e-4 (flat frames score 0.9228 for 0.9231, a copy 0.9999). MPS has no float64.
    dtype = torch.float32 if video.device.type == "mps" else torch.float64
    preds = video.to(dtype).flatten(0, 1)
    truth = target.to(device=video.device, dtype=dtype).flatten(0, 1)
    per_frame = torch.cat([
        structural_similarity_index_measure(p, t, data_range=1.0, reduction="none")
        for p, t in zip(preds.split(SSIM_CHUNK), truth.split(SSIM_CHUNK))
    ])
    return per_frame.view(video.shape[:2]).mean(dim=1).to(_float_at_least_32(video.dtype))


def psnr(video: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio to the target in dB, ``10 log10(1 / MSE)`` with the MSE over all of the clip's
    frames, pixels and channels (torchmetrics, data range 1).

    The clip's MSE, not the mean of per-frame PSNRs: a single frame that matches exactly would make that infinite.

    Args:
        video (torch.Tensor): ``[B, T, 3, H, W]`` in [0, 1].
        target (torch.Tensor): the same shape, e.g. the ground truth.

    Returns:
        torch.Tensor: ``[B]`` float32 (or wider); ``inf`` for a clip identical to its target.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_pair(video, target)
    dtype = _float_at_least_32(video.dtype)
    truth = target.to(device=video.device, dtype=dtype)
    return peak_signal_noise_ratio(video.to(dtype), truth, data_range=1.0, reduction="none", dim=(1, 2, 3, 4))
