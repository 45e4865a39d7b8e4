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
    # A wrapper (an FSDP unit) and the module it wraps share a name once the wrapper prefixes go; the wrapped one
    # (later in the walk) owns the parameters.
    modules = {clean_name(name + ".").removesuffix("."): module for name, module in model.named_modules()}
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


def clip_sharded(module, max_norm: Optional[float], algorithm: Optional[str]) -> bool:
    """Clip the gradients' global norm through the FSDP root, where ``module`` is sharded and the clipping is by
    norm: the norm is over every rank's shard, which only the root can take (Lightning's FSDP plugin refuses).
    Returns whether it clipped (else the strategy's own clipping applies)."""
    root = sharded_root(module)
    if root is None or not max_norm or algorithm not in (None, "norm"):
        return False
    root.clip_grad_norm_(max_norm)
    return True


def forwards_are_collective(module) -> bool:
    """Whether every forward of ``module`` (a LightningModule) gathers parameters from every rank (FSDP): then all
    ranks must run the same number of forwards, or the one that runs more waits forever."""
    return sharded_root(module) is not None and module.trainer.world_size > 1


def any_rank(module, flag: bool) -> bool:
    """``flag`` or-ed over all ranks (a collective: every rank must call it)."""
    total = module.trainer.strategy.reduce(torch.tensor(float(flag), device=module.device), reduce_op="sum")
    return bool(total > 0)


# --- FSDP units of one dtype ----------------------------------------------------------------------------------------
def plan_units(root: nn.Module, unit_classes: tuple[type, ...]) -> tuple[list[nn.Module], list[str]]:
    """The modules to make FSDP units besides ``root`` so that every unit's own parameters share one dtype, and the
    frozen parameters that must change dtype for that (cast here, in place). Returns the extra units and the cast
    parameters' names.

    FSDP (torch's FullyShardedDataParallel) flattens the parameters a unit holds into one tensor, which needs one
    dtype. A LoRA run over a bf16 base holds three kinds in every transformer block: the bf16 base, the fp32 tensors
    diffusers keeps in fp32 (``_keep_in_fp32_modules``: Wan's ``scale_shift_table`` and ``norm2``) and the fp32 adapters
    (trained tensors are always fp32). The rule:

    - the units are ``root``, every module of ``unit_classes`` (the recipe's ``auto_wrap_policy``) and, inside a unit
      whose dtype is not float32, every module that directly holds trained parameters (a LoRA ``lora_A``/``lora_B``
      linear layer): called through its own forward, it can be a unit of its own;
    - a unit's dtype is float32 for the root (it holds what prefalign adds, and the codec and audio encoder, which run
      outside any unit's forward; small, so upcasting them is cheap and lossless) and the dtype of the largest share
      of frozen parameters for the others (the base's);
    - frozen parameters of another dtype are cast to their unit's (Wan's fp32-kept tables become bf16, as in Wan's
      own FSDP setup, which computes every parameter in bf16); a trained parameter that cannot get a unit of its own
      is an error.
    """
    units = [root] + [m for m in root.modules() if m is not root and isinstance(m, unit_classes)]
    boundaries = {id(m) for m in units}
    names = {id(p): name for name, p in root.named_parameters()}
    extra: list[nn.Module] = []
    cast: list[str] = []

    def held(unit: nn.Module) -> Iterator[tuple[nn.Module, nn.Parameter]]:
        """(owner, parameter) for each parameter ``unit`` holds itself, not through a nested unit."""
        stack = [unit]
        while stack:
            module = stack.pop()
            for param in module._parameters.values():
                if param is not None:
                    yield module, param
            stack.extend(child for child in module.children() if id(child) not in boundaries)

    for unit in units:
        own = list(held(unit))
        if not own:
            continue
        frozen = [p for _, p in own if not p.requires_grad]
        if unit is root:
            dtype = torch.float32
        else:
            shares: dict[torch.dtype, int] = {}
            for p in frozen or [p for _, p in own]:
                shares[p.dtype] = shares.get(p.dtype, 0) + p.numel()
            dtype = max(shares, key=shares.get)
        split: set[int] = set()
        for owner, param in own:
            if param.dtype == dtype or not param.requires_grad or id(owner) in split:
                continue
            subtree = list(owner.parameters())
            if owner is unit or not all(p.requires_grad and p.dtype == param.dtype for p in subtree):
                raise ValueError(
                    f"FSDP: the trained parameter '{names[id(param)]}' ({param.dtype}) sits in a unit of {dtype} "
                    f"parameters and cannot get a unit of its own (its module '{type(owner).__name__}' also holds "
                    "other kinds); FSDP needs one dtype per unit"
                )
            split.add(id(owner))
            extra.append(owner)
        for owner, param in own:
            if param.dtype != dtype and not param.requires_grad and id(owner) not in split:
                param.data = param.data.to(dtype)
                cast.append(names[id(param)])
        boundaries.update(split)
    return extra, cast


def use_uniform_dtype_units(module: nn.Module, strategy) -> None:
    """Under Lightning's FSDPStrategy, wrap units of one dtype each (``configure_model``): the recipe's units (the
    transformer blocks) plus the adapters apart (see :func:`uniform_dtype_policy`). Other strategies: nothing."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        policy = uniform_dtype_policy(module, strategy.kwargs.get("auto_wrap_policy"))
        if policy is not None:
            strategy.kwargs["auto_wrap_policy"] = policy


def uniform_dtype_policy(module: nn.Module, policy) -> Optional[object]:
    """An FSDP ``auto_wrap_policy`` that wraps what ``policy`` (the recipe's: a set of module classes, or
    ``ModuleWrapPolicy``) wraps plus what :func:`plan_units` adds, with the casts it needs done on ``module``.
    Returns None (leave the recipe's policy alone) for a custom callable policy, which we cannot extend."""
    from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy

    if policy is None:
        classes: tuple[type, ...] = ()
    elif isinstance(policy, ModuleWrapPolicy):
        classes = tuple(policy._module_classes)
    elif isinstance(policy, (set, list, tuple)):
        classes = tuple(policy)
    else:
        return None
    extra, cast = plan_units(module, classes)
    if cast:
        from prefalign.secrets import get_logger

        get_logger(__name__).info(
            "FSDP: %d frozen tensors cast to their unit's dtype (one dtype per unit), e.g. %s", len(cast), cast[:3])
    wrapped = {id(m) for m in extra}
    return CustomPolicy(lambda m: isinstance(m, classes) or id(m) in wrapped)
