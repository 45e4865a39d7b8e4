"""What a prefalign checkpoint holds besides Lightning's own state: only the tensors training changes, every
process's random state, and what a run was (for ``prefalign push`` and the model card).

LoRA runs leave the frozen base out of their checkpoints (and every run leaves out the frozen codec and audio
encoder): at load time the model built from the same recipe supplies them. Checkpoint files are written by
:class:`AtomicCheckpointIO` (the CLI's default): to a temporary file in the checkpoint's own folder, renamed over
it, so that a crash mid-save leaves the previous file whole on every filesystem layout. A damaged checkpoint (empty,
cut short, not a checkpoint) is refused with the name of the newest whole one beside it (:func:`check_checkpoint`).
"""

from __future__ import annotations

import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from torch import nn

from prefalign import lora
from prefalign.data.errors import DataError
from prefalign.files import atomic_write, remove_stale_temps
from prefalign.secrets import get_logger

log = get_logger(__name__)

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


def run_metadata(module) -> dict:
    """What ``checkpoint["prefalign"]`` records: enough to write an adapter and its model card."""
    return {
        "format": 1,
        "algorithm": module.algorithm.name,
        "denoiser": type(module.denoiser).__name__,
        "base_model": getattr(module.denoiser, "pretrained", None),
        "lora": lora.resolved(module.lora, module.denoiser),
        "new_modules": sorted(module.denoiser.new_modules()),
    }


# --- the module's checkpoint hooks ----------------------------------------------------------------------------------
def save_run_state(module, checkpoint: dict) -> None:
    """``on_save_checkpoint``: the trained tensors only, the run's record, and every rank's algorithm state and random
    state (ranks draw their own noise and cache their own clips' negatives), for an exact resume."""
    checkpoint.update(model_part(checkpoint["state_dict"], module))
    if module.trainer.fit_loop._should_accumulate():
        log.warning("checkpoint at step %d taken in the middle of a gradient accumulation window: the gradients "
                    "accumulated so far are not saved, so a resume from it is not exact", module.global_step)
    checkpoint["algorithm_states"] = gathered_objects(module, module.algorithm.state_dict())
    checkpoint["rng_states"] = gathered_objects(module, rng_state())


def load_run_state(module, checkpoint: dict) -> Optional[dict]:
    """``on_load_checkpoint``: refuse another kind of run, put the frozen weights back, and when fitting restore this
    rank's algorithm state. Returns this rank's random state, to be set at the first step (None: none recorded)."""
    from lightning.pytorch.trainer.states import TrainerFn

    check_run(checkpoint.get("prefalign"), module)
    algorithm = module.algorithm
    fitting = module._trainer is not None and module.trainer.state.fn == TrainerFn.FITTING
    recorded = (checkpoint.get("prefalign") or {}).get("algorithm")
    if fitting and recorded is not None and recorded != algorithm.name:
        raise ValueError(
            f"--ckpt_path resumes a run, with its step, optimizer and schedule: this checkpoint is a {recorded} "
            f"run's, this recipe trains {algorithm.name}. To start a {algorithm.name} run from its "
            "weights, give it as --model.init_weights (and no --ckpt_path)"
        )
    state = checkpoint.get("state_dict")  # absent where the strategy (FSDP) has loaded the weights itself
    if state is not None:
        complete_state(module, state)
    else:
        check_loaded_keys(checkpoint.get("prefalign"), module)
    if not fitting:
        return None
    rank, world = module.trainer.global_rank, module.trainer.world_size
    states, algorithm_states = checkpoint.get("rng_states"), checkpoint.get("algorithm_states")
    if states and len(states) != world:
        log.warning("the checkpoint was written by %d processes, this run has %d: the resumed run will not "
                    "repeat the first one's noise, and ranks start from rank 0's algorithm state", len(states), world)
    if algorithm_states:
        algorithm.load_state_dict(algorithm_states[rank if rank < len(algorithm_states) else 0])
    return states[rank] if states and rank < len(states) else None


def complete_state(module, state: dict) -> None:
    """Make a checkpoint's state dict fit ``module``: the frozen part back in, a full fine-tuning reference dropped
    when nothing needs it, a lagged reference snapshot's buffers registered."""
    if module._reference is None and any(k.startswith(REFERENCE) for k in state):
        # A full fine-tuning reference: needed to resume training, not to sample or evaluate.
        for key in [k for k in state if k.startswith(REFERENCE)]:
            del state[key]
    snapshot = [key for key in state if key.startswith("reference_snapshot.")]
    if snapshot and not hasattr(module, "reference_snapshot"):
        module.reference_snapshot = nn.Module()
    for key in snapshot:  # a lagged reference's snapshot (refresh_reference) has more tensors than the start's
        name = key.removeprefix("reference_snapshot.")
        if name not in module.reference_snapshot._buffers:
            module.reference_snapshot.register_buffer(name, torch.empty_like(state[key], device=module.device))
    restore_frozen(state, module)


# --- writing and checking checkpoint files ---------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, with every local checkpoint written through a temporary file in its own
    folder, flushed and renamed over the target (``prefalign.files.atomic_write``).

    Lightning's own save (``_atomic_save``, an fsspec transaction) stages the file in ``$TMPDIR``: where that is
    another filesystem than the checkpoints' (local disk and NFS or Lustre), the final "rename" is a copy, and a
    kill during it leaves ``last.ckpt`` cut short. Here the rename never leaves the folder, so it is atomic. A
    temporary file a killed save left (``.last.ckpt.<pid>.tmp``: no ``.ckpt`` suffix, so ``--ckpt_path last`` never
    picks it) is removed by the next save of the same file. Remote paths (``s3://``...) keep Lightning's save. Loading
    refuses a damaged file by name (:func:`check_checkpoint`) instead of a bare ``EOFError``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception:
            if _is_local(path) and checkpoint_damage(path) is not None:
                check_checkpoint(path)  # raises, naming the file and the newest whole checkpoint beside it
            raise


def _is_local(path) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


def checkpoint_damage(path: Union[str, Path]) -> Optional[str]:
    """What is wrong with a local checkpoint file, or None when it reads as whole: an archive ``torch.save`` wrote,
    complete, every tensor it lists present (checked memory-mapped: nothing big is read). A folder is whole only
    when it holds a sharded checkpoint (FSDP's ``meta.pt``, DeepSpeed's ``checkpoint/``); its shards are checked
    when they load."""
    path = Path(path)
    if path.is_dir():
        if (path / "meta.pt").is_file() or (path / "checkpoint").is_dir() or (path / "latest").is_file():
            return None
        return "it is a folder, neither a checkpoint file nor a sharded checkpoint's folder"
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return f"it is not a whole torch.save archive ({size} bytes: cut short, or not a checkpoint)"
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        if re.search(r"GLOBAL \S+ was not an allowed global|whose module \S+ is blocked", str(error)):
            return None  # whole: it holds objects only a full (trusted) load unpickles
        return f"it does not unpickle ({str(error).strip().splitlines()[-1][:200]})"
    except Exception as error:  # torch's zip reader raises RuntimeError for a missing or damaged record
        return f"it does not load ({type(error).__name__}: {str(error)[:200]})"
    return None


def newest_whole_checkpoint(folder: Union[str, Path], exclude: Optional[Path] = None,
                            limit: int = 20) -> Optional[Path]:
    """The most recently written checkpoint (``*.ckpt``) in ``folder`` that :func:`checkpoint_damage` finds whole
    (the ``limit`` newest are tried)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.iterdir() if p.suffix == ".ckpt" and (exclude is None or p.resolve() != exclude)]
    candidates.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for candidate in candidates[:limit]:
        try:
            if checkpoint_damage(candidate) is None:
                return candidate
        except OSError:
            continue
    return None


def check_checkpoint(path: Union[str, Path], field: str = "ckpt_path") -> None:
    """Refuse a damaged checkpoint before anything loads it: the error names the file, says what is wrong with it,
    and names the newest whole checkpoint in the same folder to resume from instead (or says there is none).

    Raises:
        DataError: the file is damaged (see :func:`checkpoint_damage`).
    """
    path = Path(path)
    damage = checkpoint_damage(path)
    if damage is None:
        return
    newest = newest_whole_checkpoint(path.parent, exclude=path.resolve())
    advice = (f"the newest whole checkpoint in {path.parent} is {newest}: resume from it with --ckpt_path {newest}"
              if newest is not None else f"there is no whole checkpoint in {path.parent}")
    raise DataError(f"the checkpoint is damaged: {damage}; {advice}", path=path, field=field)
