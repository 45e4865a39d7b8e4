"""The Algorithm contract: which batch fields an alignment method needs, and how a batch becomes a loss."""

from __future__ import annotations

from typing import Optional

import torch

from prefalign import metrics
from prefalign.data.errors import require_fields
from prefalign.denoisers.base import PortraitDenoiser
from prefalign.policy import Policy


#: Pixel fields and the cached latents (``prefalign preprocess``) that can stand for them.
CACHED = {"video": "latents", "rejected": "rejected_latents"}


class Algorithm:
    """One alignment method. Plain class: configured from YAML as ``model.algorithm: {class_path, init_args}``.

    A subclass sets ``required_fields`` (the batch fields it reads) and ``needs_reference`` (whether it calls
    ``policy.reference()``), and implements :meth:`loss`. It sees the model only as a :class:`~prefalign.policy.Policy`
    (the denoiser, the process, the reference, the step and rank), so its losses run without Lightning.
    """

    required_fields: tuple[str, ...] = ("video", "audio", "reference")
    needs_reference: bool = False
    #: An algorithm that takes several optimizer steps per batch (GRPO's inner epochs over its rollouts) sets this
    #: and implements :meth:`training_step`, stepping through ``policy.backward`` and ``policy.optimizer_step``.
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
        require_fields(self.required_fields, available, source, f"the {self.name} algorithm")

    def data_fields(self) -> set[str]:
        """The batch fields the method reads: its required ones, and ``pose`` where its reward reads it (the data
        module then loads pose where the rows have it; the reward says what it needs of it)."""
        fields = set(self.required_fields)
        if getattr(getattr(self, "reward", None), "reads_pose", False):
            fields.add("pose")
        return fields

    def setup(self, policy: Policy) -> None:
        """Called once the policy is on its device, before training (create buffers, snapshots)."""

    def on_step_end(self, policy: Policy, step: int) -> None:
        """Called after every optimizer step, ``step`` being the number of steps done (1 after the first): refresh a
        reference, a cache of negatives... (before a checkpoint of that step is written)."""

    def state_dict(self) -> dict:
        """What the method keeps between steps (caches, counters, generators, running statistics), for exact
        resumes; saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def loss(self, policy: Policy, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar training loss for ``batch`` and the metrics to log (names without a prefix)."""
        raise NotImplementedError

    def training_step(self, policy: Policy, batch: dict) -> dict[str, torch.Tensor]:
        """With ``manual_optimization``: do the batch's optimizer steps (``policy.backward``,
        ``policy.optimizer_step``) and return the metrics to log."""
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


def denoising_loss(denoiser: PortraitDenoiser, process, batch: dict, seed: int = 0) -> torch.Tensor:
    """The plain denoising loss with seeded noise and timesteps: comparable across epochs and algorithms (the
    validation loss of every method)."""
    x0 = denoiser.latents(batch)
    device = x0.device
    generator = torch.Generator(device=device).manual_seed(seed)
    cond = denoiser.condition(batch)
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    t = process.sample_t(x0.shape[0], device=device, generator=generator)
    pred = denoiser(process.noise(x0, eps, t), process.model_time(t), cond)
    return per_sample_mse(pred, process.target(x0, eps, t)).mean()


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


def with_pose(fields: tuple[str, ...], reads_pose: bool) -> tuple[str, ...]:
    """``fields``, and ``pose`` after them where the method locates the mouth from the keypoints."""
    return fields + (("pose",) if reads_pose else ())


def mouth_mask(denoiser: PortraitDenoiser, batch: dict) -> torch.Tensor:
    """``[B, 1, F, h, w]``: 1 on the latents that encode a pixel of the box mouth ± (0.6·d, 0.8·d) located from the
    ``pose`` keypoints (d the eye distance), 0 elsewhere."""
    height, width = batch["reference"].shape[-2:]
    return denoiser.codec.pool_mask(metrics.training_mouth_box(batch["pose"], height, width))


def mouth_weights(denoiser: PortraitDenoiser, batch: dict, mouth_weight: float) -> torch.Tensor | None:
    """Per-latent loss weights ``[B, 1, F, h, w]``: ``1 + mouth_weight`` on the latents of the mouth box
    (:func:`mouth_mask`), 1 elsewhere; None for 0."""
    if not mouth_weight:
        return None
    return 1 + mouth_weight * mouth_mask(denoiser, batch)


def paired_errors(policy: Policy, win: torch.Tensor, lose: torch.Tensor, cond: dict,
                  weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """The per-sample denoising errors of a preference pair under the policy and the reference: ``e_w, e_l, r_w,
    r_l``, each ``[B]``.

    Winner and loser share their noise and timestep (Diffusion-DPO); the policy sees both in one batched forward,
    the reference in one no-grad forward. ``weights`` (``[B, 1, F, h, w]``, e.g. :func:`mouth_weights`) weigh the
    latents of both."""
    denoiser, process = policy.denoiser, policy.process
    size = win.shape[0]
    pair_cond = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in cond.items()}
    pair_weights = None if weights is None else torch.cat([weights, weights])
    eps = torch.randn_like(win).repeat(2, 1, 1, 1, 1)  # the pair shares its noise ...
    t = process.sample_t(size, device=win.device).repeat(2)  # ... and its timestep
    x0 = torch.cat([win, lose])
    x_t, model_t, target = process.noise(x0, eps, t), process.model_time(t), process.target(x0, eps, t)
    e_w, e_l = per_sample_mse(denoiser(x_t, model_t, pair_cond), target, pair_weights).chunk(2)
    with policy.reference() as reference:
        r_w, r_l = per_sample_mse(reference(x_t, model_t, pair_cond), target, pair_weights).chunk(2)
    return e_w, e_l, r_w, r_l
