"""Supervised fine-tuning: the flow-matching (or diffusion) regression on ground-truth clips."""

from __future__ import annotations

from typing import Optional

import torch

from prefalign.algorithms.base import Algorithm, mouth_weights, per_sample_mse, with_pose


class SFT(Algorithm):
    """Denoising regression on ground-truth clips: ``E ||f(x_t, t, c) - target(x0, eps, t)||^2``, with the
    target the process defines (velocity for flow matching, eps or v for diffusion).

    The baseline every alignment method is compared to, and how the demo base model is made.

    Args:
        cond_dropout (float): probability of training a sample without its audio, so that sampling can use
            classifier-free guidance on speech (0 disables it).
        mouth_weight (float): extra loss weight on the latents around the mouth (a lip mask, as the Hallo line of
            work weighs its loss), located from the ``pose`` keypoints; a pixel in the box
            mouth ± (0.6·d, 0.8·d) weighs ``1 + mouth_weight``. 0 disables it; > 0 needs pose in the data.
        lr (float | None): the learning rate it is tuned at, in place of the optimizer's (see ``Algorithm.lr``).
        max_grad_norm (float | None): clip the gradient norm to this before each step.
    """

    def __init__(self, cond_dropout: float = 0.0, mouth_weight: float = 0.0, lr: Optional[float] = None,
                 max_grad_norm: Optional[float] = None):
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"SFT: cond_dropout must be in [0, 1), got {cond_dropout}")
        if mouth_weight < 0:
            raise ValueError(f"SFT: mouth_weight must be >= 0, got {mouth_weight}")
        self.cond_dropout = cond_dropout
        self.mouth_weight = mouth_weight
        self.set_optimization(lr, max_grad_norm)

    @property
    def required_fields(self) -> tuple[str, ...]:
        return with_pose(("video", "audio", "reference"), bool(self.mouth_weight))

    def loss(self, policy, batch):
        denoiser, process = policy.denoiser, policy.process
        x0 = denoiser.latents(batch)
        cond = denoiser.condition(batch)
        if self.cond_dropout > 0:
            keep = torch.rand(x0.shape[0], device=x0.device) >= self.cond_dropout
            cond = denoiser.drop_conditions(cond, keep)
        eps = torch.randn_like(x0)
        t = process.sample_t(x0.shape[0], device=x0.device)
        pred = denoiser(process.noise(x0, eps, t), process.model_time(t), cond)
        weights = mouth_weights(denoiser, batch, self.mouth_weight)
        loss = per_sample_mse(pred, process.target(x0, eps, t), weights).mean()
        return loss, {"loss": loss.detach()}

