"""Denoiser weights in and out: a new run's starting weights (a safetensors file or a prefalign checkpoint) and
``prefalign export``'s safetensors file."""

from __future__ import annotations

from typing import Optional

import torch
from safetensors.torch import load_file

from prefalign.data.errors import DataError
from prefalign.denoisers.base import PortraitDenoiser
from prefalign.files import atomic_write
from prefalign.hub import load_adapter
from prefalign.lora import LoraSettings, add_lora, adopt_adapter, continue_run, trained_in_fp32


def start(module, init_weights: Optional[str], init_adapter: Optional[str], lora: Optional[LoraSettings]) -> None:
    """Give ``module`` (an ``AlignmentModule``) its starting weights and what it trains: ``model.init_weights`` (a
    safetensors file, or a prefalign checkpoint: a full run's weights, or a LoRA run's adapters to continue),
    ``model.init_adapter`` (pushed adapters), fresh LoRA adapters for ``lora``, or the full weights. Sets
    ``module.lora`` to the LoRA settings it trains with (None: full fine-tuning)."""
    denoiser = module.denoiser
    module.lora = lora
    checkpoint = read_start_checkpoint(init_weights) if init_weights and init_weights.endswith(".ckpt") else None
    if init_weights is not None and checkpoint is None:
        load_denoiser_weights(denoiser, init_weights)
    elif checkpoint is not None and checkpoint[1] is None:  # a full fine-tuning run's weights: the base to start from
        load_denoiser_state(denoiser, checkpoint[0], init_weights)
    if init_adapter is not None:
        module.lora = adopt_adapter(module, load_adapter(denoiser, init_adapter), init_adapter, lora)
        module.refresh_reference()  # the reference is the model as loaded, adapters included
    elif lora is not None:
        add_lora(module, lora)
    else:
        trained_in_fp32(denoiser)
    if checkpoint is not None and checkpoint[1] is not None:
        continue_run(module, init_weights, *checkpoint)


def read_start_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """The denoiser tensors of a Lightning checkpoint written by prefalign (``model.init_weights``: a new run from
    a trained one) and its LoRA settings (None for a full fine-tuning run). Read with ``weights_only`` (no code is
    unpickled) and memory-mapped."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise DataError("checkpoint not found", path=path, field="model.init_weights") from None
    except Exception as error:
        raise DataError(f"cannot read the checkpoint ({type(error).__name__}: {str(error)[:200]})", path=path,
                        field="model.init_weights") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise DataError("not a Lightning checkpoint (no state_dict)", path=path, field="model.init_weights")
    recorded = checkpoint.get("prefalign")
    if not isinstance(recorded, dict):
        raise DataError("not a checkpoint of a prefalign run (no 'prefalign' record)", path=path,
                        field="model.init_weights")
    state = {key.removeprefix("denoiser."): value for key, value in checkpoint["state_dict"].items()
             if key.startswith("denoiser.")}
    return state, recorded.get("lora")


def load_denoiser_weights(denoiser: PortraitDenoiser, path: str) -> None:
    """Load a safetensors file of denoiser weights; every tensor in the file must find its parameter."""
    try:
        state = load_file(path)
    except FileNotFoundError:
        raise DataError("weights file not found", path=path, field="model.init_weights") from None
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"cannot read weights ({error})", path=path, field="model.init_weights") from None
    load_denoiser_state(denoiser, state, path)


def load_denoiser_state(denoiser: PortraitDenoiser, state: dict[str, torch.Tensor], path: str) -> None:
    """Load full denoiser weights (the codec and audio encoder may be left out); every tensor must find its place
    and every other denoiser tensor must be there."""
    result = denoiser.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise DataError(
            f"{len(result.unexpected_keys)} tensors do not belong to this denoiser, e.g. {result.unexpected_keys[:3]} "
            "(does the recipe's denoiser config match the one the weights were trained with?)",
            path=path,
            field="model.init_weights",
        )
    trained = [k for k in result.missing_keys if not k.startswith(("codec.", "audio_encoder."))]
    if trained:
        raise DataError(
            f"{len(trained)} denoiser tensors are missing, e.g. {trained[:3]}", path=path, field="model.init_weights"
        )


def export_denoiser_weights(checkpoint: str, out: str, dtype: str = "float32") -> None:
    """Write the denoiser weights of a Lightning checkpoint as one safetensors file (what ``init_weights`` reads),
    floating-point tensors cast to ``dtype`` (``float16`` halves the file; loading casts back to the model's)."""
    from safetensors.torch import save_file

    allowed = ("float32", "float16", "bfloat16")
    if dtype not in allowed:  # an integer dtype would round every weight to zero and still "succeed"
        raise ValueError(f"--dtype must be one of {', '.join(allowed)} (a floating dtype), got {dtype!r}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    weights = {
        key.removeprefix("denoiser."): (value.to(getattr(torch, dtype)) if value.is_floating_point() else value).contiguous()
        for key, value in state.items()
        if key.startswith("denoiser.") and not key.startswith("denoiser.codec.")
    }
    if any("lora_" in key for key in weights):
        raise ValueError(f"{checkpoint} is a LoRA run: export its adapters, not merged base weights")
    with atomic_write(out) as tmp:
        save_file(weights, str(tmp), metadata={"source": str(checkpoint)})
