"""Figure ``dpo_step``: one DPO training step of ours (recipes/demo/dpo.yaml) next to an SFT step on the same clips
and next to a naive DPO, ``NaiveDPO`` below."""

from __future__ import annotations

import math

import torch

from benchmarks.figures.common import demo_batch, from_recipe, module_step, recipe_name, without_trainer
from benchmarks.harness import ROOT, Bench, Figure, Step
from prefalign.algorithms import Algorithm
from prefalign.algorithms.base import per_sample_mse
from prefalign.algorithms.dpo import dpo_loss
from prefalign.module import AlignmentModule

DPO_RECIPE = ROOT / "recipes" / "demo" / "dpo.yaml"
DPO_CHECKED = ("loss", "error_win", "error_lose", "reference_error_win", "reference_error_lose")


class NaiveDPO(Algorithm):
    """The naive baseline of the ``dpo_step`` figure, written here and used nowhere else: Diffusion-DPO as a
    first implementation writes it. Not prefalign's :class:`~prefalign.algorithms.DiffusionDPO`.

    Winner and loser go through the policy in two forwards, and the reference is a frozen second copy of the whole
    denoiser without adapters (every weight twice), run in two more no-grad forwards. The noise, the timesteps and
    the loss (``dpo_loss``) are drawn and computed exactly as ``DiffusionDPO`` does for pairs without labels, so
    that both do the same work and give the same loss. ``naive_dpo_module`` builds it into the recipe's module (as
    ``--model.algorithm``, which keeps the recipe's ``beta``, ``loss_type`` and ``sft_weight``) and gives it its
    ``reference``.

    Args:
        beta, loss_type, sft_weight: as ``DiffusionDPO``.
    """

    required_fields = ("video", "rejected", "audio", "reference")

    def __init__(self, beta: float, loss_type: str = "sigmoid", sft_weight: float = 0.0):
        self.beta = beta
        self.loss_type = loss_type
        self.sft_weight = sft_weight
        self.reference: torch.nn.Module | None = None

    def loss(self, policy, batch):
        if self.reference is None:
            raise RuntimeError("NaiveDPO has no reference: build it with naive_dpo_module")
        denoiser, process = policy.denoiser, policy.process
        win = denoiser.encode_video(batch["video"])
        lose = denoiser.encode_video(batch["rejected"])
        cond = denoiser.condition(batch)
        eps = torch.randn_like(win)  # the same draws, in the same order, as DiffusionDPO's
        t = process.sample_t(win.shape[0], device=win.device)
        model_t = process.model_time(t)
        x_win, x_lose = process.noise(win, eps, t), process.noise(lose, eps, t)
        target_win, target_lose = process.target(win, eps, t), process.target(lose, eps, t)

        e_w = per_sample_mse(denoiser(x_win, model_t, cond), target_win)
        e_l = per_sample_mse(denoiser(x_lose, model_t, cond), target_lose)
        with torch.no_grad():
            r_w = per_sample_mse(self.reference(x_win, model_t, cond), target_win)
            r_l = per_sample_mse(self.reference(x_lose, model_t, cond), target_lose)
        per_pair, _ = dpo_loss(e_w, e_l, r_w, r_l, self.beta, self.loss_type)
        loss = per_pair.mean()
        if self.sft_weight:
            loss = loss + self.sft_weight * e_w.mean()
        logged = {
            "loss": loss.detach(),
            "error_win": e_w.detach().mean(),
            "error_lose": e_l.detach().mean(),
            "reference_error_win": r_w.mean(),
            "reference_error_lose": r_l.mean(),
        }
        return loss, logged


def dpo_module(*overrides: str) -> AlignmentModule:
    """The DPO demo's module (LoRA on the backbone, the audio attention trained in full), with ``overrides``.
    Seeded, so every variant starts from the same weights and adapters."""
    return from_recipe(DPO_RECIPE, *overrides)[0]


def naive_dpo_module(device: torch.device) -> AlignmentModule:
    """The DPO demo's module running ``NaiveDPO``, whose reference is the recipe's denoiser built again without
    LoRA (the starting model, in full, on ``device``)."""
    module = dpo_module("--model.algorithm", f"{__name__}.NaiveDPO")
    start = dpo_module("--model.lora", "null").denoiser
    module.algorithm.reference = start.requires_grad_(False).eval().to(device)
    return module


def naive_dpo_step(bench: Bench, batch: dict) -> Step:
    module = naive_dpo_module(bench.device)
    step = module_step(bench, module, batch)
    step.reference = [*module.algorithm.reference.parameters(), *module.algorithm.reference.buffers()]
    return step


def dpo_step_ours(bench: Bench, batch: dict) -> Step:
    module = dpo_module()
    step = module_step(bench, module, batch)
    # Under LoRA the reference is the adapter-disabled backbone; only the audio attention's start is kept apart.
    step.reference = list(module.reference_snapshot.buffers())
    return step


def sft_pairs_batch(batch: dict) -> dict:
    """The pairs as 2B plain clips for SFT: the chosen videos, then the rejected ones, each with its conditions."""
    clips = {key: torch.cat([value, value]) if torch.is_tensor(value) else value for key, value in batch.items()}
    del clips["rejected"]
    clips["video"] = torch.cat([batch["video"], batch["rejected"]])
    clips["id"] = batch["id"] + [f"{clip}_rejected" for clip in batch["id"]]
    clips["size"] = 2 * batch["size"]
    return clips


def sft_on_pairs_step(bench: Bench, batch: dict) -> Step:
    """The same module with plain ``SFT`` (no mouth weighting) in place of ``DiffusionDPO``, on the 2B clips."""
    return module_step(bench, dpo_module("--model.algorithm", "prefalign.algorithms.SFT"), sft_pairs_batch(batch))


def same_dpo_loss_check(bench: Bench, batch: dict) -> dict[str, tuple[float, float]]:
    """prefalign's DPO and the naive one on the same weights, noise and timesteps: (ours, naive) per value.

    Every trainable tensor (adapters, audio attention) is first moved off its start by the same random step in
    both, so that policy and reference differ and the reference's construction is put to the test. In float64:
    β multiplies differences of errors, and would make float32 rounding (which differs between one batched
    forward and two halves on some devices) look like a different loss.
    """
    ours = dpo_module().to(bench.device, torch.float64)
    naive = naive_dpo_module(bench.device).to(bench.device, torch.float64)
    naive.algorithm.reference.to(torch.float64)
    batch = {key: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for key, v in batch.items()}
    names = [[name for name, p in module.named_parameters() if p.requires_grad] for module in (ours, naive)]
    if names[0] != names[1]:
        raise RuntimeError("dpo_step: prefalign's DPO and the naive one do not train the same parameters")
    values = []
    for module in (ours, naive):
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in module.trainable_parameters():
                param.add_(1e-2 * torch.randn(param.shape, generator=generator).to(param.device))
        torch.manual_seed(2)
        with torch.no_grad():
            _, logged = module.algorithm.loss(module.policy, batch)
        values.append(logged)
    return {name: (values[0][name].item(), values[1][name].item()) for name in DPO_CHECKED}


def max_relative_difference(checked: dict[str, tuple[float, float]]) -> float:
    return max(abs(a - b) / max(abs(a), abs(b), 1e-12) for a, b in checked.values())


def describe(module: AlignmentModule, pairs: int, num_frames: int) -> Figure:
    return Figure(
        name="dpo_step",
        title="DPO training step: prefalign vs. an SFT step on the same pairs and a naive DPO",
        description=(
            f"One training step of the DPO demo, every variant built from {recipe_name(DPO_RECIPE)} as `prefalign "
            f"fit` builds it (the Wan DiT of the SFT figure with MelAudioEncoder and audio attention, LoRA rank "
            f"{module.lora.rank} on the backbone with the audio attention trained in full, Flow-DPO with β = "
            f"{module.algorithm.beta:g}, AdamW) on a batch of B = {pairs} TalkingShapes pairs (2B = {2 * pairs} "
            f"clips of {num_frames} frames at 32×32; the rejected clip is the chosen one with its mouth track "
            "shifted, jittered or frozen, as `prefalign synth --rejected` makes it). **prefalign DPO**: "
            "`AlignmentModule.training_step` with `DiffusionDPO`: winner and loser in one policy forward on 2B, the "
            "reference (`module.reference()`: the adapters switched off, no second copy of the weights) in one "
            "no-grad forward on 2B; backward; AdamW step. **SFT on the pairs** (baseline): the same module with "
            "`SFT` (no mouth weighting) on the 2B clips, chosen and rejected concatenated: the policy's forward and "
            "backward on 2B without the reference. **naive DPO**: `NaiveDPO`, written in "
            "benchmarks/figures/dpo_step.py as the baseline a first implementation would be: winner and loser in "
            "two policy forwards of B, the reference a second copy of the whole denoiser (the recipe's, built again "
            "without LoRA) in two no-grad forwards of B; the same noise, timesteps and `dpo_loss`. All three start "
            "from the same weights and adapters."
        ),
        baseline="SFT on the pairs",
        ideal={"SFT on the pairs": 1.0, "prefalign DPO": 4 / 3, "naive DPO": 4 / 3},
        compare_also=[("naive DPO", "prefalign DPO")],
    )


def figure(bench: Bench) -> Figure:
    """One DPO step of ours next to an SFT step on the same clips and next to a naive DPO."""
    module, data = from_recipe(DPO_RECIPE)
    if module.lora is None:
        raise ValueError(f"dpo_step: {recipe_name(DPO_RECIPE)} no longer trains LoRA")
    figure = describe(module, data.batch_size, data.num_frames)
    del module  # read for its settings only: every variant builds its own
    batch = demo_batch(bench.device, data, pairs=True)
    if not bench.probing:
        checked = same_dpo_loss_check(bench, batch)
        differing = {name: pair for name, pair in checked.items() if not math.isclose(*pair, rel_tol=1e-4)}
        if differing:
            raise RuntimeError(f"dpo_step: the naive DPO does not compute what DiffusionDPO does: {differing}")
        loss, naive = checked["loss"]
        figure.notes.append(
            "Ideal ≈ 1.33 relative to an SFT step on the same pairs (2B): policy forward + backward on 2B plus a "
            "reference forward on 2B, counting a backward as two forwards (8 units against 6). Under LoRA the "
            "backward computes no gradients for the frozen base weights, so it costs less than two forwards and "
            "the ideal moves towards 1.5 (backward = forward)."
        )
        figure.notes.append(
            f"Same loss: before timing, in float64, with every trainable tensor moved off its start so that policy "
            f"and reference differ, on the same noise and timesteps, prefalign DPO gives {loss:.6g} and the naive DPO "
            f"{naive:.6g} (relative difference {abs(loss - naive) / abs(loss):.1e}); the policy's and the "
            f"reference's errors on winner and loser agree to {max_relative_difference(checked):.1e}."
        )
    with without_trainer():
        return bench.compare(
            figure,
            {
                "SFT on the pairs": lambda: sft_on_pairs_step(bench, batch),
                "prefalign DPO": lambda: dpo_step_ours(bench, batch),
                "naive DPO": lambda: naive_dpo_step(bench, batch),
            },
        )
