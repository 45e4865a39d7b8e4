"""Alignment algorithms, one paper per file; ``model.algorithm`` picks one."""

from prefalign.algorithms.base import Algorithm
from prefalign.algorithms.dpo import DiffusionDPO
from prefalign.algorithms.grpo import GRPO
from prefalign.algorithms.refree import ReFree
from prefalign.algorithms.sft import SFT

__all__ = ["Algorithm", "DiffusionDPO", "GRPO", "ReFree", "SFT"]
