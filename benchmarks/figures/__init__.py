"""The figures of the benchmark report, in the report's order. Each is the module of this package named after it,
whose ``figure(bench: Bench) -> Figure`` builds its variants and times them with ``bench.compare``
(benchmarks/README.md, "Adding a figure")."""

from __future__ import annotations

import importlib
from collections.abc import Callable

NAMES = (
    "sft_step",
    "dpo_step",
    "backbone_step",
    "grpo_step",
    "refree_step",
    "data_step",
    "checkpoint_save",
    "judge_request",
    "paper_metrics",
)


def load(name: str) -> Callable:
    """The figure function of figure ``name``; its module (and what that imports) is imported only when it runs."""
    return importlib.import_module(f"{__name__}.{name}").figure
