"""What a GRPO training step costs with each way of running it, side by side: Flow-GRPO's (every sampler step
stochastic, a random fraction trained) against MixGRPO's SDE window with GRPO-Guard's ratio normalisation, and that
against the demo recipe (which also draws the window's noise on the mouth box only).

    python benchmarks/grpo_cost.py [--config recipes/demo/grpo.yaml] [--rounds 3] [--steps 3]

Each round fits every variant afresh for ``--steps`` + 1 steps of ``prefalign fit`` on the recipe's data (no
validation, no logging) and times each training step from its start to its end (rollouts, rewards, the update and
the optimizer step); the first step of a fit is a warm-up and not counted. Variants run interleaved, round after
round, so that a slow stretch of the machine hits all of them. It prints a table of the median step time per
variant and its ratio to the first variant's, and writes it to ``benchmarks/grpo_cost.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GRPO_ARGS = "--model.algorithm.init_args."
# Flow-GRPO as the demo ran it before the SDE window: every step stochastic, 3 of 6 drawn at random, plain ratio.
VARIANTS = {
    "Flow-GRPO: all 6 steps stochastic, 3 trained at random": [
        f"{GRPO_ARGS}sde_window=null", f"{GRPO_ARGS}train_fraction=0.34", f"{GRPO_ARGS}ratio_norm=false",
        f"{GRPO_ARGS}same_noise_per_group=false",
    ],
    "MixGRPO window of 2, GRPO-Guard RatioNorm, noise on every latent": [f"{GRPO_ARGS}explore=all"],
    "the recipe (the same, noise on the mouth box only)": [],
}


class StepTimer(L.Callback):
    """Wall time of every training step, from the batch's start to its end."""

    def __init__(self):
        self.times: list[float] = []
        self.start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self.start)


def fit_times(config: str, overrides: list[str], steps: int) -> list[float]:
    """Step times of a fresh ``steps + 1``-step fit of the recipe with ``overrides``, less the first step."""
    from lightning.pytorch.cli import LightningCLI

    from prefalign.data.datamodule import PortraitDataModule
    from prefalign.module import AlignmentModule

    timer = StepTimer()
    args = [
        "--config", config, *overrides, f"--trainer.max_steps={steps + 1}", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0", "--trainer.enable_model_summary=false",
    ]  # fmt: skip
    cli = LightningCLI(
        AlignmentModule, PortraitDataModule, args=args, run=False, save_config_callback=None,
        auto_configure_optimizers=False,
    )  # fmt: skip
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.times[1:]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/demo/grpo.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per fit (after one warm-up step)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "grpo_cost.md")
    args = parser.parse_args(argv)

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name, overrides in VARIANTS.items():
            times[name] += fit_times(args.config, overrides, args.steps)
            print(f"round {round_ + 1}/{args.rounds}: {name}: {statistics.median(times[name]):.2f} s/step")
    baseline = statistics.median(next(iter(times.values())))
    lines = [
        f"GRPO step cost, `{args.config}` ({args.rounds} rounds × {args.steps} timed steps per variant, "
        "interleaved; medians)",
        "",
        "| variant | s per step | ratio |",
        "|---|---:|---:|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.2f} | {median / baseline:.2f} |")
    table = "\n".join(lines) + "\n"
    args.out.write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
