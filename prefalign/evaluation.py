"""Evaluation building blocks for validation and test: per-clip scores, a table of them written as CSV and JSON,
and a PNG grid of sampled frames next to their reference and ground truth."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from prefalign import metrics
from prefalign.data import media
from prefalign.files import atomic_write, inside
from prefalign.rewards.base import Reward
from prefalign.rewards.regularizers import TextureReward

REWARD_PREFIX = "reward/"
"""Reward terms are named ``reward/<term>`` so that they never collide with the metrics."""


@torch.no_grad()
def clip_scores(
    video: torch.Tensor,
    batch: dict,
    fps: float,
    sample_rate: int,
    rewards: Optional[Sequence[Reward]] = None,
) -> dict[str, torch.Tensor]:
    """Every per-clip score of sampled videos against the batch they were made for.

    Always: ``sync`` (mouth openness against the audio), ``identity`` (colour drift from the reference) and
    ``texture`` (high-frequency energy against the reference's: 0 is the reference's, below is blur or grain).
    With ``batch["pose"]``: ``sync_pose_box`` (sync counted in the mouth box of the pose). With a ground truth
    ``batch["video"]``: ``jitter`` (excess over the ground truth's), ``head_offset``, ``sync_ground_truth`` (the
    ground truth's own sync, the ceiling), ``ssim`` and ``psnr``; with both, ``jitter_outside_mouth`` (the jitter
    excess outside the training mouth box, where the mouth's own motion does not count). Then every term of every reward, as
    ``reward/<term>``; a NaN (a judge's dropped sample) stays NaN.

    Args:
        video (torch.Tensor): ``[B, T, 3, H, W]`` in [0, 1], generated for ``batch``.
        batch (dict): a data-module batch: ``audio`` ``[B, S]``, ``reference`` ``[B, 3, H, W]``, optional ``pose``
            and ground-truth ``video`` (same shape as ``video``).
        fps (float): the video frame rate.
        sample_rate (int): the rate of ``batch["audio"]`` in Hz.
        rewards (Sequence[Reward] | None): rewards whose terms to add (e.g. ``[algorithm.reward]``).

    Returns:
        dict[str, torch.Tensor]: name -> ``[B]``, on the devices the metrics and rewards computed them on.

    Raises:
        ValueError: two rewards give the same term, or a term is not one value per clip.
    """
    audio, reference = batch["audio"], batch["reference"]
    scores = {
        "sync": metrics.sync_score(video, audio, sample_rate, fps),
        "identity": metrics.identity_drift(video, reference),
        "texture": TextureReward().score(video, batch)["texture"],
    }
    if batch.get("pose") is not None:
        scores["sync_pose_box"] = metrics.sync_score(video, audio, sample_rate, fps, batch["pose"])
    truth = batch.get("video")
    if truth is not None:
        scores["jitter"] = metrics.jitter(video, truth)
        scores["head_offset"] = metrics.head_offset(video, truth)
        scores["sync_ground_truth"] = metrics.sync_score(truth, audio, sample_rate, fps)
        scores["ssim"] = metrics.ssim(video, truth)
        scores["psnr"] = metrics.psnr(video, truth)
        if batch.get("pose") is not None:
            outside = ~metrics.training_mouth_box(batch["pose"].to(video.device), *video.shape[-2:])
            scores["jitter_outside_mouth"] = metrics.jitter(video, truth, keep=outside)
    for reward in rewards or ():
        if not isinstance(reward, Reward):
            raise TypeError(f"rewards must be Reward instances, got {type(reward).__name__}")
        for term, value in reward.score(video, batch).items():
            name = REWARD_PREFIX + term
            if name in scores:
                raise ValueError(f"two rewards give the term '{term}': rename one (its `name`)")
            if value.shape != (video.shape[0],):
                raise ValueError(
                    f"{type(reward).__name__}: term '{term}' has shape {tuple(value.shape)}, "
                    f"expected [{video.shape[0]}]"
                )
            scores[name] = value
    return scores


class EvaluationTable:
    """Per-clip scores gathered batch by batch, summarised, and written as ``metrics.csv`` (one row per clip),
    ``summary.csv`` and ``metrics.json``.

    Rows are keyed by clip id; an id seen again is ignored (the first row is kept), because DistributedSampler pads
    the last round with clips that other ranks already scored. Values are stored as Python floats (float32 scores
    convert exactly) and written with ``repr``, so that reading the files back gives the same numbers. A row may
    record the file its clip's video went to (``video``, relative to the table's folder), so that a row names its
    own video however the id was made into a file name.
    """

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, float]] = {}
        self._videos: dict[str, str] = {}
        self.repeated_ids = 0
        """How many rows were ignored because their id was already in the table."""
        self._set_scores: dict[str, tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, ids: Sequence[str], scores: dict[str, Union[torch.Tensor, Sequence[float]]],
            videos: Optional[Sequence[str]] = None) -> None:
        """Add one row per clip: ``scores[name][i]`` is clip ``ids[i]``'s value (e.g. :func:`clip_scores`), and
        ``videos[i]`` (if given) the file its video was written to."""
        ids = [str(clip_id) for clip_id in ids]
        if videos is not None and len(videos) != len(ids):
            raise ValueError(f"expected one video per id ({len(ids)}), got {len(videos)}")
        columns = {}
        for name, value in scores.items():
            if name in ("id", "video"):
                raise ValueError(f"'{name}' names a column of the table; a score cannot be called that")
            value = torch.as_tensor(value).detach()
            if value.shape != (len(ids),):
                raise ValueError(f"score '{name}' has shape {tuple(value.shape)}, expected [{len(ids)}] (one per id)")
            columns[name] = value.cpu().double().tolist()
        for index, clip_id in enumerate(ids):
            if clip_id in self._rows:
                self.repeated_ids += 1
                continue
            self._rows[clip_id] = {name: values[index] for name, values in columns.items()}
            if videos is not None:
                self._videos[clip_id] = str(videos[index])

    def merge(self, other: EvaluationTable) -> None:
        """Add ``other``'s rows after this table's (ids already here are ignored)."""
        for clip_id, row in other._rows.items():
            if clip_id in self._rows:
                self.repeated_ids += 1
            else:
                self._rows[clip_id] = dict(row)
                if clip_id in other._videos:
                    self._videos[clip_id] = other._videos[clip_id]
        self.repeated_ids += other.repeated_ids

    @classmethod
    def from_gathered(cls, tables: Iterable[EvaluationTable]) -> EvaluationTable:
        """One table of several (e.g. one per DDP rank, in rank order), keeping each id's first row."""
        merged = cls()
        for table in tables:
            merged.merge(table)
        return merged

    def gather(self) -> EvaluationTable:
        """Every rank's rows in one table, in rank order (``torch.distributed.all_gather_object``); the table itself
        when not distributed. A collective: call it on every rank."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        tables: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(tables, self)
        return EvaluationTable.from_gathered(tables)

    @property
    def columns(self) -> list[str]:
        """Every metric of any row, sorted."""
        return sorted({name for row in self._rows.values() for name in row})

    def rows(self) -> list[dict]:
        """One dict per clip, in the order they were added: ``{"id": ..., "video": ..., metric: value, ...}``
        (``video`` where the row recorded its file)."""
        return [{"id": clip_id, **({"video": self._videos[clip_id]} if clip_id in self._videos else {}), **row}
                for clip_id, row in self._rows.items()]

    def add_set_scores(self, scores: dict[str, tuple[float, int]]) -> None:
        """Metrics of the whole set (FID, FVD): ``{metric: (value, clips)}``, in the summary with std NaN."""
        self._set_scores = {**self._set_scores, **scores}

    def summary(self) -> dict[str, dict[str, float]]:
        """``{metric: {"mean", "std", "count"}}`` over the clips, NaN left out (``count`` counts the rest); ``std`` is
        the population standard deviation; mean and std are NaN when no value is left. Set metrics (FID, FVD) give
        their value as ``mean``, NaN as ``std`` and the clips they compared as ``count``."""
        out = {name: {"mean": value, "std": math.nan, "count": count}
               for name, (value, count) in self._set_scores.items()}  # fmt: skip
        for name in self.columns:
            if name in out:
                raise ValueError(f"'{name}' is both a per-clip metric and a set metric")
            values = [row[name] for row in self._rows.values() if name in row and not math.isnan(row[name])]
            count = len(values)
            if count == 0:
                out[name] = {"mean": math.nan, "std": math.nan, "count": 0}
                continue
            mean = math.fsum(values) / count
            std = math.sqrt(math.fsum((value - mean) ** 2 for value in values) / count)
            out[name] = {"mean": mean, "std": std, "count": count}
        return out

    def write(self, folder: Union[str, Path]) -> Path:
        """Write ``metrics.csv`` (``id`` then the sorted metrics, one row per clip; a metric a clip lacks is an empty
        cell), ``summary.csv`` (metric, mean, std, count) and ``metrics.json`` (``{"metrics": summary, "clips":
        rows}``; NaN and infinity as Python's json writes them) into ``folder`` (created), each atomically.

        Returns:
            Path: the folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        columns = self.columns
        files = ["video"] if self._videos else []
        _write_csv(
            folder / "metrics.csv",
            ["id", *files, *columns],
            [[clip_id, *([self._videos.get(clip_id, "")] if files else []),
              *(repr(row[name]) if name in row else "" for name in columns)]
             for clip_id, row in self._rows.items()],
        )
        summary = self.summary()
        _write_csv(
            folder / "summary.csv",
            ["metric", "mean", "std", "count"],
            [[name, repr(stats["mean"]), repr(stats["std"]), str(stats["count"])] for name, stats in summary.items()],
        )
        with atomic_write(folder / "metrics.json") as tmp:
            tmp.write_text(json.dumps({"metrics": summary, "clips": self.rows()}, indent=1) + "\n")
        return folder


def _write_csv(path: Path, header: list[str], rows: Iterable[list[str]]) -> None:
    with atomic_write(path) as tmp:
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)


SEPARATOR = 2
"""Pixels of white between the reference, the generated frames, the ground truth, and between rows."""


def _as_clips(videos: Union[torch.Tensor, Sequence[torch.Tensor]], what: str) -> list[torch.Tensor]:
    clips = list(videos)
    for clip in clips:
        if clip.ndim != 4 or clip.shape[1] != 3:
            raise ValueError(f"expected {what} as [T, 3, H, W] each (or [B, T, 3, H, W]), got {tuple(clip.shape)}")
    return clips


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[..., 3, H, W]`` in [0, 1] -> uint8 ``[..., H, W, 3]``."""
    image = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return image.movedim(-3, -1).numpy()


def sample_grid(
    videos: Union[torch.Tensor, Sequence[torch.Tensor]],
    path: Union[str, Path, None] = None,
    frames: int = 4,
    references: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    targets: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    labels: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """A picture of sampled clips: one row per clip, holding its reference image (if given), ``frames`` evenly
    spaced generated frames (first and last included), and the same frames of the ground truth (if given); the
    groups and the rows are separated by :data:`SEPARATOR` white pixels, and labels (if given) are written in a
    white band on the left.

    Args:
        videos: ``[B, T, 3, H, W]`` or a list of ``[T, 3, H, W]`` in [0, 1], all of one size (T may differ).
        path: a png to write (atomically), or None to only return the picture.
        frames (int): generated frames per row, at most the shortest clip's T.
        references: ``[B, 3, H, W]`` or a list of ``[3, H, W]``, the videos' size.
        targets: the ground truth, each of its video's shape.
        labels (Sequence[str] | None): one per row (e.g. the clip ids).

    Returns:
        np.ndarray: the picture, uint8 ``[rows·H + gaps, width, 3]``.
    """
    clips = _as_clips(videos, "videos")
    if not clips:
        raise ValueError("sample_grid needs at least one video")
    height, width = clips[0].shape[-2:]
    for clip in clips:
        if clip.shape[-2:] != (height, width):
            raise ValueError(f"videos differ in size: {tuple(clips[0].shape[-2:])} and {tuple(clip.shape[-2:])}")
    shortest = min(clip.shape[0] for clip in clips)
    if not 1 <= frames <= shortest:
        raise ValueError(f"frames must be between 1 and the shortest clip's {shortest}, got {frames}")
    if references is not None:
        references = list(references)
        if len(references) != len(clips) or any(ref.shape != (3, height, width) for ref in references):
            raise ValueError(
                f"expected {len(clips)} references [3, {height}, {width}], got {[tuple(r.shape) for r in references]}"
            )
    if targets is not None:
        targets = _as_clips(targets, "targets")
        if len(targets) != len(clips) or any(t.shape != c.shape for t, c in zip(targets, clips)):
            raise ValueError(
                f"expected one target per video, of its shape; got {[tuple(t.shape) for t in targets]} for "
                f"{[tuple(c.shape) for c in clips]}"
            )
    if labels is not None and len(labels) != len(clips):
        raise ValueError(f"expected {len(clips)} labels, got {len(labels)}")
    if labels is not None:  # an id of any length must not make the picture as wide
        labels = [_short_label(label) for label in labels]

    groups = ([1] if references is not None else []) + [frames] + ([frames] if targets is not None else [])
    label_width = _label_width(labels) if labels is not None else 0
    grid_width = label_width + sum(groups) * width + (len(groups) - 1) * SEPARATOR
    grid_height = len(clips) * height + (len(clips) - 1) * SEPARATOR
    grid = np.full((grid_height, grid_width, 3), 255, dtype=np.uint8)
    for row, clip in enumerate(clips):
        top = row * (height + SEPARATOR)
        # Evenly spaced from the first frame to the last, rounded to the nearest.
        index = torch.linspace(0, clip.shape[0] - 1, frames).round().long()
        pieces = []
        if references is not None:
            pieces.append(_to_uint8(references[row])[None])
        pieces.append(_to_uint8(clip[index]))
        if targets is not None:
            pieces.append(_to_uint8(targets[row][index]))
        left = label_width
        for piece in pieces:
            strip = np.concatenate(list(piece), axis=1)  # the group's frames side by side
            grid[top : top + height, left : left + strip.shape[1]] = strip
            left += strip.shape[1] + SEPARATOR
    if labels is not None:
        _draw_labels(grid, labels, height)
    if path is not None:
        media.write_image(path, grid)
    return grid


LABEL_PADDING = 3
"""Pixels of white around a label."""
LABEL_CHARS = 32
"""The most characters of a label drawn; a longer one is cut, with ``...``."""


def _short_label(label) -> str:
    text = "".join(char if char.isprintable() else "?" for char in str(label)[: LABEL_CHARS + 1])
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 3] + "..."


def _label_width(labels: Sequence[str]) -> int:
    font = ImageFont.load_default()
    return max(int(np.ceil(font.getlength(str(label)))) for label in labels) + 2 * LABEL_PADDING


def _draw_labels(grid: np.ndarray, labels: Sequence[str], height: int) -> None:
    image = Image.fromarray(grid)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for row, label in enumerate(labels):
        _, text_top, _, text_bottom = draw.textbbox((0, 0), str(label), font=font)
        top = row * (height + SEPARATOR) + (height - (text_bottom + text_top)) // 2
        draw.text((LABEL_PADDING, top), str(label), fill=(0, 0, 0), font=font)
    grid[...] = np.asarray(image)


# --- what validation and ``prefalign test`` write -------------------------------------------------------------------
def log_image(loggers: list, tag: str, image, step: int) -> None:
    """An ``[H, W, 3]`` uint8 picture to every logger that takes pictures (TensorBoard, Weights & Biases)."""
    for logger in loggers:
        experiment = logger.experiment
        if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
            experiment.add_image(tag, image, step, dataformats="HWC")
        elif hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key=tag, images=[image], step=step)


def log_samples(loggers: list, log_dir: Optional[str], step: int, video: torch.Tensor, batch: dict, fps: float,
                sample_rate: int) -> None:
    """Validation samples: a grid image to the loggers that take pictures, and the videos (with their audio) as mp4
    files in ``samples/step_N/`` of the log folder (one per clip id)."""
    grid = sample_grid(video.cpu(), references=batch["reference"].cpu(), targets=batch["video"].cpu(),
                       labels=batch["id"])
    log_image(loggers, "val/samples", grid, step)
    if log_dir is None:
        return
    folder = inside(log_dir, "samples", f"step_{step:06d}")
    # Validation rows may repeat an id (a pairs manifest judges one clip several times): one video per id.
    first: dict[str, int] = {}
    for index, clip_id in enumerate(batch["id"]):
        first.setdefault(clip_id, index)
    keep = list(first.values())
    media.write_clips(folder, video[keep], [batch["id"][i] for i in keep], fps, batch["audio"][keep], sample_rate)


def add_test_clips(table: EvaluationTable, out: Path, video: torch.Tensor, batch: dict, scores: dict, fps: float,
                   sample_rate: int, grid: bool = False) -> None:
    """A ``prefalign test`` batch: its videos to ``out/videos``, its rows to ``table`` (each naming its video's
    file: an id is not always its file's name, see ``files.safe_name``), and with ``grid`` ``out/samples.png``."""
    files = media.write_clips(inside(out, "videos"), video, batch["id"], fps, batch["audio"], sample_rate)
    table.add(batch["id"], scores, videos=[path.relative_to(out).as_posix() for path in files])
    if grid:
        sample_grid(video[:8].cpu(), out / "samples.png", references=batch["reference"][:8].cpu(),
                    targets=batch["video"][:8].cpu() if "video" in batch else None, labels=batch["id"][:8])


def write_table(table: EvaluationTable, out: Path, crop_source: Optional[str] = None) -> None:
    """Write the gathered table to ``out`` and print its summary (and where SyncNet's crops came from)."""
    if crop_source is not None:
        print(f"  SyncNet's crops came from: {crop_source}")
    table.write(out)
    print(f"evaluation of {len(table.rows())} clips written to {out}")
    if table.repeated_ids:
        print(f"  {table.repeated_ids} rows repeated a clip id already in the table and were left out "
              "(DistributedSampler pads ranks with repeated clips; or the manifest repeats ids)")
    for name, stats in table.summary().items():
        print(f"  {name:<20} {stats['mean']!r:>24} ± {stats['std']!r} (n={stats['count']})")
