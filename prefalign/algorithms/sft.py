"""Supervised fine-tuning: the flow-matching (or diffusion) regression on ground-truth clips."""

from __future__ import annotations

from typing import Optional

import torch

from prefalign import metrics
from prefalign.algorithms.base import Algorithm, per_sample_mse


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
        return ("video", "audio", "reference") + (("pose",) if self.mouth_weight else ())

    def loss_weights(self, module, batch: dict) -> torch.Tensor | None:
        """Per-latent loss weights ``[B, 1, F, h, w]`` from the mouth box, or None."""
        return mouth_weights(module, batch, self.mouth_weight)

    def loss(self, module, batch):
        denoiser, process = module.denoiser, module.process
        x0 = denoiser.latents(batch)
        cond = denoiser.condition(batch)
        if self.cond_dropout > 0:
            keep = torch.rand(x0.shape[0], device=x0.device) >= self.cond_dropout
            cond = denoiser.drop_conditions(cond, keep)
        eps = torch.randn_like(x0)
        t = process.sample_t(x0.shape[0], device=x0.device)
        pred = denoiser(process.noise(x0, eps, t), process.model_time(t), cond)
        weights = self.loss_weights(module, batch)
        loss = per_sample_mse(pred, process.target(x0, eps, t), weights).mean()
        return loss, {"loss": loss.detach()}


def mouth_weights(module, batch: dict, mouth_weight: float) -> torch.Tensor | None:
    """Per-latent loss weights ``[B, 1, F, h, w]``: ``1 + mouth_weight`` on the latents of the box
    mouth ± (0.6·d, 0.8·d) located from the ``pose`` keypoints (d the eye distance), 1 elsewhere; None for 0."""
    if not mouth_weight:
        return None
    return 1 + mouth_weight * mouth_mask(module, batch)


def mouth_mask(module, batch: dict) -> torch.Tensor:
    """``[B, 1, F, h, w]``: 1 on the latents that encode a pixel of the box mouth ± (0.6·d, 0.8·d) located from the
    ``pose`` keypoints (d the eye distance), 0 elsewhere."""
    height, width = batch["reference"].shape[-2:]
    return module.denoiser.codec.pool_mask(metrics.training_mouth_box(batch["pose"], height, width))
