"""The policy: the model an algorithm trains, as the algorithm sees it.

An algorithm receives a :class:`Policy`, never the LightningModule: the denoiser and the process, the reference
policy, where it runs, and the few things that need the trainer (collectives across ranks, the optimizer steps of a
method that steps itself). A plain ``Policy`` runs every loss outside Lightning (a test, a notebook); the module
hands algorithms a :class:`ModulePolicy`, which answers the same questions from the trainer.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from prefalign import sampling, sharding
from prefalign.denoisers.base import PortraitDenoiser
from prefalign.processes.base import Process


class Policy:
    """The trained model, one process, no trainer.

    Args:
        denoiser (PortraitDenoiser): the model being trained.
        process (Process): flow matching or diffusion.
        optimizer (torch.optim.Optimizer | None): what :meth:`optimizer_step` steps, for a method that steps its
            optimizer itself (GRPO); None: such a method cannot train.
        global_step (int): optimizer steps taken so far (seeds step-keyed noise).
        global_rank (int): this process's rank.
    """

    def __init__(self, denoiser: PortraitDenoiser, process: Process,
                 optimizer: Optional[torch.optim.Optimizer] = None, global_step: int = 0, global_rank: int = 0):
        self._denoiser = denoiser
        self._process = process
        self.optimizer = optimizer
        self.frozen_copy: Optional[nn.Module] = None
        self._step = global_step
        self._rank = global_rank

    @property
    def denoiser(self) -> PortraitDenoiser:
        return self._denoiser

    @property
    def process(self) -> Process:
        return self._process

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def global_step(self) -> int:
        return self._step

    @property
    def global_rank(self) -> int:
        return self._rank

    # --- the reference policy ---------------------------------------------------------------------------------
    @contextmanager
    def reference(self) -> Iterator[sampling.Model]:
        """The frozen reference policy, under no_grad: ``with policy.reference() as ref: pred = ref(x_t, t, cond)``."""
        if self.frozen_copy is None:
            raise RuntimeError("this policy has no reference: call refresh_reference() first")
        with torch.no_grad():
            yield self.frozen_copy

    def refresh_reference(self) -> None:
        """Make the reference a frozen copy of the policy as it is now."""
        self.frozen_copy = copy.deepcopy(self.denoiser).requires_grad_(False).eval()

    # --- sampling --------------------------------------------------------------------------------------------------
    def sample(self, batch: dict, num_frames: int, generator: torch.Generator, num_steps: int,
               guidance_scale: float = 1.0) -> torch.Tensor:
        """Latents ``[B, C, F, h, w]`` of the policy's deterministic samples for the batch's conditions."""
        return sampling.sample_clip_latents(self.denoiser, self.denoiser, self.process, batch, num_frames, generator,
                                            num_steps, guidance_scale=guidance_scale)

    # --- ranks -----------------------------------------------------------------------------------------------------
    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over every rank (a collective)."""
        return value

    def any_rank(self, flag: bool) -> bool:
        """``flag`` or-ed over every rank (a collective)."""
        return flag

    def forwards_are_collective(self) -> bool:
        """Whether every forward gathers parameters from every rank (FSDP): then all ranks must run as many."""
        return False

    # --- the optimizer, for methods that step it themselves ------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        self._optimizer().zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, max_grad_norm: Optional[float] = None) -> None:
        """Clip the gradients' global norm to ``max_grad_norm`` (None: no clipping), then step."""
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_grad_norm)
        self._optimizer().step()

    def _optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise RuntimeError("this policy has no optimizer: give Policy(..., optimizer=...) to step it")
        return self.optimizer


class ModulePolicy(Policy):
    """The policy as ``AlignmentModule`` trains it: its reference (LoRA adapters off, or the frozen copy), its
    trainer's step, rank and collectives, and Lightning's manual optimization (precision, strategy, the LR
    scheduler stepped with the optimizer).

    Args:
        module: the ``AlignmentModule`` (not imported here: the module builds its policy, never the reverse).
    """

    def __init__(self, module):
        super().__init__(module.denoiser, module.process)
        self._module = module

    @property
    def denoiser(self) -> PortraitDenoiser:
        return self._module.denoiser  # as the strategy has wrapped it, where it has

    @property
    def process(self) -> Process:
        return self._module.process

    @property
    def device(self) -> torch.device:
        return self._module.device

    @property
    def global_step(self) -> int:
        return self._module.global_step

    @property
    def global_rank(self) -> int:
        return self._module.global_rank

    def reference(self):
        return self._module.reference()

    def refresh_reference(self) -> None:
        self._module.refresh_reference()

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self._module._trainer is None:
            return value
        return self._module.trainer.strategy.reduce(value, reduce_op="sum")

    def any_rank(self, flag: bool) -> bool:
        return flag if self._module._trainer is None else sharding.any_rank(self._module, flag)

    def forwards_are_collective(self) -> bool:
        return sharding.forwards_are_collective(self._module)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._module.trainable_parameters()

    def zero_grad(self) -> None:
        self._module.optimizers().zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self._module.manual_backward(loss)

    def optimizer_step(self, max_grad_norm: Optional[float] = None) -> None:
        optimizer = self._module.optimizers()
        if max_grad_norm is not None:
            self._module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler = self._module.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
