"""The reference policy of ``AlignmentModule``: the frozen starting model, or a lagged copy of the trained one.

Under LoRA no second copy of the weights exists: the reference runs the denoiser with its adapters switched off, or
with the trained tensors (adapters, new modules) replaced by the values in ``module.reference_snapshot``. Under full
fine-tuning it is a frozen copy, ``module._reference``. Both live on the module so that checkpoints carry them.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from prefalign import sharding


@contextmanager
def reference(module) -> Iterator[Callable[..., torch.Tensor]]:
    """Run the frozen reference policy: ``with reference(module) as ref: pred = ref(x_t, t, cond)``.

    Under LoRA the adapters are switched off (no second copy of the weights) and any fully trained new
    modules take their starting values; under full fine-tuning it is a frozen copy made at setup.
    """
    with torch.no_grad():
        if module.lora is None:
            if module._reference is None:
                raise RuntimeError(f"{module.algorithm.name} uses a reference policy but none was set up")
            yield module._reference
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        denoiser = module.denoiser
        snapshot = getattr(module, "reference_snapshot", None)
        values = {} if snapshot is None else {n.replace("__", "."): v for n, v in snapshot.named_buffers()}
        lagged = any("lora_" in name for name in values)  # refresh() snapshotted the adapters
        layers = [] if lagged else [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            if not values:
                yield denoiser
            else:
                def lagged_policy(*args, **kwargs):
                    with sharding.substituted(denoiser, values):
                        return denoiser(*args, **kwargs)

                yield lagged_policy
        finally:
            for layer in layers:
                layer.enable_adapters(True)


def refresh(module) -> None:
    """Make the reference equal to the current policy (online DPO, ReFree's lagged reference, self-play).

    Under LoRA the trained tensors (adapters and new modules) are copied into ``reference_snapshot`` and the
    reference runs the adapted model with those values: a lagged copy of what is trained, never of the base.
    Under full fine-tuning the frozen copy takes the current weights.
    """
    if module.lora is not None:
        if not hasattr(module, "reference_snapshot"):
            module.reference_snapshot = nn.Module()
        snapshot = module.reference_snapshot._buffers
        for params in sharding.whole_parameters(outermost(module)):  # under FSDP, one unit at a time
            for name, param in params.items():
                if not (param.requires_grad and name.startswith("denoiser.")):
                    continue
                key = name.removeprefix("denoiser.").replace(".", "__")
                if key in snapshot:
                    snapshot[key].copy_(param.detach())
                else:
                    module.reference_snapshot.register_buffer(key, param.detach().clone())
        return
    if module._reference is None:
        # Share the frozen codec (and a frozen audio encoder) instead of copying their weights.
        denoiser = module.denoiser
        memo = {id(denoiser.codec): denoiser.codec}
        encoder = denoiser.audio_encoder
        if encoder is not None and not any(p.requires_grad for p in encoder.parameters()):
            memo[id(encoder)] = encoder
        module._reference = copy.deepcopy(denoiser, memo).requires_grad_(False).eval()
    else:
        sharding.copy_twin(outermost(module), "denoiser.", "_reference.")  # under FSDP, a unit at a time


def outermost(module) -> nn.Module:
    """The module as the strategy wrapped it (the FSDP root), or itself outside a trainer."""
    model = module._trainer.model if module._trainer is not None else None
    return model if model is not None else module
