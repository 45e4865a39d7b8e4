"""The TalkingShapes sync expert as a reward: does the mouth open with the speech?"""

from __future__ import annotations

import torch

from prefalign import metrics
from prefalign.rewards.base import Reward


class SyncExpert(Reward):
    """Pearson correlation of the mouth's dark-pixel count with the audio envelope over frames (DESIGN.md,
    "Sync expert"): ground truth scores ≈ 0.98, a time-shifted mouth ≈ −0.4. With ``use_pose`` and a ``pose``
    in the conditions, only the box around the mouth keypoint counts (the stricter estimate).

    Args:
        sample_rate (int): sample rate of the conditions' audio.
        fps (float): video frame rate.
        use_pose (bool): count dark pixels only around the mouth keypoint when pose is given.
    """

    def __init__(self, sample_rate: int = 16000, fps: float = 25.0, use_pose: bool = False):
        self.sample_rate = sample_rate
        self.fps = fps
        self.use_pose = use_pose

    @property
    def reads_pose(self) -> bool:
        return self.use_pose

    def score(self, videos: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        pose = cond.get("pose") if self.use_pose else None
        return {"sync": metrics.sync_score(videos, cond["audio"], self.sample_rate, self.fps, pose=pose)}
