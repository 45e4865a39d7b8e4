"""Figure ``backbone_step``: an SFT step of the DiT and the UNet family at their demo sizes (recipes/demo/sft.yaml
and sft_svd.yaml), LoRA against full fine-tuning."""

from __future__ import annotations

import functools
import json

from benchmarks.figures.common import (
    SFT_RECIPE,
    batch_drift,
    demo_batch,
    from_recipe,
    module_step,
    parameter_split,
    recipe_name,
    without_trainer,
)
from benchmarks.harness import ROOT, Bench, Figure, Step
from prefalign.module import AlignmentModule

SVD_RECIPE = ROOT / "recipes" / "demo" / "sft_svd.yaml"
FAMILIES = {"Wan DiT": SFT_RECIPE, "SVD UNet": SVD_RECIPE}
LORA = {"rank": 16}  # the LoRA variants' ``model.lora``; the full fine-tuning ones set it to null


def family_module(recipe, lora: dict | None) -> AlignmentModule:
    """A family's demo module as its recipe builds it, with ``lora`` as its ``model.lora``. Seeded, so that a
    family's variants start from the same weights."""
    return from_recipe(recipe, "--model.lora", json.dumps(lora))[0]


def describe(modules: dict[str, AlignmentModule], batch_size: int, num_frames: int) -> Figure:
    wan = modules["Wan DiT"].denoiser.backbone.config
    unet = modules["SVD UNet"].denoiser.backbone.config

    def skeleton(family: str) -> str:
        keypoints = modules[family].denoiser.pose_keypoints
        return f", a skeleton of {keypoints} keypoints" if keypoints else ""

    return Figure(
        name="backbone_step",
        title="Backbone families: LoRA vs. full fine-tuning, Wan DiT and SVD UNet",
        description=(
            "One SFT training step of each backbone family at its demo size, with the model section of its recipe "
            f"as `prefalign fit` builds it: {recipe_name(SFT_RECIPE)} (`WanDenoiser`, a `WanTransformer3DModel` of "
            f"{wan.num_layers} blocks × {wan.num_attention_heads * wan.attention_head_dim} wide"
            f"{skeleton('Wan DiT')}, `FlowMatching`) and {recipe_name(SVD_RECIPE)} (`SVDDenoiser`, a "
            f"`UNetSpatioTemporalConditionModel` with block widths {list(unet.block_out_channels)} and "
            f"{unet.layers_per_block} layer per block, `Diffusion` with v-prediction{skeleton('SVD UNet')}); each "
            f"with its codec, `MelAudioEncoder` and audio attention, `SFT` and AdamW, on a batch of {batch_size} "
            f"TalkingShapes clips of {num_frames} frames at 32×32 with audio and pose (the batch of `sft_step`). A "
            "step: `AlignmentModule.training_step`, backward, AdamW step. **full FT**: every weight trains. "
            f"**LoRA**: `LoraSettings(rank={LORA['rank']})`, the family's default targets (self-attention and "
            "feed-forwards), base weights frozen; the conditioning modules the denoiser adds (audio attention, "
            "skeleton) train in full, as `train_new_modules` does by default. A family's two variants start from "
            "the same weights."
        ),
        baseline="Wan DiT full FT",
        compare_also=[(f"{family} LoRA", f"{family} full FT") for family in FAMILIES],
    )


def lora_note(family: str, full: dict[str, int], lora: dict[str, int]) -> str:
    total = lora["backbone"] + lora["adapters"] + lora["added"]
    return (
        f"{family} LoRA trains {lora['adapters']:,} adapter parameters "
        f"({100 * lora['adapters'] / full['backbone']:.1f}% of the backbone's {full['backbone']:,}) and the "
        f"{lora['added_trainable']:,} of the added conditioning "
        f"modules: {100 * (lora['adapters'] + lora['added_trainable']) / total:.1f}% of its {total:,} "
        f"parameters, against {full['backbone'] + full['added']:,} (100%) under full fine-tuning."
    )


def figure(bench: Bench) -> Figure:
    """An SFT step of the DiT and the UNet family at their demo sizes, LoRA against full fine-tuning."""
    built = {family: from_recipe(recipe, "--model.lora", "null") for family, recipe in FAMILIES.items()}
    data = built["Wan DiT"][1]  # the batch of sft_step, for both families
    figure = describe({family: module for family, (module, _) in built.items()}, data.batch_size, data.num_frames)
    if not bench.probing:
        figure.notes += batch_drift(SVD_RECIPE, built["SVD UNet"][1], data)
    del built  # read for their settings only: every variant builds its own
    batch = demo_batch(bench.device, data)
    split: dict[str, dict[str, int]] = {}

    def build(variant: str, recipe, lora: dict | None) -> Step:
        module = family_module(recipe, lora)
        split[variant] = parameter_split(module)
        return module_step(bench, module, batch)

    builders = {}
    for family, recipe in FAMILIES.items():
        builders[f"{family} full FT"] = functools.partial(build, f"{family} full FT", recipe, None)
        builders[f"{family} LoRA"] = functools.partial(build, f"{family} LoRA", recipe, LORA)
    with without_trainer():
        bench.compare(figure, builders)
    if bench.probing:
        return figure
    figure.notes += [lora_note(family, split[f"{family} full FT"], split[f"{family} LoRA"]) for family in FAMILIES]
    figure.notes.append(
        "The ratio column compares every variant with the Wan DiT's full fine-tuning, across families too; LoRA "
        "against full fine-tuning within a family is the pair of ratios under the table."
    )
    return figure
