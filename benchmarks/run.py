"""The benchmark report: each figure times its variants side by side in one run and reports ratios.

    python benchmarks/run.py [--out benchmarks/results.md] [--repeats N] [--quick] [--only FIGURE ...] [--device cuda]
                             [--bf16] [--threads N]

writes a markdown table (``--out``) and the same numbers as JSON next to it (``results.json``). The harness is
``benchmarks/harness.py``, each figure a module of ``benchmarks/figures/``; benchmarks/README.md says what each
figure means, how memory is measured and how to add a figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a checkout without installing prefalign

from benchmarks import figures  # noqa: E402
from benchmarks.harness import Bench, keep_earlier_figures, run_figures, write_report  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results.md",
        help="markdown results; the JSON goes next to it with a .json suffix",
    )
    parser.add_argument("--repeats", type=int, help="timed steps per variant (default 20, 5 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant first (default 3, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="few repeats: checks that the harness runs, not a figure")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and loss")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice); on a shared "
        "machine use the free cores, as busy cores make OpenMP threads wait on each other",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="FIGURE",
        help=f"figures to run, of {list(figures.NAMES)}; the other figures of an earlier report at "
        "--out are kept, each with the run that made it",
    )
    # A memory probe: this script started again by the harness to measure one variant in a fresh process.
    parser.add_argument("--memory-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe", nargs=2, metavar=("FIGURE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("repeats", "warmup", "memory_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "warmup" else 0):
            parser.error(f"--{name.replace('_', '-')} must be at least {1 if name != 'warmup' else 0}, got {value}")
    if args.only and not set(args.only) <= set(figures.NAMES):
        parser.error(f"unknown figure(s) {sorted(set(args.only) - set(figures.NAMES))}; known: {sorted(figures.NAMES)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available to this torch ({torch.__version__})")
    if args.bf16 and device.type == "cpu":
        print("note: bf16 autocast on CPU is usually slower than float32", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    bench = Bench(
        device=device,
        bf16=args.bf16,
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3),
        repeats=args.repeats or (5 if quick else 20),
        memory_steps=args.memory_steps or (2 if quick else 3),
        probe=tuple(args.probe) if args.probe else None,
    )
    chosen = {name: figures.load(name) for name in figures.NAMES if not args.only or name in args.only}
    if bench.probing:
        for figure in chosen.values():
            figure(bench)
        return {}
    command = " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
    report = run_figures(bench, chosen, command, quick)
    if args.only:
        report["figures"] = keep_earlier_figures(args.out.with_suffix(".json"), report["figures"], list(figures.NAMES))
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
