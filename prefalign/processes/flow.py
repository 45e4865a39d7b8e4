"""Rectified flow matching (the Wan / SD3 convention) with the Flow-GRPO and CPS stochastic samplers."""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
from torch import Tensor

from prefalign.processes.base import Process, StepOutput, as_time, batch_std, compute_dtype, expand, randn

__all__ = ["FlowMatching", "shift_sigma"]


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """The timestep shift ``σ' = shift·σ / (1 + (shift − 1)·σ)``: spends more of the steps at high noise for shift > 1.

    It fixes σ = 0 and σ = 1 and is monotone, so a shifted schedule still runs from pure noise to data.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


class FlowMatching(Process):
    """Rectified flow: ``x_σ = (1 − σ)·x0 + σ·eps``, the network predicts the velocity ``v = eps − x0``.

    σ runs from 1 (pure noise) to 0 (data); ``t`` is σ throughout and the network sees ``1000·σ`` (as Wan and SD3 do).
    Deterministic sampling is Euler on the ODE ``dx/dσ = v``. Stochastic sampling, which GRPO needs for log-probs, is
    one of:

    * ``"flow_grpo"``: the SDE of Flow-GRPO (Liu et al., 2025, https://arxiv.org/abs/2505.05470) with the same
      marginals as the ODE. With ``dt = σ_next − σ < 0`` and ``std_t = a·sqrt(σ/(1 − σ))``:
      ``mean = x·(1 + std_t²·dt/(2σ)) + v·(1 + std_t²·(1 − σ)/(2σ))·dt`` and ``std = std_t·sqrt(−dt)``.
      At σ = 1 ``std_t`` is infinite; there the denominator ``1 − σ`` of ``std_t`` is replaced by ``1 − σ_next`` (what
      Flow-GRPO does with its ``σ_max``, the schedule's second σ); the ``(1 − σ)`` in the mean stays 0.
    * ``"cps"``: coefficients-preserving sampling (Wang & Yu, 2025, https://arxiv.org/abs/2509.05952):
      ``std = σ_next·sin(a·π/2)``, ``x̂0 = x − σ·v``, ``x̂1 = x + (1 − σ)·v``,
      ``mean = (1 − σ_next)·x̂0 + sqrt(σ_next² − std²)·x̂1``. Its last step (σ_next = 0) is deterministic, so it has
      no log-prob: leave it out of the trained steps.

    Args:
        timestep_sampling (str): how training σ are drawn: ``"uniform"`` on [0, 1), ``"logit_normal"``
            (``sigmoid(N(logit_mean, logit_std²))``, as SD3), or ``"shifted"`` (uniform, then the shift map).
        logit_mean (float): mean of the normal before the sigmoid, for ``"logit_normal"``.
        logit_std (float): standard deviation of the normal before the sigmoid, for ``"logit_normal"``.
        shift (float): timestep shift applied to the sampling schedule (and to ``"shifted"`` training σ); Wan uses 5.0,
            1.0 keeps the plain linear schedule.
        noise_level (float): ``a``, the amount of noise of the stochastic step (0.7 in Flow-GRPO); in [0, 1] for CPS.
        sde (str): the stochastic sampler: ``"flow_grpo"`` or ``"cps"``.
    """

    prediction = "velocity"

    def __init__(
        self,
        timestep_sampling: Literal["uniform", "logit_normal", "shifted"] = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        noise_level: float = 0.7,
        sde: Literal["flow_grpo", "cps"] = "flow_grpo",
    ) -> None:
        if timestep_sampling not in ("uniform", "logit_normal", "shifted"):
            raise ValueError(
                f"timestep_sampling must be 'uniform', 'logit_normal' or 'shifted', got {timestep_sampling!r}")
        if sde not in ("flow_grpo", "cps"):
            raise ValueError(f"sde must be 'flow_grpo' or 'cps', got {sde!r}")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if noise_level < 0 or (sde == "cps" and noise_level > 1):
            raise ValueError(f"noise_level must be >= 0 (and <= 1 for sde='cps'), got {noise_level}")
        self.timestep_sampling = timestep_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.shift = shift
        self.noise_level = noise_level
        self.sde = sde

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(timestep_sampling={self.timestep_sampling!r}, logit_mean={self.logit_mean}, "
                f"logit_std={self.logit_std}, shift={self.shift}, noise_level={self.noise_level}, sde={self.sde!r})")

    def sample_t(self, n: int, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Training σ of shape ``[n]`` in [0, 1]."""
        draw_on = generator.device if generator is not None else device
        if self.timestep_sampling == "logit_normal":
            z = torch.randn(n, generator=generator, device=draw_on)
            sigma = torch.sigmoid(self.logit_mean + self.logit_std * z)
        else:
            sigma = torch.rand(n, generator=generator, device=draw_on)
            if self.timestep_sampling == "shifted":
                sigma = shift_sigma(sigma, self.shift)
        return sigma if device is None else sigma.to(device)

    def noise(self, x0: Tensor, eps: Tensor, t: Union[Tensor, float]) -> Tensor:
        """``x_σ = (1 − σ)·x0 + σ·eps``."""
        sigma = expand(as_time(t, x0), x0).to(torch.promote_types(x0.dtype, eps.dtype))
        return (1 - sigma) * x0 + sigma * eps

    def target(self, x0: Tensor, eps: Tensor, t: Union[Tensor, float]) -> Tensor:
        """The velocity ``eps − x0`` (independent of σ)."""
        return eps - x0

    def model_time(self, t: Union[Tensor, float]) -> Tensor:
        """``1000·σ``, the timestep scale of Wan and SD3."""
        return 1000.0 * torch.as_tensor(t, dtype=torch.float32)

    def timesteps(self, num_steps: int, device: Optional[torch.device] = None) -> Tensor:
        """``num_steps + 1`` σ from 1 to 0, linear then shifted."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        sigma = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        return shift_sigma(sigma, self.shift).to(device=device, dtype=torch.float32)

    def predict_x0(self, pred: Tensor, x_t: Tensor, t: Union[Tensor, float]) -> Tensor:
        """``x̂0 = x_σ − σ·v``."""
        dtype = compute_dtype(pred, x_t)
        sigma = expand(as_time(t, x_t), x_t).to(dtype)
        return x_t.to(dtype) - sigma * pred.to(dtype)

    def step(self, pred: Tensor, x_t: Tensor, t: Union[Tensor, float], t_next: Union[Tensor, float],
             stochastic: bool = False, noise: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None) -> StepOutput:
        """Move from σ = ``t`` to σ = ``t_next``: Euler when deterministic, else the configured SDE (see the class)."""
        dtype = compute_dtype(pred, x_t)
        x, v = x_t.to(dtype), pred.to(dtype)
        sigma = expand(as_time(t, x_t), x).to(dtype)
        sigma_next = expand(as_time(t_next, x_t), x).to(dtype)
        dt = sigma_next - sigma
        if not stochastic:
            if noise is not None:
                raise ValueError("noise was given for a deterministic step; pass stochastic=True to use it")
            mean = x + dt * v
            return StepOutput(sample=mean, mean=mean, std=batch_std(torch.zeros_like(sigma), x))

        a = self.noise_level
        if self.sde == "flow_grpo":
            one_minus = torch.where(sigma >= 1, 1 - sigma_next, 1 - sigma)
            std_t = a * torch.sqrt(sigma / one_minus)
            mean = (x * (1 + std_t**2 * dt / (2 * sigma))
                    + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt)
            std = std_t * torch.sqrt(-dt)
        else:
            std = sigma_next * math.sin(a * math.pi / 2)
            x0_hat = x - sigma * v
            x1_hat = x + (1 - sigma) * v
            mean = (1 - sigma_next) * x0_hat + torch.sqrt((sigma_next**2 - std**2).clamp_min(0)) * x1_hat

        if noise is None:
            noise = randn(x.shape, generator=generator, device=x.device, dtype=dtype)
        std = batch_std(std, x)
        return StepOutput(sample=mean + std * noise.to(dtype), mean=mean, std=std)
