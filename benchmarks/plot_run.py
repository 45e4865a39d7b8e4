"""Plot a run's curves from its Lightning CSVLogger files and summarise its last validation.

    python benchmarks/plot_run.py RUN_DIR

reads every ``metrics.csv`` under RUN_DIR (e.g. ``runs/demo-sft/csv/version_0/metrics.csv``) and writes
``RUN_DIR/curves.png``: the train and val loss, the val sync score against the ground truth's, and the jitter and
identity guards; with DPO also the implicit accuracy and the reward margin, with GRPO the rollout rewards; the
head offset and the texture term when logged.
Columns a run did not log are left out.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path

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
# Panels drawn only when the run logged one of their columns: DPO's preference statistics, the skeleton's effect.
OPTIONAL_PANELS = [
    ("DPO implicit accuracy", "fraction of pairs", [("train/implicit_accuracy", "train", "line")]),
    ("DPO reward margin", "β·h", [("train/reward_margin", "train", "line")]),
    ("Face position vs. ground truth (lower is better)", "pixels", [("val/head_offset", "head offset", "points")]),
    ("Texture vs. the reference (0 is the reference's)", "−|log energy ratio|", [("val/texture", "val samples", "points")]),
    (
        "GRPO rollout rewards (train)",
        "reward",
        [("train/reward/sync", "sync", "line"), ("train/reward/texture", "texture", "line"), ("train/reward", "total", "line")],
    ),
]
SUMMARY = ["val/loss", "val/sync", "val/sync_ground_truth", "val/jitter", "val/identity"]


def find_metrics(run_dir: Path) -> list[Path]:
    """Every metrics.csv under ``run_dir``, in version order (version_2 before version_10)."""
    if not run_dir.is_dir():
        raise SystemExit(f"error: {run_dir} is not a directory")
    files = run_dir.rglob("metrics.csv")

    def key(path: Path):
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path.relative_to(run_dir)))]

    found = sorted(files, key=key)
    if not found:
        raise SystemExit(
            f"error: no metrics.csv under {run_dir}: is it a run directory with a CSVLogger "
            "(trainer.logger: lightning.pytorch.loggers.CSVLogger)?"
        )
    return found


def read_rows(path: Path) -> list[dict[str, float]]:
    """The file's rows as {column: value}, empty cells and non-numeric values left out; rows need a ``step``."""
    rows = []
    with path.open(newline="") as handle:
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


def series(rows: list[dict[str, float]], column: str) -> tuple[list[float], list[float]]:
    points = [(row["step"], row[column]) for row in rows if column in row and math.isfinite(row[column])]
    return [step for step, _ in points], [value for _, value in points]


def plot(rows: list[dict[str, float]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = {column for row in rows for column in row}
    panels = PANELS + [p for p in OPTIONAL_PANELS if any(column in logged for column, _, _ in p[2])]
    cols = min(3, len(panels))
    grid_rows = math.ceil(len(panels) / cols)
    fig, grid = plt.subplots(grid_rows, cols, figsize=(5 * cols, 3.8 * grid_rows), constrained_layout=True, squeeze=False)
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
    fig.savefig(out, dpi=120)
    plt.close(fig)


def summary(rows: list[dict[str, float]]) -> list[str]:
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


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/demo-sft (searched recursively)")
    parser.add_argument("--out", type=Path, help="the figure (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)

    tables = {path: read_rows(path) for path in find_metrics(args.run_dir)}
    for path, found in tables.items():
        print(f"read {path} ({len(found)} rows)")
    rows = [row for found in tables.values() for row in found]
    if not rows:
        raise SystemExit(f"error: the metrics.csv files under {args.run_dir} hold no rows with a step")
    if sum(any("train/loss" in row for row in found) for found in tables.values()) > 1:
        print(
            "warning: several training runs found; their rows are merged by step (give one version folder to plot one)",
            file=sys.stderr,
        )
    rows.sort(key=lambda row: row["step"])  # stable: within a step, files keep their version order
    out = args.out or args.run_dir / "curves.png"
    plot(rows, out, title=str(args.run_dir))
    for line in summary(rows):
        print(line)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
