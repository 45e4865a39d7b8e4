"""Supervised fine-tuning: the flow-matching (or diffusion) regression on ground-truth clips."""

from __future__ import annotations

import torch

from prefalign.algorithms.base import Algorithm, per_sample_mse


class SFT(Algorithm):
    """Denoising regression on ground-truth clips: ``E ||f(x_t, t, c) - target(x0, eps, t)||^2``, with the
    target the process defines (velocity for flow matching, eps or v for diffusion).

    The baseline every alignment method is compared to, and how the demo base model is made.

    Args:
        cond_dropout (float): probability of training a sample without its audio, so that sampling can use
            classifier-free guidance on speech (0 disables it).
    """

    def __init__(self, cond_dropout: float = 0.0):
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"SFT: cond_dropout must be in [0, 1), got {cond_dropout}")
        self.cond_dropout = cond_dropout

    def loss(self, module, batch):
        denoiser, process = module.denoiser, module.process
        x0 = denoiser.encode_video(batch["video"])
        cond = denoiser.condition(batch)
        if self.cond_dropout > 0:
            keep = torch.rand(x0.shape[0], device=x0.device) >= self.cond_dropout
            cond = denoiser.drop_conditions(cond, keep)
        eps = torch.randn_like(x0)
        t = process.sample_t(x0.shape[0], device=x0.device)
        pred = denoiser(process.noise(x0, eps, t), process.model_time(t), cond)
        loss = per_sample_mse(pred, process.target(x0, eps, t)).mean()
        return loss, {"loss": loss.detach()}
