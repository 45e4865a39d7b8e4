"""Guard rewards against reward hacking (FlowPortrait): texture kept as sharp as the reference, no excess jitter, the
reference's colours kept."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from prefalign import metrics
from prefalign.rewards.base import Reward

_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean squared response of the 3×3 Laplacian on Rec. 601 luminance, over valid pixels (no padding, so
    frame borders add nothing).

    Args:
        images (torch.Tensor): ``[..., 3, H, W]`` in [0, 1], H and W at least 3.

    Returns:
        torch.Tensor: ``[...]`` float32 (or wider).
    """
    if images.ndim < 3 or images.shape[-3] != 3 or min(images.shape[-2:]) < 3:
        raise ValueError(f"expected images [..., 3, H, W] with H, W >= 3, got {tuple(images.shape)}")
    images = images.to(torch.promote_types(images.dtype, torch.float32))
    weights = torch.tensor(metrics.LUMA_WEIGHTS, dtype=images.dtype, device=images.device)
    luma = torch.einsum("...chw,c->...hw", images, weights)
    lead, (height, width) = luma.shape[:-2], luma.shape[-2:]
    kernel = torch.tensor(_LAPLACIAN, dtype=luma.dtype, device=luma.device).view(1, 1, 3, 3)
    response = F.conv2d(luma.reshape(-1, 1, height, width), kernel)
    return response.square().mean(dim=(1, 2, 3)).view(lead)


class TextureReward(Reward):
    """Penalises blur and "plastic", over-smoothed skin (and, by default, added grain): FlowPortrait's guard that
    keeps a policy from buying a higher judge score with a smoother face.

    Per frame, the high-frequency energy E (mean squared 3×3 Laplacian of the luminance, see
    :func:`high_frequency_energy`) is compared with the reference image's: ``r = log((E_frame + eps) / (E_ref + eps))``
    is 0 when the frame is as sharp as the reference, negative when blurrier, positive when noisier. The score is
    ``−max(0, d − tolerance)`` averaged over frames, where ``d = |r|`` with ``penalize="both"`` (the default: grain
    and codec noise are artefacts too) and ``d = max(0, −r)`` with ``penalize="blur"`` (for references with less
    detail than good generations, e.g. a compressed or downscaled still). Higher is better; the best score is 0.

    On TalkingShapes (32×32) the ground truth scores about −0.15 to −0.35 (the open mouth adds edges the
    closed-mouth reference lacks), a 3×3 box blur about −2 and Gaussian noise of σ = 0.05 about −1.

    Args:
        penalize (str): ``"both"`` (too smooth or too noisy) or ``"blur"`` (too smooth only).
        tolerance (float): log-ratio below which a frame goes unpenalised (0: every deviation counts).
        eps (float): added to both energies so that a flat reference or frame gives a finite score.
        name (str): the term's name.
    """

    def __init__(
        self,
        penalize: Literal["both", "blur"] = "both",
        tolerance: float = 0.0,
        eps: float = 1e-6,
        name: str = "texture",
    ):
        if penalize not in ("both", "blur"):
            raise ValueError(f"penalize must be 'both' or 'blur', got {penalize!r}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.penalize = penalize
        self.tolerance = tolerance
        self.eps = eps
        self.name = name

    def score(self, videos: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        metrics._check_video(videos)
        if "reference" not in cond:
            raise ValueError(f"{type(self).__name__} needs a 'reference' image [B, 3, H, W] in the conditions")
        reference = cond["reference"]
        batch, _, _, height, width = videos.shape
        if reference.shape != (batch, 3, height, width):
            # Laplacian energy depends on scale: a reference at another resolution would not be comparable.
            raise ValueError(
                f"expected reference [{batch}, 3, {height}, {width}] (the video's size), got {tuple(reference.shape)}"
            )
        frames = high_frequency_energy(videos)  # [B, T]
        ref = high_frequency_energy(reference.to(videos.device))  # [B]
        ratio = torch.log((frames + self.eps) / (ref[:, None] + self.eps))
        deviation = ratio.abs() if self.penalize == "both" else (-ratio).clamp(min=0)
        return {self.name: -(deviation - self.tolerance).clamp(min=0).mean(dim=1)}


def _pose_motion_energy(pose: torch.Tensor, reference: torch.Tensor, pose_scale: Optional[float]) -> torch.Tensor:
    """Second-difference energy of a video whose content translates with the keypoints, to first order.

    Content moving by u(t) pixels gives I(x − u(t)), whose second difference over time is ≈ −Δ²u·∇I; for
    isotropic gradients its mean square is |Δ²u|²·E|∇I|²/2. Δ²u is taken per keypoint and averaged; E|∇I|² is the
    reference image's mean squared forward difference over channels and pixels (the same units as jitter), so the
    reference must have the video's size.
    """
    height, width = reference.shape[-2:]
    scale = torch.tensor(
        [width, height] if pose_scale is None else [pose_scale, pose_scale], dtype=pose.dtype, device=pose.device
    )
    points = pose * scale
    acceleration = (points[:, 2:] - 2 * points[:, 1:-1] + points[:, :-2]).square().sum(dim=-1).mean(dim=(1, 2))
    gradient = (reference[..., :, 1:] - reference[..., :, :-1]).square().mean(dim=(1, 2, 3)) + (
        reference[..., 1:, :] - reference[..., :-1, :]
    ).square().mean(dim=(1, 2, 3))
    return acceleration * gradient / 2


class JitterPenalty(Reward):
    """Temporal jitter beyond the motion the conditions imply: ``−scale · max(0, energy − implied)``.

    ``energy`` is :func:`prefalign.metrics.jitter` of the video: the mean squared second difference of the frames
    over time, pixels and RGB channels. ``implied`` is the energy the conditions account for, taken from (with
    ``implied="auto"``, the first available):

    - ``"ground_truth"``: the ground truth's own second-difference energy, when ``cond`` has a ``video`` of the
      same shape (validation batches). The ground truth then scores exactly 0.
    - ``"pose"``: the first-order energy of content that moves with the pose track ``cond["pose"]`` ``[B, T, K, 2]``:
      ``motion_gain · mean_{t,k} |Δ²p_{t,k}|² · E|∇I_ref|² / 2``, with keypoints p in pixels and E|∇I_ref|² the
      reference image's mean squared spatial forward difference. It credits head motion, not what the pose
      cannot see (on TalkingShapes the mouth, whose opening dominates the ground truth's energy), and the
      linearisation undercounts motions of a pixel or more: on TalkingShapes the head-only energy is 1.6–3.2× the
      estimate, so ``motion_gain=2`` suits it.
    - ``"none"``: 0, i.e. the raw second-difference energy is penalised.

    With ``exclude_mouth=True`` both energies leave out the mouth box (mouth ± (0.6·d, 0.8·d) from the TalkingShapes
    keypoints of ``cond["pose"]``, d the eye distance; :func:`prefalign.metrics.training_mouth_box`): the mouth's
    motion is what the audio implies, and the sync term judges it, so a penalty that counted it would pull against
    lip sync. On TalkingShapes the base model's jitter beyond the ground truth lies outside the box (its mouth moves
    less than the ground truth's), so this is where a guard belongs.

    Smoother than implied is never rewarded (a frozen video is not better than the ground truth). Magnitudes are
    small: on TalkingShapes the ground truth's raw energy is 0.002–0.007 and frame-shuffled clips 0.01–0.04, so
    weight or normalise the term in a composite (or raise ``scale``).

    Args:
        implied (str): ``"auto"``, ``"ground_truth"``, ``"pose"`` or ``"none"``; a named source that the conditions
            lack raises an error.
        pose_scale (float | None): multiplies keypoints into pixels; None for keypoints in image fractions [0, 1]
            (x times the width, y times the height), 1.0 for keypoints already in pixels.
        motion_gain (float): multiplies the pose-implied energy.
        scale (float): multiplies the penalty.
        exclude_mouth (bool): measure both energies outside the mouth box only; needs ``pose`` in the conditions.
        name (str): the term's name.
    """

    def __init__(
        self,
        implied: Literal["auto", "ground_truth", "pose", "none"] = "auto",
        pose_scale: Optional[float] = None,
        motion_gain: float = 1.0,
        scale: float = 1.0,
        exclude_mouth: bool = False,
        name: str = "jitter",
    ):
        if implied not in ("auto", "ground_truth", "pose", "none"):
            raise ValueError(f"implied must be 'auto', 'ground_truth', 'pose' or 'none', got {implied!r}")
        if pose_scale is not None and pose_scale <= 0:
            raise ValueError(f"pose_scale must be positive or None, got {pose_scale}")
        if motion_gain < 0 or scale <= 0:
            raise ValueError(f"motion_gain must be >= 0 and scale positive, got {motion_gain} and {scale}")
        self.implied = implied
        self.pose_scale = pose_scale
        self.motion_gain = motion_gain
        self.scale = scale
        self.exclude_mouth = exclude_mouth
        self.name = name

    @property
    def reads_pose(self) -> bool:
        """``implied`` ``pose`` or ``auto`` (which takes the pose where there is no ground truth), or
        ``exclude_mouth``."""
        return self.exclude_mouth or self.implied in ("pose", "auto")

    def _source(self, cond: dict) -> str:
        if self.implied != "auto":
            needed = {"ground_truth": "video", "pose": "pose"}.get(self.implied)
            if needed is not None and cond.get(needed) is None:
                raise ValueError(f"{type(self).__name__}(implied={self.implied!r}) needs '{needed}' in the conditions")
            return self.implied
        if cond.get("video") is not None:
            return "ground_truth"
        return "pose" if cond.get("pose") is not None else "none"

    @staticmethod
    def _pose(videos: torch.Tensor, cond: dict) -> torch.Tensor:
        """``cond["pose"]`` on the videos' device, checked to give K keypoints for every frame."""
        batch, frames = videos.shape[:2]
        pose = cond["pose"].to(device=videos.device, dtype=torch.promote_types(videos.dtype, torch.float32))
        if pose.ndim != 4 or pose.shape[:2] != (batch, frames) or pose.shape[-1] != 2:
            raise ValueError(f"expected pose [{batch}, {frames}, K, 2], covering the video frame by frame, got "
                             f"{tuple(pose.shape)}")
        return pose

    def keep(self, videos: torch.Tensor, cond: dict) -> Optional[torch.Tensor]:
        """The pixels ``[B, T, H, W]`` the energies count: all (None), or outside the mouth box."""
        if not self.exclude_mouth:
            return None
        if cond.get("pose") is None:
            raise ValueError(f"{type(self).__name__}(exclude_mouth=True) needs 'pose' in the conditions")
        return ~metrics.training_mouth_box(self._pose(videos, cond), *videos.shape[-2:])

    def implied_energy(self, videos: torch.Tensor, cond: dict, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The second-difference energy ``[B]`` the conditions account for (see the class docstring), over the
        pixels ``keep`` (all when None) for the ground truth; the pose's estimate is per pixel of the moving
        content either way."""
        batch = videos.shape[0]
        source = self._source(cond)
        dtype = torch.promote_types(videos.dtype, torch.float32)
        if source == "ground_truth":
            truth = cond["video"].to(device=videos.device, dtype=dtype)
            if truth.shape != videos.shape:
                raise ValueError(f"ground truth {tuple(truth.shape)} differs from video {tuple(videos.shape)}")
            return metrics.jitter(truth, keep=keep)
        if source == "pose":
            pose = self._pose(videos, cond)
            # Without a reference, the first generated frame stands in as the picture that moves.
            reference = cond.get("reference")
            reference = videos[:, 0] if reference is None else reference
            if reference.shape != videos[:, 0].shape:
                raise ValueError(f"expected reference {tuple(videos[:, 0].shape)}, got {tuple(reference.shape)}")
            reference = reference.to(device=videos.device, dtype=dtype)
            return self.motion_gain * _pose_motion_energy(pose, reference, self.pose_scale)
        return torch.zeros(batch, dtype=dtype, device=videos.device)

    def score(self, videos: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        metrics._check_video(videos)
        keep = self.keep(videos, cond)
        energy = metrics.jitter(videos.to(torch.promote_types(videos.dtype, torch.float32)), keep=keep)
        excess = (energy - self.implied_energy(videos, cond, keep)).clamp(min=0)
        return {self.name: -self.scale * excess}


class IdentityReward(Reward):
    """Staying the person of the reference: ``−scale · identity_drift``, the mean over frames of the distance between
    the frame's mean colour and the reference's (:func:`prefalign.metrics.identity_drift`).

    It guards the dark-pixel sync expert against its cheapest hack, darkening the face instead of moving the mouth
    (which shifts every frame's colour away from the reference's); the colour-level stand-in, on TalkingShapes, for
    the face-embedding similarity to the reference that identity rewards use on real faces.

    Args:
        scale (float): multiplies the penalty.
        name (str): the term's name.
    """

    def __init__(self, scale: float = 1.0, name: str = "identity"):
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale
        self.name = name

    def score(self, videos: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        reference = cond.get("reference")
        if reference is None:
            raise ValueError(f"{type(self).__name__} needs 'reference' in the conditions")
        dtype = torch.promote_types(videos.dtype, torch.float32)
        drift = metrics.identity_drift(videos.to(dtype), reference.to(device=videos.device, dtype=dtype))
        return {self.name: -self.scale * drift}
