"""The Algorithm contract: which batch fields an alignment method needs, and how a batch becomes a loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from prefalign.data.errors import DataError

if TYPE_CHECKING:
    from prefalign.module import AlignmentModule


#: Pixel fields and the cached latents (``prefalign preprocess``) that can stand for them.
CACHED = {"video": "latents", "rejected": "rejected_latents"}


class Algorithm:
    """One alignment method. Plain class: configured from YAML as ``model.algorithm: {class_path, init_args}``.

    A subclass sets ``required_fields`` (the batch fields it reads) and ``needs_reference`` (whether it calls
    ``module.reference()``), and implements :meth:`loss`.
    """

    required_fields: tuple[str, ...] = ("video", "audio", "reference")
    needs_reference: bool = False
    #: An algorithm that takes several optimizer steps per batch (GRPO's inner epochs over its rollouts) sets this
    #: and implements :meth:`training_step`; the module then hands it the optimizer (Lightning's manual optimization).
    manual_optimization: bool = False
    #: Whether the method needs the clips' pixels (ReFree perturbs frames) rather than their latents: cached
    #: latents (``data.latent_cache``) then cannot feed it.
    needs_pixels: bool = False
    #: The learning rate the method is tuned at: when set, it replaces ``model.optimizer``'s, so that a recipe's
    #: algorithm file carries it (see ``recipes/algorithms/``). None: the optimizer's own.
    lr: Optional[float] = None
    #: Clip the gradients' global norm to this before every optimizer step (None: no clipping by the algorithm;
    #: ``trainer.gradient_clip_val``, where set, takes precedence for the methods Lightning steps).
    max_grad_norm: Optional[float] = None

    def set_optimization(self, lr: Optional[float], max_grad_norm: Optional[float]) -> None:
        """Store the method's tuned learning rate and gradient clipping (both checked > 0)."""
        for option, value in (("lr", lr), ("max_grad_norm", max_grad_norm)):
            if value is not None and not value > 0:
                raise ValueError(f"{self.name}: {option} must be > 0 (or null), got {value}")
        self.lr = lr
        self.max_grad_norm = max_grad_norm

    @property
    def name(self) -> str:
        return type(self).__name__

    def check_fields(self, available: set[str], source: str) -> None:
        """Fail at setup, not mid-epoch, when the data cannot feed this algorithm."""
        if not self.needs_pixels:  # cached latents stand for the clips they were encoded from
            available = available | {pixels for pixels, latents in CACHED.items() if latents in available}
        for field in self.required_fields:
            if field not in available:
                raise DataError(
                    f"the {self.name} algorithm needs the field '{field}', which this dataset does not provide in every row "
                    f"(it has: {', '.join(sorted(available)) or 'nothing'})",
                    path=source,
                    field=field,
                )

    def setup(self, module: AlignmentModule) -> None:
        """Called once the module is on its device, before training (create buffers, snapshots)."""

    def on_step_end(self, module: AlignmentModule, step: int) -> None:
        """Called after every optimizer step, ``step`` being the number of steps done (1 after the first): refresh a
        reference, a cache of negatives... (before a checkpoint of that step is written)."""

    def state_dict(self) -> dict:
        """What the method keeps between steps (caches, counters, generators, running statistics), for exact
        resumes; saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def loss(self, module: AlignmentModule, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar training loss for ``batch`` and the metrics to log (names without a prefix)."""
        raise NotImplementedError

    def training_step(self, module: AlignmentModule, batch: dict) -> dict[str, torch.Tensor]:
        """With ``manual_optimization``: do the batch's optimizer steps (``module.optimizers()``,
        ``module.manual_backward``) and return the metrics to log."""
        raise NotImplementedError


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample over all non-batch elements, in float32: ``[B, ...] -> [B]``.

    With ``weights`` (broadcastable to ``pred``) it is the weighted mean ``Σ w·err² / Σ w`` per sample.
    """
    error = (pred.float() - target.float()).pow(2)
    if weights is None:
        return error.flatten(1).mean(dim=1)
    weights = weights.float().expand_as(error)
    return (weights * error).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1)


def repeat_conditions(batch: dict, times: int) -> dict:
    """Every per-sample tensor of ``batch`` repeated ``times`` times in place (sample i becomes rows
    ``i·times ... i·times + times - 1``): a group of samples per condition (GRPO's rollouts, online DPO's pairs)."""
    size = batch["reference"].shape[0]
    return {k: (v.repeat_interleave(times, dim=0) if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == size else v)
            for k, v in batch.items()}


def step_generator(seed: int, step: int, rank: int, device="cpu") -> torch.Generator:
    """A generator seeded by (seed, step, rank): reproducible after a resume, never shared by two ranks or steps."""
    import numpy as np

    state = np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]
    return torch.Generator(device=device).manual_seed(int(state))
