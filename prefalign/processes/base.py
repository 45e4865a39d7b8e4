"""The Process contract: how noise is added to data and removed again, apart from the network that predicts."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Process", "StepOutput"]


@dataclass
class StepOutput:
    """One sampling step: ``sample = mean + std * noise``.

    ``mean`` and ``sample`` have the shape of ``x_t``; ``std`` has shape ``[B, 1, ..., 1]`` (broadcastable to the
    sample) and is zero for deterministic steps.
    """

    sample: Tensor
    mean: Tensor
    std: Tensor


class Process(ABC):
    """A noising process: training noise and targets, a sampling schedule, and (stochastic) steps with log-probs.

    Time ``t`` is the process's own variable (σ for flow matching, the integer timestep for diffusion). Every ``t``
    argument may be a 0-dim tensor, a Python number, or a tensor of shape ``[B]``; it is broadcast over the non-batch
    dimensions of the data ``[B, ...]``.
    """

    @abstractmethod
    def sample_t(self, n: int, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw ``n`` training timesteps, shape ``[n]``."""

    @abstractmethod
    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The noisy sample ``x_t`` of clean data ``x0`` with Gaussian noise ``eps`` at time ``t``."""

    @abstractmethod
    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The regression target of the network at ``x_t = noise(x0, eps, t)``."""

    @abstractmethod
    def model_time(self, t: Tensor) -> Tensor:
        """What the network's timestep embedding receives for time ``t``."""

    @abstractmethod
    def timesteps(self, num_steps: int, device: Optional[torch.device] = None) -> Tensor:
        """The sampling schedule, ``[num_steps + 1]``, from pure noise to the terminal (clean) time."""

    @abstractmethod
    def predict_x0(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The clean-sample estimate implied by the network output ``pred`` at ``(x_t, t)``."""

    @abstractmethod
    def step(self, pred: Tensor, x_t: Tensor, t: Tensor, t_next: Tensor, stochastic: bool = False,
             noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> StepOutput:
        """Move ``x_t`` from ``t`` to ``t_next`` given the network output ``pred``.

        The step is Gaussian: ``sample = mean + std * noise`` with ``std = 0`` when ``stochastic`` is False. When
        stochastic and ``noise`` is None, standard normal noise is drawn with ``generator``. Computation runs in at
        least float32 and the outputs keep that dtype (a bf16 ``x_t`` comes back as float32).
        """

    def prior(self, shape: Sequence[int], device: Optional[torch.device] = None,
              generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The starting noise of sampling: standard normal of ``shape``."""
        return randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    @staticmethod
    def log_prob(sample: Tensor, mean: Tensor, std: Union[Tensor, float], mask: Optional[Tensor] = None) -> Tensor:
        """Gaussian log-density of ``sample`` under ``N(mean, std²)``, averaged over all non-batch elements (or over
        those where ``mask`` is 1: the elements a region-restricted step draws noise on).

        Computed in (at least) float32 whatever the input dtype, as Flow-GRPO does: with the average over many
        elements, bf16 rounding would swamp the differences that the policy ratio measures.

        Args:
            sample (Tensor): ``[B, ...]``.
            mean (Tensor): broadcastable to ``sample``.
            std (Tensor | float): a scalar, ``[B]``, or broadcastable to ``sample``; must be positive.
            mask (Tensor | None): 0/1, broadcastable to ``sample``; a sample whose mask is empty gets 0.

        Returns:
            Tensor: ``[B]``.
        """
        dtype = torch.promote_types(sample.dtype, torch.float32)
        std = torch.as_tensor(std, device=sample.device)
        if std.ndim == 1 and sample.ndim > 1 and std.shape[0] == sample.shape[0]:
            std = std.view(-1, *([1] * (sample.ndim - 1)))
        std = std.to(dtype)
        if bool((std <= 0).any()):
            raise ValueError("log_prob needs std > 0: a deterministic step (std = 0) has no Gaussian density")
        x = sample.to(dtype)
        mu = mean.to(dtype)
        lp = -((x - mu) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        lp = lp.expand(torch.broadcast_shapes(lp.shape, x.shape))
        if lp.ndim <= 1:
            return lp
        return masked_mean(lp, mask)


def randn(shape: Sequence[int], generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator seeds CUDA runs too)."""
    draw_on = generator.device if generator is not None else device
    x = torch.randn(tuple(shape), generator=generator, device=draw_on, dtype=dtype)
    return x if device is None else x.to(device)


def as_time(t: Union[Tensor, float], like: Tensor) -> Tensor:
    """``t`` as a tensor on ``like``'s device, checked to be 0-dim or ``[B]`` for ``like`` of shape ``[B, ...]``."""
    t = torch.as_tensor(t, device=like.device)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, like.shape[0])):
        raise ValueError(f"t must be 0-dim or of shape [B] = [{like.shape[0]}], got shape {tuple(t.shape)}")
    return t


def expand(coef: Tensor, like: Tensor) -> Tensor:
    """A 0-dim or ``[B]`` coefficient shaped ``[B or 1, 1, ..., 1]`` to broadcast over ``like``."""
    return coef.reshape(-1, *([1] * (like.ndim - 1))) if like.ndim > 0 else coef.reshape(())


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """At least float32, float64 where an input is."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def batch_std(std: Tensor, like: Tensor) -> Tensor:
    """``std`` expanded to the canonical ``[B, 1, ..., 1]`` of :class:`StepOutput`."""
    shape = (like.shape[0], *([1] * (like.ndim - 1)))
    return expand(std, like).expand(shape).clone()


def masked_mean(values: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Per-sample mean of ``values [B, ...]`` over its non-batch elements, or over those where ``mask`` (0/1,
    broadcastable to ``values``) is 1; a sample with an empty mask gets 0."""
    dims = tuple(range(1, values.ndim))
    if mask is None:
        return values.mean(dim=dims)
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1)
