"""LoRA in one place: the settings, their resolved values (alpha, targets), and adding, loading or continuing the
adapters of a module's denoiser with the base frozen.

The functions take the ``AlignmentModule`` (``module``) because the adapters' starting values are kept on it, as
buffers of ``module.reference_snapshot``, so that a checkpoint carries the reference policy exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from torch import nn

from prefalign.data.errors import DataError

if TYPE_CHECKING:
    from peft import LoraConfig

    from prefalign.denoisers.base import PortraitDenoiser


@dataclass
class LoraSettings:
    """LoRA adapters (peft) on the backbone; the base weights stay frozen."""

    rank: int = 16
    """Adapter rank r."""
    alpha: Optional[float] = None
    """Scaling numerator: the update is scaled by alpha / rank (defaults to rank, i.e. scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: Optional[list[str]] = None
    """Module names (suffixes) to adapt; defaults to the backbone family's attention and MLP projections."""
    train_new_modules: bool = True
    """Also train the conditioning modules the denoiser adds (audio attention...) in full; their values at the
    start are kept so that ``reference()`` still gives the starting model exactly."""

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"model.lora.rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"model.lora.alpha must be a number > 0, or null (= rank), got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("model.lora.target_modules must name modules, or be null (the backbone's defaults), "
                             "got an empty list")


def resolved(settings: Optional[LoraSettings], denoiser: PortraitDenoiser) -> Optional[dict]:
    """The settings with their defaults filled in (alpha = rank, the backbone family's targets), as checkpoints
    record them; None for full fine-tuning."""
    if settings is None:
        return None
    return {
        "rank": settings.rank,
        "alpha": settings.alpha if settings.alpha is not None else settings.rank,
        "dropout": settings.dropout,
        "target_modules": list(settings.target_modules or denoiser.default_lora_targets),
        "train_new_modules": settings.train_new_modules,
    }


def peft_config(lora: dict, base_model: Optional[str] = None, inference_mode: bool = False) -> LoraConfig:
    """The peft ``LoraConfig`` of resolved settings (or a checkpoint's ``prefalign["lora"]`` entry)."""
    from peft import LoraConfig

    rank = int(lora["rank"])
    alpha = lora.get("alpha")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=float(lora.get("dropout") or 0.0),
        target_modules=sorted(lora["target_modules"]),
        base_model_name_or_path=base_model,
        inference_mode=inference_mode,
    )


def add_lora(module, settings: LoraSettings) -> None:
    """Inject fresh adapters into the denoiser's backbone and train them (:func:`train_adapters`)."""
    from peft import inject_adapter_in_model

    backbone = module.denoiser.backbone
    backbone.requires_grad_(False)
    inject_adapter_in_model(peft_config(resolved(settings, module.denoiser)), backbone)
    train_adapters(module, settings)


def adopt_adapter(module, config: LoraConfig, source: str, lora: Optional[LoraSettings]) -> LoraSettings:
    """Train the adapters ``hub.load_adapter`` loaded from ``source`` (``model.init_adapter``) with their peft
    ``config``: their rank, alpha and targets become the run's settings, which ``lora``, if given, must match."""
    settings = LoraSettings(
        rank=config.r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=sorted(config.target_modules),
        train_new_modules=lora.train_new_modules if lora is not None else True,
    )
    if lora is not None:
        given = resolved(lora, module.denoiser)
        given = (given["rank"], given["alpha"], sorted(given["target_modules"]))
        if given != (settings.rank, settings.alpha, settings.target_modules):
            raise ValueError(
                f"model.lora (rank {given[0]}, alpha {given[1]}, targets {given[2]}) disagrees with the adapters "
                f"of {source} (rank {settings.rank}, alpha {settings.alpha}, targets {settings.target_modules})"
            )
    train_adapters(module, settings)
    return settings


def continue_run(module, path: str, state: dict[str, torch.Tensor], recorded: dict) -> None:
    """Continue the adapters and new modules of a LoRA run's checkpoint (``model.init_weights``); the loaded model
    is the reference policy (as with ``init_adapter``)."""
    current = resolved(module.lora, module.denoiser)
    if current is None:
        raise DataError(f"a LoRA run's checkpoint (rank {recorded['rank']}) starts a LoRA run: set model.lora "
                        f"to rank {recorded['rank']}, alpha {recorded['alpha']}, target_modules "
                        f"{recorded['target_modules']}", path=path, field="model.init_weights")
    fields = ("rank", "alpha", "target_modules")
    if [current[f] for f in fields] != [recorded[f] for f in fields]:
        raise DataError(f"model.lora ({', '.join(f'{f} {current[f]}' for f in fields)}) differs from the "
                        f"checkpoint's ({', '.join(f'{f} {recorded[f]}' for f in fields)})", path=path,
                        field="model.init_weights")
    trained = {name for name, p in module.denoiser.named_parameters() if p.requires_grad}
    result = module.denoiser.load_state_dict(state, strict=False)
    missing = sorted(trained & set(result.missing_keys))
    if result.unexpected_keys or missing:
        raise DataError(f"the checkpoint does not fit this recipe's denoiser: {len(result.unexpected_keys)} "
                        f"tensors without a place (e.g. {result.unexpected_keys[:3]}), {len(missing)} trained "
                        f"tensors missing (e.g. {missing[:3]})", path=path, field="model.init_weights")
    trained_in_fp32(module.denoiser)
    module.refresh_reference()


def train_adapters(module, settings: LoraSettings) -> None:
    """Freeze the base, train the adapters (and the new modules, if so set), snapshot the start for reference()."""
    denoiser = module.denoiser
    for name, param in denoiser.backbone.named_parameters():
        param.requires_grad_("lora_" in name)
    for part in denoiser.new_modules().values():
        part.requires_grad_(settings.train_new_modules)
    trained_in_fp32(denoiser)
    if settings.train_new_modules:
        # Kept as buffers so that a checkpoint carries the reference exactly.
        module.reference_snapshot = nn.Module()
        for name, param in new_module_parameters(denoiser):
            module.reference_snapshot.register_buffer(name.replace(".", "__"), param.detach().clone())


def trained_in_fp32(denoiser: nn.Module) -> None:
    """Trained tensors in float32 over a frozen base in the recipe's dtype (cf. diffusers' ``cast_training_params``).

    In bf16 an update smaller than the weight's last bit (bf16 keeps 8: a step of lr 3e-6 on a weight of 0.01 is
    lost) leaves the weight unchanged, and AdamW's state in bf16 loses the small second moments: adapters then
    barely train. Mixed precision (``bf16-mixed``, FSDP's ``param_dtype``) still computes in bf16."""
    for param in denoiser.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def new_module_parameters(denoiser: PortraitDenoiser) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters of the conditioning modules the denoiser adds to its backbone, by their denoiser names."""
    for prefix, part in denoiser.new_modules().items():
        for name, param in part.named_parameters():
            yield f"{prefix}.{name}", param
