"""The metrics the talking-head papers report, for ``prefalign test`` and validation: Sync-C / Sync-D (SyncNet's
LSE-C / LSE-D, per clip), FID (Inception features of every frame) and FVD (I3D features of every clip), both against
the evaluation set's ground-truth clips.

Each needs weights the user downloads (``EvaluationSettings``: ``syncnet``, ``inception``, ``i3d``); a metric asked
for without its weights is an error at setup naming the option and where the weights come from. The networks are
kept out of the module's state dict (never trained, never checkpointed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from prefalign.syncnet import FACE_POINTS

#: The metrics, what they need and what each says (README's table is built from the same words).
METRICS = {
    "sync_c": "syncnet",
    "sync_d": "syncnet",
    "fid": "inception",
    "fvd": "i3d",
}


@dataclass
class EvaluationSettings:
    """The papers' metrics: which to compute in ``prefalign test`` and in validation during ``fit``, and the weights
    files they need."""

    metrics: list[str] = field(default_factory=list)
    """Metrics of ``prefalign test``, of ``sync_c``, ``sync_d`` (per clip), ``fid``, ``fvd`` (over the set)."""
    val_metrics: list[str] = field(default_factory=list)
    """Metrics also computed in validation during ``fit`` (logged as ``val/<metric>``), of the same names."""
    syncnet: Optional[str] = None
    """SyncNet's ``syncnet_v2.model`` (from the syncnet_python repo's download script), for ``sync_c``/``sync_d``."""
    inception: Optional[str] = None
    """FID's Inception weights, ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release), for ``fid``."""
    i3d: Optional[str] = None
    """The Kinetics-400 I3D, pytorch-i3d's ``models/rgb_imagenet.pt``, for ``fvd``."""
    batch_size: int = 16
    """Frames (FID, SyncNet windows) or clips (FVD) per network call."""

    def __post_init__(self):
        for option in ("metrics", "val_metrics"):
            names = getattr(self, option)
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"model.evaluation.{option} must be a list of {sorted(METRICS)}; got {names!r}")
            unknown = sorted(set(names) - set(METRICS))
            if unknown:
                raise ValueError(f"model.evaluation.{option}: unknown metrics {unknown}; allowed: {sorted(METRICS)}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"model.evaluation.batch_size must be an integer >= 1, got {self.batch_size!r}")


class PaperMetrics:
    """The networks of some of the papers' metrics, on a device, and the features of one evaluation pass for FID and
    FVD. Not an ``nn.Module``: a module attribute holding it keeps the networks out of checkpoints.

    FID and FVD keep each clip's features (float32, on the CPU: 17 frames × 2048 × 2 for FID, 139 KiB a clip) by
    clip id, so that a clip scored twice (DistributedSampler pads ranks with repeated clips) counts once, as in the
    metrics table. The networks run in float32, outside any autocast (a run's ``bf16-mixed`` included), as the
    reference implementations do.

    Args:
        settings (EvaluationSettings): the weights files.
        names (list[str]): the metrics to compute.
        fps (float): the clips' frame rate.
        sample_rate (int): the audio's rate.
    """

    def __init__(self, settings: EvaluationSettings, names: list[str], fps: float, sample_rate: int):
        self.names = list(dict.fromkeys(names))
        self.settings = settings
        self.sync = self.fid = self.fvd = None
        if {"sync_c", "sync_d"} & set(self.names):
            from prefalign.syncnet import SyncMetric

            self.sync = SyncMetric(weights=_weights(settings, "syncnet"), fps=fps, sample_rate=sample_rate,
                                   batch_size=settings.batch_size)  # fmt: skip
        if "fid" in self.names:
            from prefalign.inception import FIDMetric, load_fid_inception

            self.fid = FIDMetric(load_fid_inception(_weights(settings, "inception")), batch_size=settings.batch_size)
        if "fvd" in self.names:
            from prefalign.i3d import FVDMetric, load_i3d

            self.fvd = FVDMetric(load_i3d(_weights(settings, "i3d")), batch_size=settings.batch_size)
        self._features: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {"fid": {}, "fvd": {}}

    def to(self, device: torch.device) -> PaperMetrics:
        for metric in (self.sync, self.fid, self.fvd):
            if metric is not None:
                metric.to(device)
        return self

    @torch.no_grad()
    def clip_scores(self, video: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Per-clip metrics (``sync_c``, ``sync_d``) of sampled ``video`` for ``batch``; and, for FID and FVD, the
        features of each clip and of its ground truth, kept by the batch's ``id``."""
        scores = {}
        with torch.autocast(video.device.type, enabled=False):
            video = video.float()
            if self.sync is not None:
                pose = batch.get("pose")
                if pose is not None and pose.shape[2] not in FACE_POINTS:
                    pose = None  # no face points in this layout: SyncNet crops the whole frame (said by crop_source)
                sync = self.sync(video, batch["audio"].float(), pose)
                scores.update({name: sync[name] for name in ("sync_c", "sync_d") if name in self.names})
            for metric, name in ((self.fid, "fid"), (self.fvd, "fvd")):
                if metric is None:
                    continue
                truth = batch.get("video")
                if truth is None:
                    raise ValueError(f"{name} compares the generated clips with the ground truth: the evaluation set "
                                     "needs its `video` column")
                ids = batch.get("id") or [str(i) for i in range(video.shape[0])]
                for index, clip_id in enumerate(ids):
                    if clip_id not in self._features[name]:
                        pair = (video[index : index + 1], truth[index : index + 1].float())
                        self._features[name][clip_id] = tuple(metric.features(v).float().cpu() for v in pair)
        return scores

    def set_scores(self) -> dict[str, tuple[float, int]]:
        """``{metric: (value, clips)}`` of FID and FVD over every rank's clips since the last ``reset`` (each id once,
        the first rank's); NaN where fewer than two clips (FVD) or frames (FID) are on a side. A collective under
        torch.distributed: call it on every rank."""
        from prefalign.frechet import FeatureStats

        out = {}
        for metric, name in ((self.fid, "fid"), (self.fvd, "fvd")):
            if metric is None:
                continue
            features = self._features[name]
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                gathered: list = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, features)
                features = {}
                for part in gathered:  # rank order: the first rank's copy of a repeated clip
                    for clip_id, pair in part.items():
                        features.setdefault(clip_id, pair)
            stats = []
            for side in (0, 1):
                rows = [pair[side] for pair in features.values()]
                side_stats = FeatureStats(rows[0].shape[1]) if rows else None
                for row in rows:
                    side_stats.add(row)
                stats.append(side_stats)
            enough = all(s is not None and s.count >= 2 for s in stats)
            out[name] = (stats[0].distance(stats[1]) if enough else math.nan, len(features))
        return out

    def reset(self) -> None:
        self._features = {"fid": {}, "fvd": {}}

    @property
    def crop_source(self) -> Optional[str]:
        """Where SyncNet's crops came from in the last call (``pose``, ``box``, ``frame``)."""
        return None if self.sync is None else self.sync.crop_source


def _weights(settings: EvaluationSettings, option: str) -> str:
    path = getattr(settings, option)
    if path is None:
        needing = sorted(name for name, weights in METRICS.items() if weights == option)
        raise ValueError(f"model.evaluation.{option} is not set: the metrics {needing} need its weights file "
                         f"({_DOCS[option]})")
    return path


_DOCS = {
    "syncnet": "syncnet_v2.model, from the syncnet_python repo's download_model.sh",
    "inception": "pt_inception-2015-12-05-6726825d.pth, from pytorch-fid's GitHub release",
    "i3d": "rgb_imagenet.pt, from pytorch-i3d's models/ folder",
}
