"""Figure ``sft_step``: what one SFT training step of our module costs next to the bare diffusers model it wraps,
every variant built from recipes/demo/sft.yaml."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.figures.common import SFT_RECIPE, demo_batch, from_recipe, module_step, recipe_name, without_trainer
from benchmarks.harness import Bench, Figure, Step
from prefalign.module import AlignmentModule


def sft_module(audio: bool) -> AlignmentModule:
    """The SFT demo's module, fully fine-tuned; without ``audio``, without its audio encoder (so without the audio
    attention either). Seeded: the backbone starts from the same weights either way."""
    overrides = ["--model.lora", "null"]
    if not audio:
        overrides += ["--model.denoiser.init_args.audio_encoder", "null"]
    return from_recipe(SFT_RECIPE, *overrides)[0]


def bare_inputs(module: AlignmentModule, batch: dict) -> dict:
    """What the bare step feeds diffusers: the noisy latents with the reference latent concatenated on channels, the
    model timestep, an all-zero one-token text context, and the velocity target; made with ``module``'s codec and
    process."""
    codec, process = module.denoiser.codec, module.process
    x0 = codec.encode(batch["video"])
    reference = codec.encode(batch["reference"][:, None]).expand(-1, -1, x0.shape[2], -1, -1)
    generator = torch.Generator(device=x0.device).manual_seed(0)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = process.sample_t(x0.shape[0], device=x0.device, generator=generator)
    text_dim = module.denoiser.backbone.config.text_dim
    return {
        "hidden_states": torch.cat([process.noise(x0, eps, t), reference], dim=1),
        "timestep": process.model_time(t).to(x0.device),
        "encoder_hidden_states": torch.zeros(x0.shape[0], 1, text_dim, device=x0.device),
        "target": process.target(x0, eps, t),
    }


def bare_diffusers_step(bench: Bench, batch: dict) -> Step:
    """diffusers alone: the recipe's ``WanTransformer3DModel`` (the backbone of the module without audio, taken out
    of it), forward, MSE to the velocity, backward, the recipe's AdamW; inputs made once, outside the step."""
    module = sft_module(audio=False)
    inputs = bare_inputs(module, batch)
    target = inputs.pop("target")
    model = module.denoiser.backbone.to(bench.device).train()
    optimizer = module.optimizer_factory(model.parameters())

    def run() -> torch.Tensor:
        with bench.autocast():
            pred = model(**inputs, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return Step(run, optimizer, list(model.parameters()))


def same_backbone_check(bench: Bench, batch: dict) -> float:
    """Largest difference between the prefalign denoiser's and bare diffusers' predictions on the same input, before
    training (its audio attention starts at zero output): shows that both variants run the same network."""
    ours = sft_module(audio=True).denoiser.to(bench.device)
    bare_module = sft_module(audio=False)
    inputs = bare_inputs(bare_module, batch)
    bare = bare_module.denoiser.backbone.to(bench.device)
    with torch.no_grad():
        expected = bare(**{k: v for k, v in inputs.items() if k != "target"}, return_dict=False)[0]
        channels = ours.codec.latent_channels
        noisy, timestep = inputs["hidden_states"][:, :channels], inputs["timestep"]
        got = ours(noisy, timestep, ours.condition(batch))
    return (got - expected).abs().max().item()


def figure(bench: Bench) -> Figure:
    """What one SFT training step of our module costs next to the bare diffusers model it wraps."""
    module, data = from_recipe(SFT_RECIPE)
    wan = module.denoiser.backbone.config
    figure = Figure(
        name="sft_step",
        title="SFT training step: prefalign vs. bare diffusers",
        description=(
            f"One training step at the demo size, every variant built from {recipe_name(SFT_RECIPE)} as `prefalign "
            f"fit` builds it (Wan DiT {wan.num_layers} blocks × {wan.num_attention_heads * wan.attention_head_dim} "
            f"wide, PixelCodec, batch of {data.batch_size} TalkingShapes clips of {data.num_frames} frames at "
            "32×32, AdamW). **prefalign SFT**: `AlignmentModule.training_step` with `SFT` + `FlowMatching` + "
            "`WanDenoiser` (MelAudioEncoder, per-block audio cross-attention), backward, AdamW step; it encodes the "
            "clips, builds the conditions and draws noise and timesteps every step. **prefalign SFT, no audio**: the "
            "same without the audio encoder and attention, which separates the framework's overhead from the "
            "conditioning's cost. **bare diffusers**: the same `WanTransformer3DModel` (same initial weights) on the "
            "same latents, reference channels concatenated, same timestep, zero text context, MSE to the same "
            "velocity target, AdamW step; its inputs are made once, outside the step."
        ),
        baseline="bare diffusers",
    )
    del module  # read for its sizes only: every variant builds its own
    batch = demo_batch(bench.device, data)
    if not bench.probing:
        difference = same_backbone_check(bench, batch)
        if difference > 1e-4:
            raise RuntimeError(f"sft_step: the two variants do not run the same network (max difference {difference})")
        figure.notes.append(
            f"Same network: before training both predict the same output (max difference {difference:.1e})."
        )
    with without_trainer():
        return bench.compare(
            figure,
            {
                "bare diffusers": lambda: bare_diffusers_step(bench, batch),
                "prefalign SFT, no audio": lambda: module_step(bench, sft_module(audio=False), batch),
                "prefalign SFT": lambda: module_step(bench, sft_module(audio=True), batch),
            },
        )
