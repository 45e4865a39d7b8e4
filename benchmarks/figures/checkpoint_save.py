"""Figure ``checkpoint_save``: the checkpoint a LoRA run of the DPO demo (recipes/demo/dpo.yaml) writes, its frozen
base left out, against full fine-tuning's and against the whole state dict of the same LoRA model: file size and
save time."""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
from pathlib import Path

import torch
from lightning.fabric.utilities.cloud_io import _atomic_save

from benchmarks.figures.common import demo_batch, from_recipe, module_step, parameter_split, recipe_name, without_trainer
from benchmarks.harness import MIB, ROOT, Bench, Figure, Step
from prefalign import checkpoints
from prefalign.lora import LoraSettings
from prefalign.module import AlignmentModule

DPO_RECIPE = ROOT / "recipes" / "demo" / "dpo.yaml"
CHECKPOINT_TRAIN_STEPS = 2  # optimizer steps before saving, so that AdamW's state exists as in a run's checkpoints
FULL, WHOLE = "full fine-tuning", "LoRA, whole state dict"


def dpo_module(lora: bool) -> AlignmentModule:
    """The DPO demo's module (seeded), with the recipe's ``lora`` or with ``lora: null`` (full fine-tuning)."""
    return from_recipe(DPO_RECIPE, *([] if lora else ["--model.lora", "null"]))[0]


def lightning_checkpoint(module: AlignmentModule, optimizer: torch.optim.Optimizer, whole: bool) -> dict:
    """What ``ModelCheckpoint`` writes for our module in one process, less Lightning's own bookkeeping (epoch,
    loops, callbacks: a few KiB): the model part as ``on_save_checkpoint`` leaves it (``checkpoints.model_part``:
    the trained tensors only; ``on_save_checkpoint`` itself gathers random states through a Trainer), or with
    ``whole`` the unfiltered ``state_dict()``; then the optimizer's state, the algorithm's and the random state."""
    checkpoint = checkpoints.model_part(module.state_dict(), module, keep_frozen=whole)
    checkpoint["optimizer_states"] = [optimizer.state_dict()]
    checkpoint["algorithm_states"] = [module.algorithm.state_dict()]
    checkpoint["rng_states"] = [checkpoints.rng_state()]
    return checkpoint


def tensor_mib(value) -> float:
    """The bytes of every tensor in a nested checkpoint structure, in MiB."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size() / MIB
    if isinstance(value, dict):
        return sum(tensor_mib(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_mib(v) for v in value)
    return 0.0


def checkpoint_save_step(bench: Bench, batch: dict, lora: bool, whole: bool, path: Path, saved: dict) -> Step:
    """Saving the DPO demo's module (with its LoRA, or fully fine-tuned) to ``path`` after ``CHECKPOINT_TRAIN_STEPS``
    training steps on ``batch``, as Lightning saves: ``_atomic_save`` serialises into memory, then writes through an
    fsspec transaction (a temporary file moved over the target)."""
    module = dpo_module(lora).to(bench.device)
    module.setup("fit")  # as Lightning before training: the algorithm's setup, the full fine-tuning reference copy
    train = module_step(bench, module, batch)
    for _ in range(CHECKPOINT_TRAIN_STEPS):
        train.run()
    saved[path] = module, train.optimizer

    def run() -> None:
        _atomic_save(lightning_checkpoint(module, train.optimizer, whole), path)

    if module._reference is not None:
        reference = list(module._reference.parameters())
    else:
        reference = list(getattr(module, "reference_snapshot", torch.nn.Module()).buffers())
    copies = {id(t) for t in reference}
    parameters = [p for p in module.parameters() if id(p) not in copies]
    return Step(run, train.optimizer, parameters, reference)


def restored_difference(path: Path, trained: AlignmentModule, lora: bool) -> float:
    """Load the checkpoint at ``path`` into a freshly built module, as ``prefalign`` loads one (the frozen tensors
    it left out come from the model the recipe builds), and return the largest difference from ``trained``'s
    tensors (its full fine-tuning reference copy aside: it is for resuming, not in a loaded model)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    fresh = dpo_module(lora)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    expected = {k: v for k, v in trained.state_dict().items() if not k.startswith(checkpoints.REFERENCE)}
    got = fresh.state_dict()
    if got.keys() != expected.keys():
        raise RuntimeError(
            f"checkpoint_save: {path.name} restores other tensors: {sorted(got.keys() ^ expected.keys())}"
        )
    return max((got[k].float() - expected[k].float().cpu()).abs().max().item() for k in expected)


def mount_of(path: Path) -> str:
    """The filesystem ``path`` is on, as '<mount point> (<type>)', from /proc/mounts (Linux); '' elsewhere."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    resolved = str(path.resolve())
    inside = [
        (point, kind) for point, kind in mounts if resolved == point or resolved.startswith(point.rstrip("/") + "/")
    ]
    point, kind = max(inside, key=lambda mount: len(mount[0]), default=("?", "?"))
    return f"{point} ({kind})"


def describe(lora: LoraSettings, adapters: str, pairs: int) -> Figure:
    settings = ", ".join(f"{k}: {json.dumps(v)}" for k, v in dataclasses.asdict(lora).items())
    return Figure(
        name="checkpoint_save",
        title="Checkpoint size and save time: LoRA vs. full fine-tuning",
        description=(
            f"Saving a checkpoint of the DPO demo's module, built from {recipe_name(DPO_RECIPE)} as `prefalign fit` "
            "builds it (the Wan DiT of `sft_step` with MelAudioEncoder and audio attention, `FlowMatching`, "
            f'`DiffusionDPO`, AdamW), after `module.setup("fit")` and {CHECKPOINT_TRAIN_STEPS} training steps on the '
            f"demo batch of {pairs} pairs, so that AdamW's state exists. A step builds the checkpoint "
            "`ModelCheckpoint` writes for our module in one process (`checkpoints.model_part(module.state_dict(), "
            "module)`, what `on_save_checkpoint` keeps: the trained tensors and the run's metadata, with "
            "`optimizer_states`, `algorithm_states` and the random state added; Lightning's own bookkeeping of a "
            "few KiB left out) and writes it with Lightning's `_atomic_save` (`torch.save` into memory, then an "
            "fsspec transaction: a temporary file moved over the target), over the same file every step. "
            f"**{FULL}** (baseline): `lora: null`; every denoiser weight trains, and the checkpoint holds them with "
            f"the frozen reference copy that DPO resumes from. **{adapters}**: the recipe's `lora` ({settings}): "
            "adapters on the backbone's self-attention and feed-forwards, the audio attention trained in full, its "
            "starting values kept as the reference; the checkpoint leaves out the frozen base. "
            f"**{WHOLE}**: the same LoRA module saved with its unfiltered `module.state_dict()`, base included: what "
            "a LoRA run writes without dropping the frozen base. The *checkpoint file* column is the file's size on "
            "disk."
        ),
        baseline=FULL,
        compare_also=[(WHOLE, adapters)],
        columns={"file_mib": "checkpoint file (MiB)"},
    )


def file_notes(adapters: str, sizes: dict, parts: dict, filesystem: str, split: dict[str, int]) -> list[str]:
    return [
        f"File size ratios: {adapters} / {FULL} = {sizes[adapters] / sizes[FULL]:.3f} "
        f"({sizes[adapters]:.2f} against {sizes[FULL]:.2f} MiB); {WHOLE} / {adapters} = "
        f"{sizes[WHOLE] / sizes[adapters]:.2f} ({sizes[WHOLE]:.2f} against {sizes[adapters]:.2f} MiB).",
        "What the files hold (tensor bytes): "
        + "; ".join(
            f"{name}: {count} model tensors, {model:.2f} MiB, and {optimizer:.2f} MiB of AdamW state"
            for name, (count, model, optimizer) in parts.items()
        )
        + ". Full fine-tuning's model tensors are the trained denoiser and its frozen reference copy for DPO "
        "(the *reference copy* column); LoRA's are the adapters, the audio attention and its starting values.",
        f"Restores exactly: each of the {FULL} and {adapters} files, loaded into a freshly built module "
        "(`on_load_checkpoint` then `load_state_dict`, strict; LoRA's frozen base from the recipe's seeded weights), "
        "gives every tensor of the trained module (max difference 0; the full fine-tuning reference copy aside, which "
        "only a resumed run needs).",
        f"Save time: building the checkpoint dict, `torch.save` into memory and the write to "
        f"{filesystem or 'the temporary folder'} (no fsync, so the page cache takes the write, as in training). The "
        "peak memory growth is the serialised copy in memory and what writing it takes; on CPU the memory the "
        "training steps freed before the baseline stays resident and the serialising reuses it, so the growth "
        "shows only what goes beyond that: the file column is the measure of size here.",
        f"What {adapters} trains at the demo size: {split['adapters']:,} adapter parameters and the "
        f"{split['added_trainable']:,} of the audio attention, against {split['backbone']:,} frozen backbone "
        "weights; so the audio attention (trained in full, and kept twice: trained values and starting values) is "
        "most of its file, and the file ratio to full fine-tuning is far above the adapters' share of the weights.",
    ]


def figure(bench: Bench) -> Figure:
    """The checkpoint a LoRA run writes (its frozen base left out) against full fine-tuning's and against the whole
    state dict of the same LoRA model: file size and save time."""
    module, data = from_recipe(DPO_RECIPE)
    if module.lora is None:
        raise ValueError(f"checkpoint_save: {recipe_name(DPO_RECIPE)} no longer trains LoRA")
    adapters = f"LoRA r{module.lora.rank}"
    figure = describe(module.lora, adapters, data.batch_size)
    del module  # read for its settings only: every variant builds its own
    batch = demo_batch(bench.device, data, pairs=True)
    saved: dict = {}
    settings = {FULL: (False, False), adapters: (True, False), WHOLE: (True, True)}  # (recipe's LoRA, whole)
    with tempfile.TemporaryDirectory(prefix="prefalign-benchmark-checkpoints-") as tmp, without_trainer():
        folder = Path(tmp)
        paths = {name: folder / f"{slug}.ckpt" for name, slug in ((FULL, "full"), (adapters, "lora"), (WHOLE, "whole"))}
        bench.compare(
            figure,
            {
                name: functools.partial(checkpoint_save_step, bench, batch, *settings[name], paths[name], saved)
                for name in (FULL, adapters, WHOLE)
            },
        )
        if bench.probing:
            return figure
        sizes = {name: path.stat().st_size / MIB for name, path in paths.items()}
        parts = {}
        for name, path in paths.items():
            checkpoint = lightning_checkpoint(*saved[path], settings[name][1])
            parts[name] = (
                len(checkpoint["state_dict"]),
                tensor_mib(checkpoint["state_dict"]),
                tensor_mib(checkpoint["optimizer_states"]),
            )
        restored = {name: restored_difference(paths[name], saved[paths[name]][0], settings[name][0])
                    for name in (FULL, adapters)}  # fmt: skip
        filesystem = mount_of(folder)
        split = parameter_split(saved[paths[adapters]][0])
    if max(restored.values()) > 0:
        raise RuntimeError(f"checkpoint_save: a saved checkpoint does not restore its model exactly: {restored}")
    for row in figure.rows:
        row["file_mib"] = sizes[row["variant"]]
    figure.notes += file_notes(adapters, sizes, parts, filesystem, split)
    return figure
