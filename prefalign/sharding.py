"""Reading and substituting parameters when FSDP may have sharded them.

Under FSDP a parameter is whole only while the unit that owns it runs its forward (or inside
``summon_full_params``); between forwards each rank holds a flat slice. Two things prefalign does to trained
tensors must respect that: copying them (the lagged reference snapshot) and running the model with other values
for them (the lagged reference's forward). Without FSDP both reduce to plain tensor operations.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from prefalign.checkpoints import clean_name


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.fsdp_modules(model)


def _own_parameters(unit: nn.Module, prefix: str) -> dict[str, nn.Parameter]:
    """The parameters ``unit`` holds itself (not through a nested FSDP unit), by full names without wrapper
    prefixes; ``prefix`` is the unit's own name."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    nested = {id(p) for sub in unit.modules() if sub is not unit and isinstance(sub, FullyShardedDataParallel)
              for p in sub.parameters()}
    return {clean_name(f"{prefix}.{name}" if prefix else name): param
            for name, param in unit.named_parameters() if id(param) not in nested}


def _units_by_name(model: nn.Module) -> dict[str, nn.Module]:
    names = {id(module): clean_name(name) for name, module in model.named_modules()}
    return {names[id(unit)]: unit for unit in _fsdp_units(model)}


def whole_parameters(model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """``model``'s parameters, whole, by their names without wrapper prefixes: one dict at a time, each valid until
    the next is asked for. Without FSDP one dict of them all; under FSDP one per unit, gathered while it is current
    (one transformer block at a time, never the whole model at once). Every rank must iterate: it is collective.
    ``model`` is the outermost module (under FSDP the root wrapper, ``trainer.model``)."""
    units = _units_by_name(model)
    if not units:
        yield {clean_name(name): param for name, param in model.named_parameters()}
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    for prefix, unit in units.items():
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            yield _own_parameters(unit, prefix)


@torch.no_grad()
def copy_twin(model: nn.Module, source: str, target: str) -> None:
    """Copy every parameter and buffer under the prefix ``source`` onto its twin under ``target`` (a module of the
    same structure, such as a frozen copy of the denoiser). Under FSDP the twins are wrapped alike; each pair of
    units is gathered in turn, the target's written back to its shards. ``model`` as for ``whole_parameters``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    def copy(tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            if name.startswith(source) and target + name[len(source):] in tensors:
                tensors[target + name[len(source):]].copy_(value)

    units = _units_by_name(model)
    if not units:
        copy({clean_name(name): param for name, param in model.named_parameters()})
    for prefix, unit in units.items():
        if prefix.startswith(source):
            continue  # gathered with its twin
        pair = {prefix: unit}
        if prefix.startswith(target):
            twin = source + prefix[len(target):]
            if twin not in units:
                raise RuntimeError(f"FSDP made '{prefix}' a unit but not its twin '{twin}'")
            pair[twin] = units[twin]
        with ExitStack() as stack:
            for member in pair.values():
                stack.enter_context(FullyShardedDataParallel.summon_full_params(member, recurse=False, writeback=True))
            copy({name: p for unit_name, member in pair.items()
                  for name, p in _own_parameters(member, unit_name).items()})
    copy({clean_name(name): buffer for name, buffer in model.named_buffers()})


@contextmanager
def substituted(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run ``model`` with ``values`` (whole tensors, by names without wrapper prefixes, relative to ``model``) in
    place of those parameters, and nothing else changed.

    Each value goes in when the module that owns it starts its forward and comes out when it ends: under FSDP that
    is after the unit has gathered the parameter (which would otherwise overwrite the substitute) and before it
    frees it. Parameters that are whole already (no FSDP, or the root unit's, gathered for the whole step) are also
    substituted for the context's length, for modules that read them outside their own forward."""
    modules = {clean_name(name): module for name, module in model.named_modules()}
    owners: dict[nn.Module, dict[str, torch.Tensor]] = {}
    for name, value in values.items():
        path, _, attr = name.rpartition(".")
        if path not in modules:
            raise KeyError(f"no module '{path}' for the substitute of '{name}'")
        owners.setdefault(modules[path], {})[attr] = value

    def swap(module: nn.Module, replacement: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        previous = {}
        for attr, value in replacement.items():
            # Where attribute lookup finds it: a plain tensor FSDP set in __dict__ shadows the registered parameter.
            store = module.__dict__ if attr in module.__dict__ else module._parameters
            current = store[attr]
            if current is not None and current.shape != value.shape:
                continue  # sharded here: its owner's forward substitutes it once it is whole
            previous[attr] = current
            # In the dtype the unit computes in (FSDP mixed precision gathers bf16 copies of fp32 parameters).
            store[attr] = value if current is None else value.to(current.dtype)
        return previous

    def hooks(replacement: dict[str, torch.Tensor]):
        saved: list[dict[str, torch.Tensor]] = []  # a stack: a module may run inside its own forward

        def before(module, args):
            saved.append(swap(module, replacement))

        def after(module, args, output):
            swap(module, saved.pop())

        return before, after

    with ExitStack() as stack:
        for module, replacement in owners.items():
            before, after = hooks(replacement)
            stack.enter_context(module.register_forward_pre_hook(before))
            stack.enter_context(module.register_forward_hook(after, always_call=True))
            stack.callback(swap, module, swap(module, replacement))
        yield


def sharded_root(module) -> Optional[nn.Module]:
    """The FSDP wrapper around ``module`` (a LightningModule) when its trainer's strategy shards it, else None."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    trainer = module._trainer
    model = trainer.model if trainer is not None else None
    return model if isinstance(model, FullyShardedDataParallel) else None


def forwards_are_collective(module) -> bool:
    """Whether every forward of ``module`` (a LightningModule) gathers parameters from every rank (FSDP): then all
    ranks must run the same number of forwards, or the one that runs more waits forever."""
    return sharded_root(module) is not None and module.trainer.world_size > 1


def any_rank(module, flag: bool) -> bool:
    """``flag`` or-ed over all ranks (a collective: every rank must call it)."""
    total = module.trainer.strategy.reduce(torch.tensor(float(flag), device=module.device), reduce_op="sum")
    return bool(total > 0)
