"""Preference-pair curation: the best and worst of N samples under a reward, or human labels, as a pairs manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from prefalign.data import media
from prefalign.data.errors import DataError
from prefalign.denoisers.base import frames_of
from prefalign.files import atomic_write, inside, safe_name
from prefalign.rewards.base import Reward

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
    from dataclasses import replace

    from lightning.pytorch.cli import LightningCLI

    from prefalign.data.datamodule import PortraitDataModule
    from prefalign.module import AlignmentModule
    from prefalign.rewards.sync import SyncExpert

    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 to make a pair, got {num_samples}")
    args = ["--config", recipe, "--data.predict", conditions, "--data.eval_batch_size", str(batch_size), *(overrides or [])]
    cli = LightningCLI(
        AlignmentModule, PortraitDataModule, args=args, run=False, save_config_callback=None, auto_configure_optimizers=False
    )
    module, datamodule = cli.model, cli.datamodule
    if ckpt_path is not None:
        from prefalign.checkpoints import check_checkpoint

        check_checkpoint(ckpt_path, field="--ckpt_path")
        module.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"])
    module.eval()
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
        num_frames = frames_of(batch)
        videos, totals, terms = [], [], []
        for k in range(num_samples):
            settings = replace(module.sampling, seed=seed + k, num_steps=num_steps or module.sampling.num_steps)
            video = module.generate(batch, num_frames, settings)
            total, parts = reward.total(video, batch)
            videos.append(video)
            totals.append(total)
            terms.append(parts)
        totals = torch.stack(totals)  # [N, B]
        best, worst = totals.argmax(dim=0), totals.argmin(dim=0)
        for i, clip_id in enumerate(batch["id"]):
            gap = (totals[best[i], i] - totals[worst[i], i]).item()
            if gap < min_gap:
                dropped += 1
                continue
            row = rows_by_id[clip_id]
            record = {"id": clip_id}
            for name, k in (("video", best[i]), ("rejected", worst[i])):
                role = "chosen" if name == "video" else "rejected"
                path = inside(out_dir, "clips", f"{safe_name(clip_id)}_{role}.mp4")
                frames = (videos[k][i].permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()
                audio = batch["audio"][i].float().cpu().numpy()
                media.write_video(path, frames, datamodule.fps, audio=audio, sample_rate=datamodule.sample_rate)
                record[name] = path.relative_to(out_dir).as_posix()
            for column in ("audio", "reference", "pose"):
                if row.get(column):
                    record[column] = str(Path(manifest.resolve(row[column])).resolve())
            record["chosen_score"] = totals[best[i], i].item()
            record["rejected_score"] = totals[worst[i], i].item()
            record["scores"] = {
                name: [terms[best[i]][name][i].item(), terms[worst[i]][name][i].item()] for name in terms[0]
            }
            pairs.append(record)
    if not pairs:
        raise ValueError(f"no pair kept: all {dropped} conditions had a score gap below min_gap={min_gap}")
    path = inside(out_dir, "pairs.jsonl")
    _write_manifest(path, pairs)
    print(f"{len(pairs)} pairs written to {path}; {dropped} conditions dropped (score gap < {min_gap})")
    return path


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


def import_labels(labels: str, out: str, aspects: Optional[list[str]] = None) -> Path:
    """Turn human judgements of two videos into a pairs manifest with per-aspect labels (as Hallo4 curates them).

    Each input row names ``video_a``, ``video_b``, the shared conditions (``audio``, ``reference``, optional
    ``pose``), and per aspect (``lip_sync``, ``expression``, ``motion``) which video is better: ``a``, ``b`` or
    ``tie``; an optional ``overall`` decides the winner, else the aspects' votes do. Output rows have the winner as
    ``video``, the loser as ``rejected``, and ``labels`` {aspect: 1 (winner better), -1 (loser better), 0 (tie)}.

    Args:
        labels: the judgement manifest (jsonl).
        out: folder for ``pairs.jsonl`` (paths in it are absolute).
        aspects: the aspect columns to read (default lip_sync, expression, motion).
    """
    from prefalign.data.schema import Manifest

    aspects = list(aspects or ASPECTS)
    source = Path(labels)
    numbered = _read_label_rows(labels)
    rows = [row for _, row in numbered]
    manifest = Manifest(source=labels, rows=rows, root=source.resolve().parent)
    pairs, ties = [], 0
    for index, (number, row) in enumerate(numbered):
        check_label_row(row, number, labels)
        if row.get("id") is not None and not isinstance(row["id"], (str, int)):
            raise DataError(f"line {number}: 'id' must be a string or an integer, got {json.dumps(row['id'])[:80]}",
                            path=labels, field="id")
        votes = row_votes(row, aspects + ["overall"], number, labels)
        if not votes:
            raise DataError(f"line {number} judges none of {aspects + ['overall']}", path=labels, field=aspects[0])
        winner = votes.get("overall", sum(v for k, v in votes.items() if k != "overall"))
        if winner == 0:
            ties += 1
            continue
        a_wins = winner > 0
        record = {
            "id": str(row.get("id", index)),
            "video": manifest.resolve(row["video_a"] if a_wins else row["video_b"]),
            "rejected": manifest.resolve(row["video_b"] if a_wins else row["video_a"]),
            "labels": {aspect: votes[aspect] * (1 if a_wins else -1) for aspect in aspects if aspect in votes},
        }
        for column in ("audio", "reference", "pose", "text"):
            if row.get(column):
                record[column] = manifest.resolve(row[column]) if column != "text" else row[column]
        pairs.append(record)
    if not pairs:
        raise DataError(f"every one of the {ties} judgements is a tie: no pair to learn from", path=labels)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = inside(out_dir, "pairs.jsonl")
    _write_manifest(path, pairs)
    print(f"{len(pairs)} pairs written to {path}; {ties} ties left out")
    return path
