"""Plot a run's curves from its Lightning CSVLogger files and summarise its last validation.

    python benchmarks/plot_run.py RUN_DIR

reads every ``metrics.csv`` under RUN_DIR (e.g. ``runs/demo-sft/csv/version_0/metrics.csv``) and writes
``RUN_DIR/curves.png``: the train and val loss, the val sync score against the ground truth's, and the jitter and
identity guards; with DPO also the implicit accuracy and the reward margin, with GRPO the rollout rewards; the
head offset, the texture term, SSIM and PSNR when logged.
Columns a run did not log are left out. The figure is :func:`prefalign.plots.plot_training_curves`'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefalign import plots


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/demo-sft (searched recursively)")
    parser.add_argument("--out", type=Path, help="the figure (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)

    try:
        tables = {path: plots.read_rows(path) for path in plots.find_metrics(args.run_dir)}
    except (FileNotFoundError, NotADirectoryError) as error:
        raise SystemExit(f"error: {error}") from None
    for path, found in tables.items():
        print(f"read {path} ({len(found)} rows)")
    rows = plots.merge_rows(tables)
    if not rows:
        raise SystemExit(f"error: the metrics.csv files under {args.run_dir} hold no rows with a step")
    if plots.several_runs(tables):
        print(
            "warning: several training runs found; their rows are merged by step (give one version folder to plot one)",
            file=sys.stderr,
        )
    out = args.out or args.run_dir / "curves.png"
    plots.plot(rows, out, title=str(args.run_dir))
    for line in plots.summary(rows):
        print(line)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
