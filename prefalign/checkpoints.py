"""What a prefalign checkpoint holds besides Lightning's own state: only the tensors training changes, every
process's random state, and what a run was (for ``prefalign push`` and the model card).

LoRA runs leave the frozen base out of their checkpoints (and every run leaves out the frozen codec and audio
encoder): at load time the model built from the same recipe supplies them. Lightning writes checkpoint files
atomically (to a temporary file renamed over the target), so a crash mid-save leaves the previous file whole.
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from torch import nn

#: Wrapper names that FSDP and activation checkpointing insert into parameter names but not into state dict keys.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
#: The frozen full-fine-tuning reference (a module attribute); its weights are kept when its twin is trained.
REFERENCE = "_reference."


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def frozen_keys(module: nn.Module) -> set[str]:
    """State dict keys of parameters that training never changes: frozen ones, except the full-fine-tuning
    reference's copies of trained weights (a refreshed reference must come back as it was)."""
    params = {clean_name(n): p for n, p in module.named_parameters(remove_duplicate=False)}
    frozen = set()
    for name, param in params.items():
        if param.requires_grad:
            continue
        if name.startswith(REFERENCE):
            twin = params.get("denoiser." + name.removeprefix(REFERENCE))
            if twin is not None and twin.requires_grad:
                continue
        frozen.add(name)
    return frozen


def drop_frozen(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` without the frozen parameters of ``module``."""
    frozen = frozen_keys(module)
    return {key: value for key, value in state.items() if key not in frozen}


def model_part(state: dict[str, torch.Tensor], module: nn.Module, keep_frozen: bool = False) -> dict:
    """A checkpoint's model part: the state dict (without its frozen parameters unless ``keep_frozen``) and the
    run's description (``checkpoint["prefalign"]``), with the keys kept, so that a strategy that loads the weights
    without telling us which it found (FSDP, not strict) can still be checked."""
    kept = state if keep_frozen else drop_frozen(state, module)
    return {"state_dict": kept,
            "prefalign": {**run_metadata(module), "frozen_left_out": len(state) - len(kept), "keys": sorted(kept)}}


def check_loaded_keys(recorded: Optional[dict], module: nn.Module) -> None:
    """For a checkpoint a strategy has loaded itself, not strictly: every trained tensor of ``module`` must have
    been in it, and every reference snapshot tensor in it must have had a place here."""
    keys = set((recorded or {}).get("keys", ()))
    if not keys:
        return  # written before checkpoints recorded their keys
    trained = {clean_name(n) for n, p in module.named_parameters() if p.requires_grad}
    buffers = {clean_name(n) for n, _ in module.named_buffers()}
    missing = sorted(trained - keys)
    unplaced = sorted(k for k in keys if k.startswith("reference_snapshot.") and k not in buffers)
    if missing or unplaced:
        raise ValueError(f"the checkpoint does not fit this model: trained tensors missing from it {missing[:5]}, "
                         f"reference snapshot tensors with no place here {unplaced[:5]}")


def restore_frozen(state: dict[str, torch.Tensor], module: nn.Module) -> int:
    """Fill the frozen parameters a checkpoint left out from ``module``'s current values; returns how many.

    A missing *trained* tensor stays missing, so that strict loading still reports it."""
    current = module.state_dict()
    missing = [key for key in frozen_keys(module) if key not in state and key in current]
    for key in missing:
        state[key] = current[key]
    return len(missing)


def strategy_loads_weights(strategy) -> bool:
    """Whether the strategy loads a checkpoint's weights itself, before the module's ``on_load_checkpoint`` (FSDP,
    DeepSpeed): the module then cannot put the frozen weights back in first, so it loads non-strictly and checks
    the keys afterwards (``check_loaded_keys``)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy))


def check_run(recorded: Optional[dict], module) -> None:
    """Refuse a checkpoint made by another kind of run: other denoiser, base model, LoRA settings or new modules.
    Its frozen weights come from the model this recipe builds, so they must be the same ones."""
    if not recorded:
        return
    current = run_metadata(module)
    for field in ("denoiser", "base_model", "lora", "new_modules"):
        if field in recorded and recorded[field] != current[field]:
            raise ValueError(
                f"the checkpoint was written by a run with {field} = {recorded[field]!r}, this recipe builds "
                f"{current[field]!r}: load it with the recipe it was trained with"
            )


# --- random states -------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch, CUDA, numpy and Python random states as tensors (so that checkpoints holding them load
    with ``weights_only``)."""
    version, words, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().long(),
        "python": torch.tensor([version, *words], dtype=torch.long),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.tensor([*keys.tolist(), position, has_gauss], dtype=torch.long),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().long()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).cpu())
    python = state["python"].tolist()
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss if has_gauss else None))
    numpy = state["numpy"].tolist()
    keys = np.asarray(numpy[:-2], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, numpy[-2], numpy[-1], float(state["numpy_gauss"][0])))


def gathered_objects(module, value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order; a collective under DDP."""
    if module.trainer.world_size == 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * module.trainer.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def lora_metadata(module) -> Optional[dict]:
    """The LoRA settings of a module as peft needs them (``None`` for full fine-tuning)."""
    settings = module.lora
    if settings is None:
        return None
    return {
        "rank": settings.rank,
        "alpha": settings.alpha if settings.alpha is not None else settings.rank,
        "dropout": settings.dropout,
        "target_modules": list(settings.target_modules or module.denoiser.default_lora_targets),
        "train_new_modules": settings.train_new_modules,
    }


def run_metadata(module) -> dict:
    """What ``checkpoint["prefalign"]`` records: enough to write an adapter and its model card."""
    return {
        "format": 1,
        "algorithm": module.algorithm.name,
        "denoiser": type(module.denoiser).__name__,
        "base_model": getattr(module.denoiser, "pretrained", None),
        "lora": lora_metadata(module),
        "new_modules": sorted(module.denoiser.new_modules()),
    }
