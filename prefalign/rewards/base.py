"""The Reward contract: batched scores of videos for their conditions, one tensor per named term."""

from __future__ import annotations

import torch


class Reward:
    """``score(videos, cond) -> {name: Tensor[B]}`` for videos ``[B, T, 3, H, W]`` in [0, 1].

    ``cond`` is the batch the videos were made for (``audio``, ``reference``, optional ``pose`` and ground-truth
    ``video``). Rewards are plain classes configured by ``class_path``; higher is better for every term.
    """

    reads_pose: bool = False
    """Whether ``score`` reads ``cond["pose"]``: the training split then loads the pose column."""

    def score(self, videos: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def total(self, videos: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The sum of the terms (a composite reward weighs them) and the terms themselves."""
        terms = self.score(videos, cond)
        for name, value in terms.items():
            if not torch.isfinite(value).all():
                raise FloatingPointError(f"{type(self).__name__}: reward term '{name}' is not finite: {value.tolist()}")
        return sum(terms.values()), terms
