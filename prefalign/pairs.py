"""Preference-pair curation: the best and worst of N samples under a reward, or human labels, as a pairs manifest."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from prefalign.data import media
from prefalign.data.errors import DataError
from prefalign.denoisers.base import frames_of
from prefalign.files import atomic_write, inside, safe_name
from prefalign.rewards.base import Reward

if TYPE_CHECKING:
    from prefalign.data.datamodule import PortraitDataModule
    from prefalign.module import AlignmentModule

ASPECTS = ("lip_sync", "expression", "motion")
VOTES = {"a": 1, "b": -1, "tie": 0}


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _read_label_rows(labels: str) -> list[tuple[int, dict]]:
    """The rows of a judgement manifest (jsonl) with their line numbers; a file that is not UTF-8 JSON Lines of
    objects is a ``DataError`` naming the file and the line."""
    try:
        data = Path(labels).read_bytes()
    except FileNotFoundError:
        raise DataError("labels manifest not found", path=labels) from None
    except OSError as error:  # a directory, no permission, ...
        raise DataError(f"cannot read the labels manifest ({error})", path=labels) from None
    rows = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"line {number} is not UTF-8 text ({error}): save the file as UTF-8", path=labels) from None
        try:
            row = json.loads(text)
        except ValueError as error:
            raise DataError(f"line {number} is not valid JSON ({error})", path=labels) from None
        if not isinstance(row, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
            raise DataError(f"line {number} is {'null' if row is None else kind.get(type(row), type(row).__name__)}, "
                            "not a JSON object (a row)", path=labels)
        rows.append((number, row))
    if not rows:
        raise DataError("the labels manifest has no rows", path=labels)
    return rows


def sample_pairs(
    recipe: str,
    conditions: str,
    out: str,
    ckpt_path: Optional[str] = None,
    reward: Optional[Reward] = None,
    num_samples: int = 4,
    min_gap: float = 0.1,
    seed: int = 0,
    batch_size: int = 4,
    num_steps: Optional[int] = None,
    overrides: Optional[list[str]] = None,
) -> Path:
    """Sample ``num_samples`` videos per condition, score them, keep the best as chosen and the worst as rejected.

    Args:
        recipe: the recipe (config file) whose model samples (its ``model`` and ``data`` sections are used).
        conditions: manifest of conditions (``audio`` + ``reference``, or ``video``; ``pose`` is carried over).
        out: folder for the pair videos (``clips/<id>_chosen.mp4`` and ``_rejected.mp4``, the id made a file name by
            ``prefalign.files.safe_name``; ids must be unique) and ``pairs.jsonl``. Nothing is written outside it.
        ckpt_path: Lightning checkpoint to sample from (else the recipe's ``model.init_weights``).
        reward: how samples are scored (``class_path`` of a Reward); defaults to the TalkingShapes sync expert.
        num_samples: videos per condition (different initial noise each).
        min_gap: pairs whose best and worst scores differ by less are dropped (and counted).
        seed: seed of the first sample's noise; sample k uses ``seed + k``.
        batch_size: conditions per sampling batch.
        num_steps: sampler steps (defaults to the recipe's ``model.sampling.num_steps``).
        overrides: extra CLI arguments for the recipe, e.g. ``["--data.num_frames", "17"]``.

    Returns:
        Path: the pairs manifest, in the clip schema plus ``rejected`` and the scores.
    """
    from prefalign.rewards.sync import SyncExpert

    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 to make a pair, got {num_samples}")
    module, datamodule = _sampling_model(recipe, conditions, ckpt_path, batch_size, overrides or [])
    reward = reward or SyncExpert(sample_rate=datamodule.sample_rate, fps=datamodule.fps)
    manifest, _ = datamodule.split("predict")
    rows_by_id = {str(row.get("id", i)): row for i, row in enumerate(manifest.rows)}

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    inside(out_dir, "clips").mkdir(exist_ok=True)
    pairs, dropped = [], 0
    for batch in datamodule.predict_dataloader():
        if batch["size"] == 0:
            continue
        samples = _sample_and_score(module, reward, batch, num_samples, seed, num_steps)
        for i, clip_id in enumerate(batch["id"]):
            if samples.gap(i) < min_gap:
                dropped += 1
                continue
            row = rows_by_id[clip_id]
            record = _write_pair(samples, batch, i, out_dir, datamodule.fps, datamodule.sample_rate)
            for column in ("audio", "reference", "pose"):
                if row.get(column):
                    record[column] = str(Path(manifest.resolve(row[column])).resolve())
            record.update(samples.scores(i))
            pairs.append(record)
    if not pairs:
        raise ValueError(f"no pair kept: all {dropped} conditions had a score gap below min_gap={min_gap}")
    path = inside(out_dir, "pairs.jsonl")
    _write_manifest(path, pairs)
    print(f"{len(pairs)} pairs written to {path}; {dropped} conditions dropped (score gap < {min_gap})")
    return path


def _sampling_model(
    recipe: str, conditions: str, ckpt_path: Optional[str], batch_size: int, overrides: Sequence[str]
) -> tuple[AlignmentModule, PortraitDataModule]:
    """The recipe's model, with the weights of ``ckpt_path`` where given, in eval mode; and its data module, predicting
    ``conditions`` in batches of ``batch_size``."""
    # Imported here: building a model loads Lightning and diffusers (seconds), which the label commands never need.
    from prefalign.build import build_from_recipe
    from prefalign.checkpoints import check_checkpoint

    module, datamodule = build_from_recipe(
        recipe, ["--data.predict", conditions, "--data.eval_batch_size", str(batch_size), *overrides]
    )
    if ckpt_path is not None:
        check_checkpoint(ckpt_path, field="--ckpt_path")
        module.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"])
    module.eval()
    return module, datamodule


@dataclass
class _Samples:
    """The samples of one batch of conditions, with their rewards."""

    videos: list[torch.Tensor]
    """Per sample, the batch's videos ``[B, T, 3, H, W]`` in [0, 1]."""
    totals: torch.Tensor
    """``[N, B]``: the reward's total per sample and condition."""
    terms: list[dict[str, torch.Tensor]]
    """Per sample, the reward's terms (each ``[B]``)."""
    best: torch.Tensor = field(init=False)
    """``[B]``: which sample of each condition scored highest (the first of equals)."""
    worst: torch.Tensor = field(init=False)
    """``[B]``: which sample of each condition scored lowest (the first of equals)."""

    def __post_init__(self):
        self.best, self.worst = self.totals.argmax(dim=0), self.totals.argmin(dim=0)

    def gap(self, i: int) -> float:
        """How much better condition ``i``'s best sample scored than its worst."""
        return (self.totals[self.best[i], i] - self.totals[self.worst[i], i]).item()

    def scores(self, i: int) -> dict:
        """Condition ``i``'s pairs-manifest scores: the best and worst totals, and per term ``[best, worst]``."""
        best, worst = self.best[i], self.worst[i]
        return {
            "chosen_score": self.totals[best, i].item(),
            "rejected_score": self.totals[worst, i].item(),
            "scores": {name: [self.terms[best][name][i].item(), self.terms[worst][name][i].item()]
                       for name in self.terms[0]},
        }


def _sample_and_score(module: AlignmentModule, reward: Reward, batch: dict, num_samples: int, seed: int,
                      num_steps: Optional[int]) -> _Samples:
    """``num_samples`` videos of every condition of ``batch``, sample ``k`` from noise seed ``seed + k``, each scored
    by ``reward``."""
    num_frames = frames_of(batch)
    videos, totals, terms = [], [], []
    for k in range(num_samples):
        settings = replace(module.sampling, seed=seed + k, num_steps=num_steps or module.sampling.num_steps)
        video = module.generate(batch, num_frames, settings)
        total, parts = reward.total(video, batch)
        videos.append(video)
        totals.append(total)
        terms.append(parts)
    return _Samples(videos, torch.stack(totals), terms)


def _write_pair(samples: _Samples, batch: dict, i: int, out_dir: Path, fps: float, sample_rate: int) -> dict:
    """Condition ``i``'s best sample as ``clips/<id>_chosen.mp4`` and its worst as ``_rejected.mp4``, each with the
    condition's audio; the start of its pairs-manifest row, naming them (relative to ``out_dir``)."""
    clip_id = batch["id"][i]
    record = {"id": clip_id}
    for name, k in (("video", samples.best[i]), ("rejected", samples.worst[i])):
        role = "chosen" if name == "video" else "rejected"
        path = inside(out_dir, "clips", f"{safe_name(clip_id)}_{role}.mp4")
        frames = (samples.videos[k][i].permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()
        audio = batch["audio"][i].float().cpu().numpy()
        media.write_video(path, frames, fps, audio=audio, sample_rate=sample_rate)
        record[name] = path.relative_to(out_dir).as_posix()
    return record


def check_label_row(row: dict, number: int, labels: str) -> None:
    """A judgement row names ``video_a`` and ``video_b``; its paths and text are non-empty strings (``DataError``
    naming the file, the line and the field otherwise)."""
    for column in ("video_a", "video_b"):
        if not row.get(column):
            raise DataError(f"line {number} has no '{column}'", path=labels, field=column)
    for column in ("video_a", "video_b", "audio", "reference", "pose", "text"):
        value = row.get(column)
        if value is not None and not (isinstance(value, str) and value.strip()):
            what = "a file path" if column != "text" else "text"
            raise DataError(f"line {number}: '{column}' must be {what} (a non-empty string), got "
                            f"{json.dumps(value)[:80]}", path=labels, field=column)


def row_votes(row: dict, aspects: list[str], number: int, labels: str) -> dict[str, int]:
    """A row's votes on ``aspects`` (``a`` → 1, ``b`` → -1, ``tie`` → 0; an absent aspect is not judged)."""
    votes = {}
    for aspect in aspects:
        value = row.get(aspect)
        if value is None:
            continue
        if not isinstance(value, str) or value not in VOTES:  # a list or a dict is not even hashable
            raise DataError(f"line {number}: expected one of a, b, tie; got {json.dumps(value)[:80]}",
                            path=labels, field=aspect)
        votes[aspect] = VOTES[value]
    return votes


@dataclass
class Judgement:
    """One checked row of a judgement manifest."""

    file: str
    """The manifest it came from."""
    line: int
    """Its line (1-based)."""
    id: str
    """The pair id (the row's ``id``, else its 0-based row index)."""
    explicit_id: bool
    """Whether the row names its ``id`` (only such rows are matched across rows and files)."""
    votes: dict[str, int]
    """{aspect or ``overall``: 1 (a better), -1 (b better), 0 (tie)} for the aspects it judges."""
    paths: dict[str, str]
    """``video_a``, ``video_b`` and the conditions it names, made absolute against its manifest's folder."""
    text: Optional[str]
    annotator: Optional[str]
    order: Optional[tuple[str, str]]
    """Which video was shown left and right (``prefalign annotate`` records it), for the position-bias report."""


def _judgements(labels: str, aspects: list[str]) -> list[Judgement]:
    """Every row of a judgement manifest, checked (a ``DataError`` naming the file, the line and the field)."""
    from prefalign.data.schema import Manifest

    numbered = _read_label_rows(labels)
    manifest = Manifest(source=labels, rows=[row for _, row in numbered], root=Path(labels).resolve().parent)
    judgements = []
    for index, (number, row) in enumerate(numbered):
        check_label_row(row, number, labels)
        if row.get("id") is not None and not isinstance(row["id"], (str, int)):
            raise DataError(f"line {number}: 'id' must be a string or an integer, got {json.dumps(row['id'])[:80]}",
                            path=labels, field="id")
        votes = row_votes(row, aspects + ["overall"], number, labels)
        if not votes:
            raise DataError(f"line {number} judges none of {aspects + ['overall']}", path=labels, field=aspects[0])
        order = row.get("order")
        judgements.append(Judgement(
            file=labels, line=number, id=str(row.get("id", index)), explicit_id=row.get("id") is not None,
            votes=votes,
            paths={column: manifest.resolve(row[column]) for column in ("video_a", "video_b", "audio", "reference",
                                                                          "pose") if row.get(column)},
            text=row.get("text") or None,
            annotator=row["annotator"] if isinstance(row.get("annotator"), str) else None,
            order=tuple(order) if isinstance(order, list) and sorted(map(str, order)) == ["a", "b"] else None,
        ))
    return judgements


def _latest(judgements: list[Judgement]) -> tuple[list[Judgement], int]:
    """The judgements with an earlier row replaced by a later one of the same id and the same two videos (``prefalign
    annotate`` appends a changed answer as a new line), in the order of their last answer; and how many rows were
    replaced. Rows of one id on other videos (several pairs of one condition) are pairs of their own."""
    latest: dict[tuple, Judgement] = {}
    for number, judgement in enumerate(judgements):
        videos = frozenset(os.path.normpath(judgement.paths[column]) for column in ("video_a", "video_b"))
        key = (True, judgement.id, videos) if judgement.explicit_id else (False, str(number))
        latest.pop(key, None)
        latest[key] = judgement
    return list(latest.values()), len(judgements) - len(latest)


def _pair_record(judgement: Judgement, votes: dict[str, int], aspects: list[str]) -> Optional[dict]:
    """The pairs-manifest row of a judgement with ``votes``: the winner as ``video``, the loser as ``rejected``;
    None for a tie (``overall`` decides where given, else the sum of the aspects' votes)."""
    winner = votes.get("overall", sum(v for k, v in votes.items() if k != "overall"))
    if winner == 0:
        return None
    a_wins = winner > 0
    paths = judgement.paths
    record = {
        "id": judgement.id,
        "video": paths["video_a"] if a_wins else paths["video_b"],
        "rejected": paths["video_b"] if a_wins else paths["video_a"],
        "labels": {aspect: votes[aspect] * (1 if a_wins else -1) for aspect in aspects if aspect in votes},
    }
    for column in ("audio", "reference", "pose"):
        if column in paths:
            record[column] = paths[column]
    if judgement.text:
        record["text"] = judgement.text
    return record


def cohen_kappa(first: Sequence, second: Sequence) -> Optional[float]:
    """Cohen's kappa of two raters' categories for the same items: ``(p_o - p_e) / (1 - p_e)``, with ``p_o`` the share
    of items they agree on and ``p_e`` the agreement expected by chance from each rater's own category shares.
    None where it is undefined (no item, or both raters always give one and the same category)."""
    if len(first) != len(second):
        raise ValueError(f"the raters rated {len(first)} and {len(second)} items: rate the same items")
    n = len(first)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(first, second)) / n
    expected = sum((list(first).count(c) / n) * (list(second).count(c) / n) for c in set(first) | set(second))
    return None if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(ratings: Sequence[Sequence]) -> Optional[float]:
    """Fleiss' kappa: ``ratings[i]`` holds the categories that the same number ``n >= 2`` of raters gave item ``i``.

    ``P_i = (sum_k n_ik^2 - n) / (n (n - 1))`` is the share of agreeing rater pairs on item ``i``, ``p_k`` the share
    of all ratings in category ``k``; kappa ``= (mean_i P_i - sum_k p_k^2) / (1 - sum_k p_k^2)``. None where it is
    undefined (no item, or every rating in one category)."""
    if not ratings:
        return None
    n = len(ratings[0])
    if n < 2 or any(len(item) != n for item in ratings):
        raise ValueError("Fleiss' kappa needs the same number (at least 2) of ratings per item")
    categories = sorted({c for item in ratings for c in item}, key=str)
    counts = [[list(item).count(c) for c in categories] for item in ratings]
    agreement = sum((sum(k * k for k in row) - n) / (n * (n - 1)) for row in counts) / len(ratings)
    shares = [sum(row[j] for row in counts) / (len(ratings) * n) for j in range(len(categories))]
    expected = sum(p * p for p in shares)
    return None if expected == 1 else (agreement - expected) / (1 - expected)


def _observed_agreement(ratings: Sequence[Sequence]) -> Optional[float]:
    """The share of agreeing rater pairs, averaged over items (for two raters: the share of items they agree on)."""
    if not ratings:
        return None
    n = len(ratings[0])
    return sum(sum(x == y for i, x in enumerate(item) for y in item[i + 1:]) / (n * (n - 1) / 2)
               for item in ratings) / len(ratings)


def _majority(values: list[int]) -> Optional[int]:
    """The most common vote when no other is as common; None when the top votes are level (no majority)."""
    counts = sorted(((values.count(v), v) for v in set(values)), reverse=True)
    return counts[0][1] if len(counts) == 1 or counts[0][0] > counts[1][0] else None


def _left_share(judgements: list[Judgement], aspects: list[str]) -> Optional[float]:
    """Of the non-tie aspect votes whose display order is known, the share that chose the video shown left."""
    left = total = 0
    for judgement in judgements:
        if judgement.order is None:
            continue
        for aspect in aspects:
            vote = judgement.votes.get(aspect, 0)
            if vote:
                total += 1
                left += ("a" if vote > 0 else "b") == judgement.order[0]
    return left / total if total else None


def _merge(files: list[str], aspects: list[str]) -> tuple[list[tuple[Judgement, dict[str, int], int]], dict]:
    """Merge one judgement file per annotator: per pair id and aspect the majority vote (see :func:`_majority`; no
    majority counts as a tie), with the agreement summary. Rows are matched by ``id`` and must name the same two
    videos (in either order: a row with them swapped has its votes flipped)."""
    per_file, files_summary = [], []
    for path in files:
        judgements = _judgements(path, aspects)
        for judgement in judgements:
            if not judgement.explicit_id:
                raise DataError(f"line {judgement.line} has no 'id': merging several annotators' files matches "
                                "judgements by pair id", path=path, field="id")
        latest, replaced = _latest(judgements)
        judged: dict[str, Judgement] = {}
        for judgement in latest:
            if judgement.id in judged:
                raise DataError(f"line {judgement.line}: pair id {judgement.id!r} also names other videos at line "
                                f"{judged[judgement.id].line}: merging several annotators' files matches judgements "
                                "by pair id, so each id must name one pair", path=path, field="id")
            judged[judgement.id] = judgement
        per_file.append(judged)
        names = sorted({j.annotator for j in latest if j.annotator})
        files_summary.append({"path": path, "annotator": names[0] if len(names) == 1 else names or None,
                              "judgements": len(latest), "replaced": replaced,
                              "left_chosen": _left_share(latest, aspects)})
    ids = list(dict.fromkeys(pair_id for judged in per_file for pair_id in judged))
    keys = aspects + ["overall"]
    merged, ratings = [], {key: [] for key in keys}
    split = {key: [] for key in keys}
    undecided = {key: [] for key in keys}
    for pair_id in ids:
        entries = [judged[pair_id] for judged in per_file if pair_id in judged]
        first = entries[0]
        videos = (os.path.normpath(first.paths["video_a"]), os.path.normpath(first.paths["video_b"]))
        votes_by_file = []
        for judged in per_file:
            judgement = judged.get(pair_id)
            if judgement is None:
                votes_by_file.append(None)
                continue
            these = (os.path.normpath(judgement.paths["video_a"]), os.path.normpath(judgement.paths["video_b"]))
            if these == videos:
                votes_by_file.append(judgement.votes)
            elif these == videos[::-1]:
                votes_by_file.append({key: -vote for key, vote in judgement.votes.items()})
            else:
                raise DataError(f"line {judgement.line}: pair {pair_id!r} is judged on videos {these}, but "
                                f"{first.file} line {first.line} judges it on {videos}: annotators must judge the "
                                "same pairs", path=judgement.file, field="video_a")
        votes = {}
        for key in keys:
            given = [v[key] for v in votes_by_file if v is not None and key in v]
            if not given:
                continue
            if len(given) == len(files):
                ratings[key].append(given)
            if len(set(given)) > 1:
                split[key].append(pair_id)
            majority = _majority(given)
            if majority is None:
                undecided[key].append(pair_id)
            votes[key] = 0 if majority is None else majority
        merged.append((first, votes, len(entries)))
    summary = {"files": files_summary, "pairs": len(ids), "aspects": {}}
    for key in keys:
        summary["aspects"][key] = {
            "judged_by_all": len(ratings[key]),
            "observed_agreement": _observed_agreement(ratings[key]),
            "cohen_kappa": cohen_kappa(*zip(*ratings[key])) if len(files) == 2 and ratings[key] else None,
            "fleiss_kappa": fleiss_kappa(ratings[key]),
            "split": len(split[key]),
            "no_majority": len(undecided[key]),
            "no_majority_ids": undecided[key],
        }
    return merged, summary


def _print_agreement(summary: dict) -> None:
    def number(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(f"{len(summary['files'])} annotators, {summary['pairs']} pairs:")
    for entry in summary["files"]:
        print(f"  {entry['path']}: {entry['judgements']} judgements by {entry['annotator'] or 'unnamed'}"
              f" (left chosen in {number(entry['left_chosen'])} of decided votes)")
    print(f"{'aspect':<16}{'judged by all':>14}{'agreement':>11}{'Cohen κ':>9}{'Fleiss κ':>10}{'split':>7}"
          f"{'no majority':>13}")
    for key, row in summary["aspects"].items():
        print(f"{key:<16}{row['judged_by_all']:>14}{number(row['observed_agreement']):>11}"
              f"{number(row['cohen_kappa']):>9}{number(row['fleiss_kappa']):>10}{row['split']:>7}"
              f"{row['no_majority']:>13}")


def import_labels(labels: Union[str, list[str]], out: str, aspects: Optional[list[str]] = None) -> Path:
    """Turn human judgements of two videos into a pairs manifest with per-aspect labels (as Hallo4 curates them).

    Each input row names ``video_a``, ``video_b``, the shared conditions (``audio``, ``reference``, optional
    ``pose``), and per aspect (``lip_sync``, ``expression``, ``motion``) which video is better: ``a``, ``b`` or
    ``tie``; an optional ``overall`` decides the winner, else the aspects' votes do. Output rows have the winner as
    ``video``, the loser as ``rejected``, and ``labels`` {aspect: 1 (winner better), -1 (loser better), 0 (tie)}.
    Of rows with the same ``id`` and the same two videos the last one counts (``prefalign annotate`` appends a
    changed answer).

    Several files (one per annotator, e.g. from ``prefalign annotate``) are merged by pair ``id``: per aspect and
    for ``overall`` the majority vote (the most common vote, if no other is as common; else a tie, reported), and
    each output row says how many ``annotators`` judged it. Their agreement per aspect (observed agreement, Cohen's
    kappa for two annotators, Fleiss' kappa over the pairs every annotator judged) is printed and written, with the
    pairs that had no majority and each annotator's share of votes for the video shown left, to
    ``agreement.json`` beside ``pairs.jsonl``.

    Args:
        labels: the judgement manifest (jsonl), or several: ``--labels [alice.jsonl,bob.jsonl]``.
        out: folder for ``pairs.jsonl`` (paths in it are absolute).
        aspects: the aspect columns to read (default lip_sync, expression, motion).
    """
    aspects = list(aspects or ASPECTS)
    files = [labels] if isinstance(labels, str) else list(labels)
    if not files:
        raise ValueError("--labels names no file")
    if len(set(files)) != len(files):
        raise ValueError(f"--labels names a file twice: {files}")
    summary = None
    if len(files) == 1:
        latest, replaced = _latest(_judgements(files[0], aspects))
        judged = [(judgement, judgement.votes, None) for judgement in latest]
    else:
        judged, summary = _merge(files, aspects)
    pairs, ties = [], 0
    for judgement, votes, annotators in judged:
        record = _pair_record(judgement, votes, aspects)
        if record is None:
            ties += 1
            continue
        if annotators is not None:
            record["annotators"] = annotators
        pairs.append(record)
    if not pairs:
        raise DataError(f"every one of the {ties} judgements is a tie: no pair to learn from", path=", ".join(files))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = inside(out_dir, "pairs.jsonl")
    _write_manifest(path, pairs)
    if summary is not None:
        summary.update(written=len(pairs), ties=ties)
        with atomic_write(inside(out_dir, "agreement.json")) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
        _print_agreement(summary)
        print(f"{len(pairs)} merged pairs written to {path}; {ties} ties left out; agreement in "
              f"{inside(out_dir, 'agreement.json')}")
    else:
        note = f"; {replaced} earlier judgements replaced by later ones of the same id" if replaced else ""
        print(f"{len(pairs)} pairs written to {path}; {ties} ties left out{note}")
    return path
