"""Discrete-time diffusion: DDPM noising and targets (eps or v), DDIM sampling with eta for log-probs (DDPO)."""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from torch import Tensor

from prefalign.processes.base import Process, StepOutput, as_time, batch_std, compute_dtype, expand, randn

__all__ = ["Diffusion"]


class Diffusion(Process):
    """DDPM (Ho et al., 2020) training and DDIM (Song et al., 2021, https://arxiv.org/abs/2010.02502) sampling.

    ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·eps`` for integer ``t`` in ``[0, num_train_timesteps)``; ``t = -1`` stands for
    the clean sample (ᾱ = 1) and ends every sampling schedule. Timesteps may be float tensors holding integer values.

    A step from ``t`` to ``t_next`` is DDIM: from the prediction it takes ``x̂0`` and ``ε̂``, then
    ``mean = sqrt(ᾱ_next)·x̂0 + sqrt(1 − ᾱ_next − σ²)·ε̂`` with
    ``σ = eta·sqrt((1 − ᾱ_next)/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_next)`` when stochastic (DDPO, Black et al., 2023,
    https://arxiv.org/abs/2305.13301) and σ = 0 otherwise. The last step (to ``t = -1``) has σ = 0 even when
    stochastic, so it has no log-prob: leave it out of the trained steps.

    Args:
        num_train_timesteps (int): number of discrete training timesteps N.
        beta_schedule (str): ``"linear"`` (betas linear in [beta_start, beta_end]) or ``"scaled_linear"`` (square roots
            linear, as Stable Diffusion).
        beta_start (float): the first beta.
        beta_end (float): the last beta.
        prediction (str): what the network predicts: ``"eps"`` (the noise) or ``"v"``
            (``sqrt(ᾱ)·eps − sqrt(1 − ᾱ)·x0``, Salimans & Ho, 2022).
        eta (float): stochasticity of stochastic steps in [0, 1]; 1.0 is DDPM's posterior variance (DDPO's choice).
        timestep_spacing (str): how the sampling schedule picks timesteps: ``"trailing"`` (starts at N − 1, the
            noisiest) or ``"leading"`` (multiples of N // num_steps, as early Stable Diffusion).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: Literal["linear", "scaled_linear"] = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prediction: Literal["eps", "v"] = "eps",
        eta: float = 1.0,
        timestep_spacing: Literal["trailing", "leading"] = "trailing",
    ) -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        if not 0 <= eta <= 1:
            # eta > 1 would ask for more noise than 1 − ᾱ_next leaves room for.
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if timestep_spacing not in ("trailing", "leading"):
            raise ValueError(f"timestep_spacing must be 'trailing' or 'leading', got {timestep_spacing!r}")
        n = num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"beta_schedule must be 'linear' or 'scaled_linear', got {beta_schedule!r}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.prediction = prediction
        self.eta = eta
        self.timestep_spacing = timestep_spacing
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        # ᾱ indexed by t + 1, so that t = -1 reads ᾱ = 1 (the clean sample).
        self._table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        self._tables: dict[torch.device, Tensor] = {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_train_timesteps={self.num_train_timesteps}, "
                f"beta_schedule={self.beta_schedule!r}, beta_start={self.beta_start}, beta_end={self.beta_end}, "
                f"prediction={self.prediction!r}, eta={self.eta}, timestep_spacing={self.timestep_spacing!r})")

    def alpha_bar(self, t: Union[Tensor, float]) -> Tensor:
        """ᾱ at integer-valued ``t`` in ``[-1, N)`` (float64, on ``t``'s device); ``ᾱ(-1) = 1``."""
        t = torch.as_tensor(t)
        if t.is_floating_point() and bool((t != t.round()).any()):
            raise ValueError(f"diffusion timesteps must be integers, got {t.tolist()}")
        idx = t.long() + 1
        if bool(((idx < 0) | (idx > self.num_train_timesteps)).any()):
            raise ValueError(f"diffusion timesteps must lie in [-1, {self.num_train_timesteps}), got {t.tolist()}")
        table = self._tables.get(idx.device)
        if table is None:
            table = self._tables[idx.device] = self._table.to(idx.device)
        return table[idx]

    def sample_t(self, n: int, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Uniform integers in ``[0, N)`` as a float tensor ``[n]``."""
        draw_on = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=draw_on).float()
        return t if device is None else t.to(device)

    def _coefs(self, t: Union[Tensor, float], like: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``sqrt(ᾱ_t)`` and ``sqrt(1 − ᾱ_t)`` shaped to broadcast over ``like``."""
        abar = expand(self.alpha_bar(as_time(t, like)), like)
        return abar.sqrt().to(dtype), (1 - abar).sqrt().to(dtype)

    def noise(self, x0: Tensor, eps: Tensor, t: Union[Tensor, float]) -> Tensor:
        """``x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·eps``."""
        a, s = self._coefs(t, x0, torch.promote_types(x0.dtype, eps.dtype))
        return a * x0 + s * eps

    def target(self, x0: Tensor, eps: Tensor, t: Union[Tensor, float]) -> Tensor:
        """``eps``, or ``v = sqrt(ᾱ_t)·eps − sqrt(1 − ᾱ_t)·x0``."""
        if self.prediction == "eps":
            return eps
        a, s = self._coefs(t, x0, torch.promote_types(x0.dtype, eps.dtype))
        return a * eps - s * x0

    def model_time(self, t: Union[Tensor, float]) -> Tensor:
        """The integer timestep as float32."""
        return torch.as_tensor(t).to(torch.float32)

    def timesteps(self, num_steps: int, device: Optional[torch.device] = None) -> Tensor:
        """``num_steps`` decreasing integer timesteps (as float32) followed by the terminal ``-1``."""
        n = self.num_train_timesteps
        if not 1 <= num_steps <= n:
            raise ValueError(f"num_steps must be in [1, {n}], got {num_steps}")
        k = torch.arange(num_steps, dtype=torch.float64)
        if self.timestep_spacing == "trailing":
            ts = torch.round(n - k * (n / num_steps)) - 1
        else:
            ts = (k * (n // num_steps)).flip(0)
        ts = torch.cat([ts, torch.tensor([-1.0], dtype=torch.float64)])
        return ts.to(device=device, dtype=torch.float32)

    def _x0_eps(self, pred: Tensor, x: Tensor, t: Union[Tensor, float]) -> tuple[Tensor, Tensor]:
        a, s = self._coefs(t, x, x.dtype)
        if self.prediction == "eps":
            return (x - s * pred) / a, pred
        return a * x - s * pred, s * x + a * pred

    def predict_x0(self, pred: Tensor, x_t: Tensor, t: Union[Tensor, float]) -> Tensor:
        """``x̂0`` from the eps or v prediction."""
        dtype = compute_dtype(pred, x_t)
        return self._x0_eps(pred.to(dtype), x_t.to(dtype), t)[0]

    def step(self, pred: Tensor, x_t: Tensor, t: Union[Tensor, float], t_next: Union[Tensor, float],
             stochastic: bool = False, noise: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None) -> StepOutput:
        """One DDIM step from ``t`` to ``t_next`` (see the class); ``t_next = -1`` lands on the clean sample."""
        dtype = compute_dtype(pred, x_t)
        x, p = x_t.to(dtype), pred.to(dtype)
        x0_hat, eps_hat = self._x0_eps(p, x, t)
        abar = expand(self.alpha_bar(as_time(t, x_t)), x)
        abar_next = expand(self.alpha_bar(as_time(t_next, x_t)), x)
        if stochastic:
            var = self.eta**2 * (1 - abar_next) / (1 - abar) * (1 - abar / abar_next)
        else:
            if noise is not None:
                raise ValueError("noise was given for a deterministic step; pass stochastic=True to use it")
            var = torch.zeros_like(abar)
        # The ᾱ-coefficients are formed in float64 and rounded once to the compute dtype.
        mean = abar_next.sqrt().to(dtype) * x0_hat + (1 - abar_next - var).clamp_min(0).sqrt().to(dtype) * eps_hat
        std = batch_std(var.sqrt().to(dtype), x)
        if not stochastic:
            return StepOutput(sample=mean, mean=mean, std=std)
        if noise is None:
            noise = randn(x.shape, generator=generator, device=x.device, dtype=dtype)
        return StepOutput(sample=mean + std * noise.to(dtype), mean=mean, std=std)
