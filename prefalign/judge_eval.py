"""Judge calibration (``prefalign judge-eval``): how far a judge's scores agree with human preference labels, and
what it costs, before it becomes a GRPO reward.

Every distinct video of a labels manifest (the jsonl ``prefalign labels`` reads) is scored once by the judge, in
batches. Per human aspect mapped to a judge term the report gives:

- ``agreement``: over the pairs humans did not call a tie and the judge scored both videos of, the fraction where
  ``sign(score_a - score_b)`` is the human's preference; a judge tie (equal scores) does not agree, and is counted
  in ``judge_ties``. ``pairs`` counts the labelled pairs, ``human_ties`` the ties among them (left out of the
  agreement), ``dropped`` those with a non-finite (NaN: dropped) score for either video (ties included);
- ``kendall_tau``: Kendall's tau-b between the human label (+1 a, -1 b, 0 tie) and ``score_a - score_b`` over every
  pair with finite scores, ties of either side included;
- ``position_bias``: ``null`` for a pointwise judge, which scores each video alone. A pairwise judge has a method
  ``compare(videos_a, videos_b, cond) -> {term: Tensor[B]}``, its preference for the *first* video: positive
  prefers the first, negative the second, 0 neither. It is asked for (a, b) and for (b, a); ``position_bias`` is the
  fraction of the pairs with both answers finite where it prefers the same position both times;
- ``failure_rate``: the judge's ``stats["failures"]`` counted while scoring, per video scored; ``requests_per_s``:
  its ``stats["requests"]`` per second spent in its ``score`` calls, decoding left out (``null`` where the judge
  keeps no ``stats``). Both are the judge's, the same in every row.

With ``--synth`` (a TalkingShapes manifest from ``prefalign synth --rejected ...``) the clips and rejected clips are
scored too, and ``spearman_sync`` is the Spearman correlation of the judge's lip sync term with the true sync
(:func:`prefalign.metrics.sync_score`) over those videos.
"""

from __future__ import annotations

import csv
import json
import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from prefalign import metrics
from prefalign.data import media
from prefalign.data.errors import DataError
from prefalign.data.schema import Manifest
from prefalign.files import atomic_write
from prefalign.pairs import _read_label_rows, check_label_row, row_votes
from prefalign.rewards.base import Reward
from prefalign.secrets import redact

#: A labels manifest larger than this is refused before it is read: a million judgements of ~300 bytes each.
MAX_LABELS_BYTES = 256 * 2**20
#: Human aspects (``prefalign labels``' columns) and the judge aspect each is matched to when ``--aspects`` is not
#: given and the judge has no term of the human aspect's own name.
DEFAULT_ASPECTS = {"lip_sync": "lip_sync", "expression": "expressiveness", "motion": "motion_quality"}
#: Label columns that are no aspect.
NOT_ASPECTS = ("id", "video_a", "video_b", "audio", "reference", "pose", "text")
#: The columns of the table (``judge_eval.csv``, the rows of ``judge_eval.json``), one row per aspect.
COLUMNS = ("aspect", "judge_term", "pairs", "human_ties", "judge_ties", "dropped", "agreement", "kendall_tau",
           "position_bias", "failure_rate", "requests_per_s")
CHANCE = 0.5


# --- the statistics: pure functions of arrays -------------------------------------------------------------------------
def kendall_tau_b(x: Iterable[float], y: Iterable[float]) -> float:
    """Kendall's tau-b: ``(concordant - discordant) / sqrt((n0 - n1) (n0 - n2))``, ``n0 = n (n - 1) / 2`` pairs,
    ``n1`` and ``n2`` the pairs tied in ``x`` and in ``y`` (Kendall 1945, "The treatment of ties in ranking problems").

    Args:
        x (array-like): ``[n]`` finite values.
        y (array-like): ``[n]`` finite values.

    Returns:
        float: in [-1, 1]; NaN for fewer than 2 values or when either side is constant (no untied pair).

    Runs in ``O(k n log n)`` for ``k`` distinct values on the side with fewer of them (3 for human labels).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-d of one length; got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite: leave out the pairs without a score")
    n = x.size
    if n < 2:
        return math.nan
    if np.unique(y).size < np.unique(x).size:  # tau-b is symmetric: group on the side with fewer values
        x, y = y, x
    signed = 0
    lower = np.empty(0)  # sorted y of the elements with a smaller x than the current group
    for value in np.unique(x):
        group = np.sort(y[x == value])
        below = np.searchsorted(lower, group, side="left")  # earlier y strictly below: concordant
        above = lower.size - np.searchsorted(lower, group, side="right")  # strictly above: discordant
        signed += int(below.sum()) - int(above.sum())
        lower = np.sort(np.concatenate([lower, group]))
    total = n * (n - 1) // 2
    tied_x, tied_y = (sum(t * (t - 1) // 2 for t in np.unique(v, return_counts=True)[1].tolist()) for v in (x, y))
    denominator = math.sqrt((total - tied_x) * (total - tied_y))
    return signed / denominator if denominator > 0 else math.nan


def average_ranks(values: Iterable[float]) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (``[1, 2, 2, 3] -> [1, 2.5, 2.5, 4]``)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ordered)) + 1])
    ends = np.concatenate([starts[1:], [values.size]])
    ranks = np.empty(values.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def spearman(x: Iterable[float], y: Iterable[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (ties share their mean rank).

    Returns:
        float: in [-1, 1]; NaN for fewer than 2 values or when either side is constant.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-d of one length; got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    if x.size < 2:
        return math.nan
    rx, ry = average_ranks(x) - (x.size + 1) / 2, average_ranks(y) - (y.size + 1) / 2
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(np.clip(rx @ ry / denominator, -1.0, 1.0)) if denominator > 0 else math.nan


def agreement_stats(human: Iterable[int], score_a: Iterable[float], score_b: Iterable[float]) -> dict:
    """How a judge's scores of pairs agree with the humans' preferences (see the module's docstring).

    Args:
        human (array-like): ``[n]`` +1 (a is better), -1 (b is better), 0 (a tie).
        score_a (array-like): ``[n]`` the judge's scores of the first videos; NaN where it dropped one.
        score_b (array-like): ``[n]`` of the second videos.

    Returns:
        dict: ``pairs``, ``human_ties``, ``judge_ties``, ``dropped``, ``agreement`` and ``kendall_tau`` (``None``
        where no pair decides them).
    """
    human = np.asarray(human, dtype=np.float64)
    score_a, score_b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    finite = np.isfinite(score_a) & np.isfinite(score_b)
    difference = np.where(finite, score_a - score_b, 0.0)
    compared = finite & (human != 0)
    agreeing = compared & (np.sign(difference) == human)
    tau = kendall_tau_b(human[finite], difference[finite])
    return {
        "pairs": int(human.size),
        "human_ties": int((human == 0).sum()),
        "judge_ties": int((compared & (difference == 0)).sum()),
        "dropped": int((~finite).sum()),
        "agreement": float(agreeing.sum() / compared.sum()) if compared.any() else None,
        "kendall_tau": None if math.isnan(tau) else tau,
    }


def position_bias_rate(forward: Iterable[float], backward: Iterable[float]) -> Optional[float]:
    """The fraction of pairs a pairwise judge prefers the same position of both times, (a, b) and (b, a).

    Args:
        forward (array-like): ``[n]`` its preference for the first video, asked (a, b); NaN where it gave none.
        backward (array-like): ``[n]`` asked (b, a).

    Returns:
        float | None: over the pairs with both answers finite (``None`` if none); a "no preference" (0) either time
        is no bias.
    """
    forward, backward = np.asarray(forward, dtype=np.float64), np.asarray(backward, dtype=np.float64)
    finite = np.isfinite(forward) & np.isfinite(backward)
    if not finite.any():
        return None
    same = (np.sign(forward) == np.sign(backward)) & (forward != 0)
    return float((same & finite).sum() / finite.sum())


# --- the labels -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Video:
    """A video and the conditions it is scored for (absolute paths, as normalised file names): one judge score each."""

    video: str
    audio: Optional[str] = None
    reference: Optional[str] = None
    pose: Optional[str] = None
    text: Optional[str] = None


@dataclass
class LabelledPair:
    """One judgement of the labels manifest: its line, the two videos and the human vote per mapped aspect."""

    line: int
    a: Video
    b: Video
    votes: dict[str, int]


def read_label_rows(labels: str) -> list[tuple[int, dict]]:
    """The rows of a labels manifest with their line numbers (``prefalign.pairs``' reader), after refusing a file
    that is not a regular one (a fifo would block) or is over ``MAX_LABELS_BYTES``."""
    try:
        status = os.stat(labels)
    except FileNotFoundError:
        raise DataError("labels manifest not found", path=labels) from None
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the name
        raise DataError(f"cannot read the labels manifest ({error})", path=labels) from None
    if not stat.S_ISREG(status.st_mode):
        raise DataError("the labels manifest is not a regular file", path=labels)
    size = status.st_size
    if size > MAX_LABELS_BYTES:
        raise DataError(f"the file is {size} bytes, above the limit of {MAX_LABELS_BYTES} (MAX_LABELS_BYTES)",
                        path=labels)
    return _read_label_rows(labels)


def _judge_terms(judge: Reward) -> tuple[Optional[list[str]], dict[str, str]]:
    """The judge's score terms (``None`` where it does not say before scoring) and its term per aspect."""
    terms = getattr(judge, "aspect_terms", None)
    terms = None if terms is None else [str(term) for term in terms]
    aspects = getattr(judge, "aspects", None)
    own = dict(zip(aspects, terms)) if terms is not None and aspects is not None else {}
    return terms, own


def resolve_aspects(aspects: Optional[dict[str, str]], numbered: list[tuple[int, dict]], judge: Reward,
                    labels: str) -> dict[str, str]:
    """Which judge term each human aspect is compared with.

    Args:
        aspects (dict | None): ``{human aspect: judge term}``; ``None`` matches each aspect column ``X`` of the
            labels to the judge's term ``judge/X`` (or the term of its aspect ``X``), else per ``DEFAULT_ASPECTS``
            (``expression`` to ``judge/expressiveness``, ``motion`` to ``judge/motion_quality``).
        numbered (list): the labels' rows with their line numbers.
        judge (Reward): the judge; its ``aspect_terms`` are the terms it gives.
        labels (str): the labels manifest (named in errors).

    Raises:
        DataError: an aspect no row of the labels has.
        ValueError: a term the judge does not give (the error lists those it gives), or no aspect matched.
    """
    terms, own = _judge_terms(judge)
    columns = list(dict.fromkeys(column for _, row in numbered for column in row if column not in NOT_ASPECTS))
    if aspects is None:
        if terms is None:
            raise ValueError(f"{type(judge).__name__} does not list its terms (no aspect_terms): give --aspects, "
                             "e.g. --aspects '{\"lip_sync\": \"sync\"}'")
        mapping = {}
        for column in columns:
            default = DEFAULT_ASPECTS.get(column)
            candidates = [f"judge/{column}", own.get(column)]
            candidates += [f"judge/{default}", own.get(default)] if default else []
            found = [term for term in candidates if term is not None and term in terms]
            if found:
                mapping[column] = found[0]
        if not mapping:
            raise ValueError(f"no aspect of {labels} ({columns}) matches a term of {type(judge).__name__} "
                             f"({terms}): map them with --aspects, e.g. --aspects '{{\"lip_sync\": \"{terms[0]}\"}}'")
        return mapping
    if not isinstance(aspects, dict) or not aspects:
        raise ValueError(f"--aspects must map human aspects to judge terms, e.g. {{\"lip_sync\": \"judge/lip_sync\"}}; "
                         f"got {aspects!r}")
    for aspect, term in aspects.items():
        if aspect in NOT_ASPECTS:
            raise ValueError(f"--aspects: '{aspect}' is a column of the labels' videos and conditions, not an aspect")
        if aspect not in columns:
            raise DataError(f"no row labels the aspect '{aspect}' (given in --aspects); the labels' aspects are "
                            f"{columns}", path=labels, field=aspect)
        if terms is not None and term not in terms:
            raise ValueError(f"--aspects maps '{aspect}' to '{term}', which {type(judge).__name__} does not give; "
                             f"its terms are {terms}")
    return dict(aspects)


def _path(manifest: Manifest, value: Optional[str]) -> Optional[str]:
    """A media path made absolute against the manifest's folder and normalised, so that ``./a.mp4`` and ``a.mp4``
    are one video."""
    if value is None:
        return None
    path = manifest.resolve(value)
    return path if "://" in path else os.path.normpath(os.path.abspath(path))


def parse_labels(numbered: list[tuple[int, dict]], mapping: dict[str, str],
                 labels: str) -> tuple[list[LabelledPair], dict[Video, str]]:
    """The judgements of the mapped aspects, and the videos to score with where each was first named.

    Each row must name ``video_a`` and ``video_b``; ``audio``, ``reference``, ``pose`` and ``text`` are optional
    conditions shared by both videos; each mapped aspect is ``a``, ``b``, ``tie`` or absent (not judged). A row
    judging none of the mapped aspects is left out. Paths are relative to the labels' folder, as for
    ``prefalign labels``.

    Raises:
        DataError: a row without a video, a column that is no non-empty string, a vote that is not a, b or tie,
            or no row judging any mapped aspect; naming the file, the line and the field.
    """
    manifest = Manifest(source=labels, rows=[row for _, row in numbered], root=Path(labels).resolve().parent)
    pairs, videos = [], {}
    for number, row in numbered:
        check_label_row(row, number, labels)
        votes = row_votes(row, list(mapping), number, labels)
        if not votes:
            continue
        conditions = {column: _path(manifest, row.get(column)) for column in ("audio", "reference", "pose")}
        a, b = (Video(_path(manifest, row[column]), text=row.get("text"), **conditions)
                for column in ("video_a", "video_b"))
        for video, column in ((a, "video_a"), (b, "video_b")):
            videos.setdefault(video, f"named by line {number} ('{column}') of {labels}")
        pairs.append(LabelledPair(number, a, b, votes))
    if not pairs:
        raise DataError(f"no row judges any of the aspects {list(mapping)}", path=labels, field=next(iter(mapping)))
    return pairs, videos


def read_synth(synth: str) -> dict[Video, str]:
    """The clips and rejected clips of a TalkingShapes manifest (``prefalign synth --rejected``), each with its
    row's conditions, and where each is named."""
    from prefalign.data.schema import load_manifest

    manifest = load_manifest(synth)
    videos = {}
    for index, row in enumerate(manifest.rows):
        if not row.get("video"):
            raise DataError(f"row {index} has no 'video': a --synth manifest holds clips", path=synth, field="video")
        conditions = {column: _path(manifest, row.get(column)) for column in ("audio", "reference", "pose")}
        text = row.get("text") if isinstance(row.get("text"), str) and row["text"].strip() else None
        for column in ("video", "rejected"):
            if row.get(column):
                videos.setdefault(Video(_path(manifest, row[column]), text=text, **conditions),
                                  f"named by row {index} ('{column}') of {synth}")
    return videos


# --- scoring ----------------------------------------------------------------------------------------------------------
@dataclass
class Decoding:
    """How videos and their conditions are decoded, as the data module does it."""

    sample_rate: int
    fps: float
    num_frames: Optional[int]
    device: torch.device

    def __call__(self, video: Video, where: str) -> dict:
        """``video [T, 3, H, W]``, ``audio [S]``, ``reference [3, H, W]``, ``pose`` and ``text`` where given; the
        first ``num_frames`` frames (and their audio and pose) where it caps them."""
        from prefalign.data.datamodule import ClipDataset

        row = {"id": where, "video": video.video}
        row.update({column: getattr(video, column) for column in ("audio", "reference", "pose")
                    if getattr(video, column)})
        dataset = ClipDataset(Manifest(source=where, rows=[row], root=None), [0], self.sample_rate, self.fps,
                              num_frames=None, random_crop=False, on_bad_sample="raise", resample_audio=True)
        try:
            clip = dataset.load(row, 0)
        except DataError as error:
            raise DataError(f"{error.message} ({where})", path=error.path, field=error.field) from None
        if self.num_frames is not None and clip["video"].shape[0] > self.num_frames:
            clip["video"] = clip["video"][: self.num_frames]
            clip["audio"] = clip["audio"][: round(self.num_frames * self.sample_rate / self.fps)]
            if "pose" in clip:
                clip["pose"] = clip["pose"][: self.num_frames]
        if video.text is not None:
            clip["text"] = video.text
        return clip


def _shape(clip: dict) -> tuple:
    """What must match for clips to share a batch."""
    pose = tuple(clip["pose"].shape[1:]) if "pose" in clip else None
    return tuple(clip["video"].shape), tuple(clip["audio"].shape), pose, "text" in clip


def _batches(units: Iterable, decode: Callable, shape: Callable, batch_size: int) -> Iterator[list[tuple]]:
    """``(unit, decoded)`` in batches of at most ``batch_size`` of one shape, decoding as they fill. A batch is
    yielded as soon as it is full, and the fullest one as soon as ``batch_size`` clips wait in all of them (clips of
    many shapes then go in smaller batches): at most ``batch_size`` decoded clips are held at a time."""
    buckets: dict[tuple, list] = {}
    waiting = 0
    for unit in units:
        decoded = decode(unit)
        key = shape(decoded)
        buckets.setdefault(key, []).append((unit, decoded))
        waiting += 1
        if waiting >= batch_size:
            fullest = max(buckets, key=lambda k: len(buckets[k]))
            batch = buckets.pop(fullest)
            waiting -= len(batch)
            yield batch
    yield from buckets.values()


def _stack(clips: list[dict], device: torch.device) -> tuple[torch.Tensor, dict]:
    """The videos ``[B, T, 3, H, W]`` and their ``cond``: ``audio [B, S]``, ``reference [B, 3, H, W]``, ``pose``,
    ``text`` (a list of str) where the clips have them."""
    videos = torch.stack([clip["video"] for clip in clips]).to(device)
    cond = {name: torch.stack([clip[name] for clip in clips]).to(device) for name in ("audio", "reference")}
    if "pose" in clips[0]:
        cond["pose"] = torch.stack([clip["pose"] for clip in clips]).to(device)
    if "text" in clips[0]:
        cond["text"] = [clip["text"] for clip in clips]
    return videos, cond


def _terms(result: object, names: list[str], size: int, judge: Reward, call: str) -> dict[str, np.ndarray]:
    """The named terms of a judge's answer, as float arrays ``[size]``; a missing or misshapen term is an error."""
    name = type(judge).__name__
    if not isinstance(result, dict):
        raise TypeError(f"{name}.{call} returned {type(result).__name__}, not a dict of terms")
    missing = [term for term in names if term not in result]
    if missing:
        raise ValueError(f"{name}.{call} gave no term {missing}; its terms are {sorted(result)} "
                         "(map the labels' aspects to them with --aspects)")
    arrays = {}
    for term in names:
        value = torch.as_tensor(result[term]).detach().float().cpu()
        if tuple(value.shape) != (size,):
            raise ValueError(f"{name}.{call} gave term '{term}' of shape {tuple(value.shape)} for {size} videos; "
                             f"expected [{size}]")
        arrays[term] = value.numpy()
    return arrays


def _stats(judge: Reward) -> Optional[dict]:
    stats = getattr(judge, "stats", None)
    return dict(stats) if isinstance(stats, dict) else None


@dataclass
class Scores:
    """What scoring every video gave: the needed terms per video, the true sync of the ``--synth`` videos, the
    seconds spent in ``score`` and the judge's counts over them."""

    terms: dict[Video, dict[str, float]]
    sync: dict[Video, float]
    seconds: float
    """In the judge's ``score`` calls."""
    wall_seconds: float
    """Of the whole scoring, decoding included."""
    requests: Optional[int]
    failures: Optional[int]

    @property
    def failure_rate(self) -> Optional[float]:
        """Failures per video scored; ``None`` where the judge keeps no ``stats``."""
        return None if self.failures is None else self.failures / len(self.terms)

    @property
    def requests_per_s(self) -> Optional[float]:
        """Requests per second spent in ``score``; ``None`` where the judge keeps no ``stats`` or no time passed."""
        if self.requests is None:
            return None
        return self.requests / self.seconds if self.seconds > 0 else None


def score_videos(judge: Reward, videos: dict[Video, str], terms: list[str], decode: Decoding, batch_size: int,
                 truth: Iterable[Video] = ()) -> Scores:
    """Score each video once with its conditions, ``batch_size`` videos of one shape per ``score`` call, timing the
    calls; the true sync (:func:`prefalign.metrics.sync_score`) of the ``truth`` videos too."""
    truth = set(truth)
    before = _stats(judge)
    scores, sync, seconds, started = {}, {}, 0.0, time.perf_counter()
    for batch in _batches(videos, lambda video: decode(video, videos[video]), _shape, batch_size):
        units = [unit for unit, _ in batch]
        clips_videos, cond = _stack([clip for _, clip in batch], decode.device)
        start = time.perf_counter()
        with torch.no_grad():
            result = judge.score(clips_videos, cond)
            arrays = _terms(result, terms, len(units), judge, "score")
        seconds += time.perf_counter() - start
        for index, video in enumerate(units):
            scores[video] = {term: float(values[index]) for term, values in arrays.items()}
        if truth.intersection(units):
            true_sync = metrics.sync_score(clips_videos, cond["audio"], decode.sample_rate, decode.fps).cpu()
            sync.update({video: float(true_sync[i]) for i, video in enumerate(units) if video in truth})
    after, wall_seconds = _stats(judge), time.perf_counter() - started

    def delta(key: str) -> Optional[int]:
        if before is None or after is None:
            return None
        return int(after.get(key, 0) - before.get(key, 0))

    return Scores(scores, sync, seconds, wall_seconds, delta("requests"), delta("failures"))


def compare_pairs(judge: Reward, pairs: list[LabelledPair], videos: dict[Video, str], terms: list[str],
                  decode: Decoding, batch_size: int) -> dict[int, dict[str, tuple[float, float]]]:
    """A pairwise judge's preference for the first video asked (a, b) and asked (b, a), per pair (by index) and
    term. The pair's conditions are those of ``video_a`` (its first frame where the row gives no reference)."""

    def decode_pair(index: int) -> tuple[dict, dict]:
        pair = pairs[index]
        return decode(pair.a, videos[pair.a]), decode(pair.b, videos[pair.b])

    answers = {}
    for batch in _batches(range(len(pairs)), decode_pair, lambda both: (_shape(both[0]), _shape(both[1])), batch_size):
        indices = [index for index, _ in batch]
        videos_a, cond = _stack([a for _, (a, _) in batch], decode.device)
        videos_b, _ = _stack([b for _, (_, b) in batch], decode.device)
        with torch.no_grad():
            forward = _terms(judge.compare(videos_a, videos_b, cond), terms, len(indices), judge, "compare")
            backward = _terms(judge.compare(videos_b, videos_a, cond), terms, len(indices), judge, "compare")
        for row, index in enumerate(indices):
            answers[index] = {term: (float(forward[term][row]), float(backward[term][row])) for term in terms}
    return answers


# --- the report -------------------------------------------------------------------------------------------------------
def _none_if_nan(value: Optional[float]) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else value


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict]) -> str:
    """The table as aligned text, one line per aspect (``-`` where a value is undefined)."""
    cells = [list(COLUMNS)] + [[_cell(row[column]) for column in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def write_csv(rows: list[dict], path: Path) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({column: "" if row[column] is None else row[column] for column in COLUMNS} for row in rows)


def plot_report(rows: list[dict], path: Path, title: str) -> None:
    """Agreement and Kendall's tau per aspect as grouped bars, with the chance line (0.5) of the agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(rows) + 2), 4), constrained_layout=True)
    positions = np.arange(len(rows))
    width = 0.38
    bars = ((-width / 2, "agreement", "agreement"), (width / 2, "kendall_tau", "Kendall's tau-b"))
    for offset, column, label in bars:
        values = [row[column] for row in rows]
        heights = [math.nan if value is None else value for value in values]
        ax.bar(positions + offset, heights, width, label=label)
        for x, value in zip(positions + offset, values):
            text, y = ("n/a", 0.02) if value is None else (f"{value:.2f}", value + (0.02 if value >= 0 else -0.08))
            ax.text(x, y, text, ha="center", fontsize=8)
    ax.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label="chance (agreement)")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(positions, [f"{row['aspect']}\n({row['judge_term']})" for row in rows])
    ax.set_ylim(-1.05, 1.1)
    ax.set_ylabel("agreement with humans")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"--{name} must be an integer >= {low}; got {value!r}")


def judge_eval_command(
    labels: str,
    judge: Reward,
    out: str,
    aspects: Optional[dict[str, str]] = None,
    batch_size: int = 4,
    sample_rate: int = 16000,
    fps: float = 25.0,
    num_frames: Optional[int] = None,
    synth: Optional[str] = None,
    device: Optional[str] = None,
) -> Path:
    """Calibrate a judge against human preference labels, before it becomes a reward.

    Per aspect: agreement with the humans, Kendall's tau-b, position bias, failure rate and throughput, written to
    ``judge_eval.csv``, ``judge_eval.json`` and ``judge_eval.png`` and printed. Every distinct video (with its
    conditions) is scored once. See ``prefalign.judge_eval`` for what each column means.

    Args:
        labels: human judgements (jsonl, as ``prefalign labels`` reads): ``video_a``, ``video_b``, the shared
            ``audio``, ``reference``, optional ``pose``, ``text``, and per aspect ``a``, ``b`` or ``tie``. Paths are
            relative to the file's folder.
        judge: the judge (a Reward: ``class_path`` and ``init_args``, or a YAML file of them).
        out: folder for judge_eval.csv, judge_eval.json and judge_eval.png.
        aspects: human aspect to judge term, e.g. ``{"lip_sync": "judge/lip_sync"}``; default: each aspect ``X`` to
            the judge's ``judge/X``, and lip_sync, expression, motion to judge/lip_sync, judge/expressiveness,
            judge/motion_quality.
        batch_size: videos per score call.
        sample_rate: audio rate the judge gets (other rates are resampled).
        fps: the videos' frame rate (a video at another rate is an error).
        num_frames: score only the first frames of each video (and their audio); default: whole videos (at most
            media.MAX_FRAMES).
        synth: a TalkingShapes manifest (``prefalign synth --rejected ...``): also score its clips and rejected
            clips and report the Spearman correlation of the judge's lip sync term with the true sync.
        device: where videos and conditions go (a judge's model runs on the videos' device); default: ``cuda``
            when there is one.

    Returns:
        Path: the JSON report.
    """
    target = _check_options(judge, batch_size, sample_rate, fps, num_frames, device)
    numbered = read_label_rows(labels)
    mapping = resolve_aspects(aspects, numbered, judge, labels)
    pairs, videos = parse_labels(numbered, mapping, labels)
    sync_term = None
    truth: dict[Video, str] = {}
    if synth is not None:
        sync_term = _sync_term(judge, mapping)
        truth = read_synth(synth)
        for video, where in truth.items():
            videos.setdefault(video, where)
    _check_files(videos)  # every file is there before the first (maybe paid) request

    needed = list(dict.fromkeys([*mapping.values(), *([sync_term] if sync_term else [])]))
    decode = Decoding(sample_rate, float(fps), num_frames, target)
    scored = score_videos(judge, videos, needed, decode, batch_size, truth=truth)
    pairwise = callable(getattr(judge, "compare", None))
    answers = compare_pairs(judge, pairs, videos, list(mapping.values()), decode, batch_size) if pairwise else None
    rows = _aspect_rows(mapping, pairs, scored, answers)
    report = {
        "labels": str(Path(labels).resolve()),
        "judge": redact(repr(judge)),
        "judge_class": f"{type(judge).__module__}.{type(judge).__qualname__}",
        "judge_kind": "pairwise" if pairwise else "pointwise",
        "aspects": mapping,
        "rows": rows,
        "totals": _totals(scored, label_rows=len(numbered), pairs=len(pairs)),
    }
    if synth is not None:
        report.update(_synth_report(synth, truth, scored, sync_term))

    title = f"{type(judge).__name__} vs. human labels ({len(pairs)} pairs)"
    csv_path, json_path, png_path = _write_report(report, Path(out), title)
    _print_summary(report, type(judge).__name__)
    print(f"wrote {csv_path}, {json_path}, {png_path}")
    return json_path


def _check_options(judge: Reward, batch_size: int, sample_rate: int, fps: float, num_frames: Optional[int],
                   device: Optional[str]) -> torch.device:
    """Refuse options out of range and a judge that cannot score (a ``ValueError`` or ``TypeError`` naming the
    option); the device the videos go to."""
    _check_int("batch_size", batch_size, 1)
    _check_int("sample_rate", sample_rate, media.MIN_SAMPLE_RATE)
    if num_frames is not None:
        _check_int("num_frames", num_frames, 1)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"--fps must be a finite number > 0; got {fps!r}")
    if not callable(getattr(judge, "score", None)):
        raise TypeError(f"--judge must be a Reward (with a score method); got {type(judge).__name__}")
    try:
        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a device ({error})") from None


def _sync_term(judge: Reward, mapping: dict[str, str]) -> str:
    """The judge's lip sync term, which ``--synth`` compares with the true sync: the one ``lip_sync`` is mapped to,
    else the judge's own, else ``judge/lip_sync``, the first the judge has."""
    terms, own = _judge_terms(judge)
    candidates = [mapping.get("lip_sync"), own.get("lip_sync"), "judge/lip_sync"]
    sync_term = next((t for t in candidates if t is not None and (terms is None or t in terms)), None)
    if sync_term is None:
        raise ValueError(f"--synth compares the judge's lip sync term with the true sync, and "
                         f"{type(judge).__name__} has none among {terms}: map it with --aspects "
                         "'{\"lip_sync\": \"<term>\"}'")
    return sync_term


def _check_files(videos: dict[Video, str]) -> None:
    """Every file a video names (the video and its conditions) is there: a ``DataError`` naming it and the row that
    names it otherwise."""
    for video, where in videos.items():
        for column in ("video", "audio", "reference", "pose"):
            path = getattr(video, column)
            if path is not None:
                try:
                    media.check_file(path, column)
                except DataError as error:
                    raise DataError(f"{error.message} ({where})", path=error.path, field=error.field) from None


def _aspect_rows(mapping: dict[str, str], pairs: list[LabelledPair], scored: Scores,
                answers: Optional[dict[int, dict[str, tuple[float, float]]]]) -> list[dict]:
    """The table: per human aspect and the judge term mapped to it, the agreement statistics over the pairs judged
    on that aspect, the position bias (of a pairwise judge's ``answers``; ``None`` for a pointwise judge), and the
    judge's failure rate and throughput."""
    rows = []
    for aspect, term in mapping.items():
        judged = [(index, pair) for index, pair in enumerate(pairs) if aspect in pair.votes]
        stats = agreement_stats([pair.votes[aspect] for _, pair in judged],
                                [scored.terms[pair.a][term] for _, pair in judged],
                                [scored.terms[pair.b][term] for _, pair in judged])
        bias = None
        if answers is not None:
            bias = position_bias_rate([answers[index][term][0] for index, _ in judged],
                                      [answers[index][term][1] for index, _ in judged])
        rows.append({"aspect": aspect, "judge_term": term, **stats, "position_bias": bias,
                     "failure_rate": scored.failure_rate, "requests_per_s": scored.requests_per_s})
    return rows


def _totals(scored: Scores, label_rows: int, pairs: int) -> dict:
    """The report's ``totals``: what was read, what was scored, and what scoring took and cost."""
    count = len(scored.terms)
    return {
        "label_rows": label_rows,
        "pairs": pairs,
        "videos": count,
        "score_seconds": scored.seconds,
        "wall_seconds": scored.wall_seconds,
        "videos_per_s": count / scored.seconds if scored.seconds > 0 else None,
        "requests": scored.requests,
        "failures": scored.failures,
        "requests_per_s": scored.requests_per_s,
        "failure_rate": scored.failure_rate,
    }


def _synth_report(synth: str, truth: dict[Video, str], scored: Scores, sync_term: str) -> dict:
    """The report's ``--synth`` keys: the Spearman correlation of the judge's ``sync_term`` with the true sync over
    the ``truth`` videos it scored (finite), and how many it dropped."""
    finite = [video for video in truth if math.isfinite(scored.terms[video][sync_term])]
    rho = spearman([scored.terms[video][sync_term] for video in finite], [scored.sync[video] for video in finite])
    return dict(synth=str(Path(synth).resolve()), spearman_sync=_none_if_nan(rho), synth_term=sync_term,
                synth_videos=len(truth), synth_dropped=len(truth) - len(finite))


def _write_report(report: dict, out_dir: Path, title: str) -> tuple[Path, Path, Path]:
    """``judge_eval.csv`` (the table), ``judge_eval.json`` (the report) and ``judge_eval.png`` (the plot) in
    ``out_dir`` (created); their paths in that order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = out_dir / "judge_eval.csv", out_dir / "judge_eval.json", out_dir / "judge_eval.png"
    write_csv(report["rows"], csv_path)
    with atomic_write(json_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    plot_report(report["rows"], png_path, title)
    return csv_path, json_path, png_path


def _print_summary(report: dict, judge_name: str) -> None:
    """The table, the judge's speed and failures, and the ``--synth`` correlation, on stdout."""
    totals = report["totals"]
    print(format_table(report["rows"]))
    speed = f"{totals['videos_per_s']:.2f} videos/s" if totals["videos_per_s"] is not None else "- videos/s"
    rate = totals["requests_per_s"]
    requests = "" if rate is None else f", {totals['requests']} requests ({rate:.2f}/s)"
    failures = "" if totals["failures"] is None else f", {totals['failures']} failures"
    print(f"{report['judge_kind']} judge {judge_name}: {totals['videos']} videos scored in "
          f"{totals['score_seconds']:.2f} s ({speed}; {totals['wall_seconds']:.2f} s with decoding){requests}{failures}")
    if "synth" in report:
        rho, count = report["spearman_sync"], report["synth_videos"]
        print(f"spearman({report['synth_term']}, true sync) over {count - report['synth_dropped']} of {count} "
              f"--synth videos: {'-' if rho is None else f'{rho:.3f}'}")
