"""Training curves from the CSVLogger's ``metrics.csv``, drawn as one figure (``prefalign.callbacks.TrainingCurves``
draws it when ``fit`` ends; ``benchmarks/plot_run.py`` from the command line)."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Optional, Union

from lightning.pytorch.utilities import rank_zero_warn

from prefalign.files import atomic_write

# (panel title, y label, [(column, label, style)]); the style "truth" draws a dashed reference line.
PANELS = [
    ("Loss", "loss", [("train/loss", "train", "line"), ("val/loss", "val", "points")]),
    (
        "Lip sync (higher is better)",
        "Pearson r",
        [
            ("val/sync", "val samples", "points"),
            ("val/sync_pose_box", "val samples, mouth box of the pose", "points"),
            ("val/sync_ground_truth", "ground truth", "truth"),
        ],
    ),
    (
        "Guards (lower is better)",
        "score",
        [("val/jitter", "jitter", "points"), ("val/identity", "identity drift", "points")],
    ),
]
MAX_PLOTTED_STEPS = 12  # GRPO sampler steps whose gradient norms get a line
# Panels drawn only when the run logged one of their columns: DPO's preference statistics, the skeleton's effect.
OPTIONAL_PANELS = [
    ("DPO implicit accuracy", "fraction of pairs", [("train/implicit_accuracy", "train", "line")]),
    ("DPO reward margin", "β·h", [("train/reward_margin", "train", "line")]),
    ("Face position vs. ground truth (lower is better)", "pixels", [("val/head_offset", "head offset", "points")]),
    (
        "Texture vs. the reference (0 is the reference's)",
        "−|log energy ratio|",
        [("val/texture", "val samples", "points")],
    ),
    (
        "GRPO rollout rewards (train)",
        "reward",
        [
            ("train/reward/sync", "sync", "line"),
            ("train/reward/texture", "texture", "line"),
            ("train/reward", "total", "line"),
        ],
    ),
    (
        "GRPO advantage signal (train)",
        "reward / fraction",
        [
            ("train/reward_group_std", "reward spread within a group (std)", "line"),
            ("train/zero_spread_groups", "groups without spread (fraction)", "line"),
        ],
    ),
    ("GRPO ratio drift, last inner epoch (train)", "mean |ρ − 1|", [("train/ratio_drift", "ratio drift", "line")]),
    (
        "GRPO gradient norm per trained sampler step (train)",
        "‖g‖",
        [(f"train/grad_norm/step_{j}", f"step {j}", "line") for j in range(MAX_PLOTTED_STEPS)],
    ),
    ("GRPO update size (train)", "‖Δθ‖ / ‖θ‖", [("train/update_size", "per optimizer step", "line")]),
    ("SSIM vs. ground truth (higher is better)", "SSIM", [("val/ssim", "val samples", "points")]),
    ("PSNR vs. ground truth (higher is better)", "dB", [("val/psnr", "val samples", "points")]),
]
SUMMARY = ["val/loss", "val/sync", "val/sync_ground_truth", "val/jitter", "val/identity"]

Rows = list[dict[str, float]]


def find_metrics(run_dir: Union[str, Path]) -> list[Path]:
    """Every metrics.csv under ``run_dir``, in version order (version_2 before version_10).

    Raises:
        NotADirectoryError: ``run_dir`` is not a folder.
        FileNotFoundError: it holds no metrics.csv.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir} is not a directory")

    def key(path: Path):
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path.relative_to(run_dir)))]

    found = sorted(run_dir.rglob("metrics.csv"), key=key)
    if not found:
        raise FileNotFoundError(
            f"no metrics.csv under {run_dir}: is it a run directory with a CSVLogger "
            "(trainer.logger: lightning.pytorch.loggers.CSVLogger)?"
        )
    return found


def read_rows(path: Union[str, Path]) -> Rows:
    """The file's rows as {column: value}, empty cells and non-numeric values left out; rows need a ``step``."""
    rows = []
    with Path(path).open(newline="") as handle:
        for row in csv.DictReader(handle):
            values = {}
            for column, cell in row.items():
                if column is None or cell in (None, ""):
                    continue
                try:
                    values[column] = float(cell)
                except ValueError:
                    continue
            if "step" in values:
                rows.append(values)
    return rows


def load_metrics(source: Union[str, Path]) -> dict[Path, Rows]:
    """The rows of ``source`` (a metrics.csv, or a run folder searched recursively), per file in version order."""
    source = Path(source)
    if source.is_file():
        return {source: read_rows(source)}
    return {path: read_rows(path) for path in find_metrics(source)}


def merge_rows(tables: dict[Path, Rows]) -> Rows:
    """The files' rows in one list sorted by step; within a step, files keep their version order."""
    return sorted((row for rows in tables.values() for row in rows), key=lambda row: row["step"])


def several_runs(tables: dict[Path, Rows]) -> bool:
    """Whether more than one file holds training rows (their rows are merged by step, which may mislead)."""
    return sum(any("train/loss" in row for row in rows) for rows in tables.values()) > 1


def series(rows: Rows, column: str) -> tuple[list[float], list[float]]:
    points = [(row["step"], row[column]) for row in rows if column in row and math.isfinite(row[column])]
    return [step for step, _ in points], [value for _, value in points]


def panels_for(rows: Rows) -> list[tuple]:
    """The panels a figure of ``rows`` shows: the fixed ones, and each optional one whose columns were logged."""
    logged = {column for row in rows for column in row}
    return PANELS + [panel for panel in OPTIONAL_PANELS if any(column in logged for column, _, _ in panel[2])]


def plot(rows: Rows, out: Union[str, Path], title: str) -> None:
    """Draw the panels of ``rows`` into the png ``out`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_for(rows)
    cols = min(3, len(panels))
    grid_rows = math.ceil(len(panels) / cols)
    fig, grid = plt.subplots(
        grid_rows, cols, figsize=(5 * cols, 3.8 * grid_rows), constrained_layout=True, squeeze=False
    )
    axes = list(grid.flat)
    for ax in axes[len(panels):]:
        ax.axis("off")
    for ax, (panel, ylabel, columns) in zip(axes, panels):
        drawn = False
        for column, label, style in columns:
            steps, values = series(rows, column)
            if not steps:
                continue
            drawn = True
            if style == "line":
                ax.plot(steps, values, label=label, linewidth=1)
            elif style == "points":
                ax.plot(steps, values, "o-", label=label, markersize=4)
            elif len(set(values)) == 1:  # the ground truth's score does not change: a line across the plot
                ax.axhline(values[0], linestyle="--", color="grey", label=label)
            else:
                ax.plot(steps, values, "--", color="grey", label=label)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if drawn:
            ax.legend()
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(title)
    try:
        with atomic_write(out) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


def summary(rows: Rows) -> list[str]:
    """Text lines: the last train loss, and the last validation's metrics."""
    lines = []
    steps, losses = series(rows, "train/loss")
    if steps:
        lines.append(f"last train/loss (step {steps[-1]:.0f}): {losses[-1]:.4f}")
    validation = [row for row in rows if any(column.startswith("val/") for column in row)]
    if not validation:
        return lines + ["no validation rows"]
    last = validation[-1]
    values = "  ".join(f"{column} {last[column]:.4f}" for column in SUMMARY if column in last)
    others = sorted(c for c in last if c.startswith("val/") and c not in SUMMARY and c != "val/skipped_samples")
    values += "".join(f"  {column} {last[column]:.4f}" for column in others)
    return lines + [f"last validation (step {last['step']:.0f}): {values}"]


def plot_training_curves(
    source: Union[str, Path], out_png: Union[str, Path, None] = None, title: Optional[str] = None
) -> Optional[Path]:
    """Plot a run's curves: the train and val loss, the val sync score against the ground truth's, the jitter and
    identity guards; with DPO also the implicit accuracy and the reward margin, with GRPO the rollout rewards; the
    head offset, texture, SSIM and PSNR when logged. Columns a run did not log are left out.

    Args:
        source (str | Path): a metrics.csv, or a run folder whose every metrics.csv (searched recursively) is merged
            by step (a UserWarning says so when several hold training rows).
        out_png (str | Path | None): the figure; default ``curves.png`` in the folder (or next to the file).
        title (str | None): the figure's title; default ``source``.

    Returns:
        Path | None: ``out_png``, or None when the files hold no rows with a step (nothing is written).

    Raises:
        FileNotFoundError, NotADirectoryError: ``source`` is no metrics.csv and no folder holding one.
    """
    source = Path(source)
    tables = load_metrics(source)
    rows = merge_rows(tables)
    if not rows:
        return None
    if several_runs(tables):
        rank_zero_warn(f"several training runs under {source}; their rows are merged by step", category=UserWarning)
    out = Path(out_png) if out_png is not None else (source.parent if source.is_file() else source) / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out, title=str(source) if title is None else title)
    return out
