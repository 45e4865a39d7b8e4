"""Alignment algorithms, one paper per file; ``model.algorithm`` picks one."""

from prefalign.algorithms.base import Algorithm
from prefalign.algorithms.dpo import DiffusionDPO
from prefalign.algorithms.sft import SFT

__all__ = ["Algorithm", "DiffusionDPO", "SFT"]
