"""Figure ``refree_step``: a ReFree training step (recipes/demo/refree.yaml) with its self-play negatives cached,
against an SFT step, and what sampling those negatives adds once amortised over the refresh period."""

from __future__ import annotations

from benchmarks.figures.common import demo_batch, from_recipe, module_step, recipe_name, without_trainer
from benchmarks.harness import MIB, ROOT, Bench, Figure, Step, paired_ratio
from prefalign.module import AlignmentModule

REFREE_RECIPE = ROOT / "recipes" / "demo" / "refree.yaml"
DEMO_TRAIN_CLIPS = 64  # clips in the demo's training data (`make demo`: prefalign synth --num_clips 64)
SFT, CACHED, SAMPLING = "SFT step", "ReFree step, negatives cached", "self-play sampling"


def refree_module(bench: Bench, *overrides: str) -> AlignmentModule:
    """The ReFree demo's module (with the recipe's LoRA; seeded), with ``overrides``, on the device."""
    return from_recipe(REFREE_RECIPE, *overrides)[0].to(bench.device).train()


def sft_control_step(bench: Bench, batch: dict, mouth_weight: float) -> Step:
    """The control of the ReFree demo (`make demo-refree`): the same module with SFT and ReFree's mouth weighting."""
    control = ("--model.algorithm", "prefalign.algorithms.SFT", "--model.algorithm.init_args.mouth_weight")
    return module_step(bench, refree_module(bench, *control, str(mouth_weight)), batch)


def refree_step_cached(bench: Bench, batch: dict, modules: dict) -> Step:
    """``AlignmentModule.training_step`` with ``ReFree``, backward, AdamW, after ``ReFree.setup`` (the lagged
    snapshot) and with every clip's self-play negative of ``batch`` already in the cache."""
    module = refree_module(bench)
    module.algorithm.setup(module.policy)
    module.algorithm.self_play(module.policy, batch, list(range(len(batch["id"]))))
    modules["cached"] = module
    step = module_step(bench, module, batch)
    step.reference = list(module.reference_snapshot.buffers())
    return step


def self_play_step(bench: Bench, batch: dict) -> Step:
    """Filling the self-play cache for one batch: ``ReFree.self_play`` on every clip of ``batch``, cache emptied
    first (the lagged snapshot sampling all of them)."""
    module = refree_module(bench)
    algorithm = module.algorithm
    algorithm.setup(module.policy)
    rows = list(range(len(batch["id"])))

    def run() -> dict:
        algorithm.self_play_latents.clear()
        with bench.autocast():
            return algorithm.self_play(module.policy, batch, rows)

    return Step(run, None, list(module.parameters()), reference=list(module.reference_snapshot.buffers()))


def self_play_per_step(self_play: float, refresh_every: int, batch_size: int, clips: int) -> float:
    """The share of one batch's self-play sampling that a training step costs on average, amortised over the refresh
    period: clips sampled per period / (refresh_every · batch_size).

    A period has ``refresh_every · batch_size`` clip visits, ``v = refresh_every · batch_size / clips`` per clip;
    each visit draws a self-play negative with probability ``self_play``, and a clip is sampled at its first such
    draw only (the cache holds it for the rest of the period), so ``clips · (1 − (1 − self_play)^v)`` are sampled
    per period. With fewer visits than clips (v < 1) each visited clip is seen once: ``refresh_every · batch_size ·
    self_play`` are sampled, and nothing is amortised.
    """
    visits = refresh_every * batch_size
    sampled = min(clips, visits) * (1 - (1 - self_play) ** max(1.0, visits / clips))
    return sampled / visits


def describe(module: AlignmentModule, mix: dict[str, float], batch_size: int, num_frames: int) -> Figure:
    refree = module.algorithm
    rank = module.lora.rank if module.lora else None
    return Figure(
        name="refree_step",
        title="ReFree training step: cached self-play negatives vs. an SFT step, and their amortised sampling",
        description=(
            f"The ReFree demo's module as `prefalign fit` builds it from {recipe_name(REFREE_RECIPE)} (the Wan DiT "
            f"of `sft_step` with MelAudioEncoder and audio attention, LoRA rank {rank}, `FlowMatching`, `ReFree` "
            f"with β = {refree.beta:g}, λ = {refree.fm_weight:g}, mouth weight {refree.mouth_weight:g}, negatives "
            f"{', '.join(f'{k} {w:g}' for k, w in mix.items())}, refreshed every {refree.refresh_every} steps, "
            f"self-play sampled in {refree.self_play_steps} steps), on the demo batch of {batch_size} TalkingShapes "
            f"clips of {num_frames} frames at 32×32 with audio and pose. **{SFT}** (baseline): the same module with "
            f"`SFT(mouth_weight={refree.mouth_weight:g})` in place of ReFree (the control of `make demo-refree`): "
            f"`AlignmentModule.training_step`, backward, AdamW step. **{CACHED}**: the same with `ReFree` after "
            "`ReFree.setup` (the lagged snapshot), with every clip's self-play negative of the batch already "
            "cached: each step draws each clip's negative source, perturbs the ground truth for the others, and "
            "runs the policy on positive and negative (2B) with grad and the lagged reference on 2B without. "
            f"**{SAMPLING}**: filling the cache for the batch: `ReFree.self_play` on all its clips with the cache "
            f"emptied ({refree.self_play_steps} deterministic steps of the lagged snapshot on B clips)."
        ),
        baseline=SFT,
        ideal={SFT: 1.0, CACHED: 8 / 3},
    )


def amortised_notes(figure: Figure, algorithm, p: float, refresh: int, b: int) -> list[str]:
    """The ratio with the amortised self-play sampling (into ``figure.ratios``), and the notes that explain it."""
    share = self_play_per_step(p, refresh, b, DEMO_TRAIN_CLIPS)
    times = {row["variant"]: row["times_ms"] for row in figure.rows}
    with_sampling = [step + share * sample for step, sample in zip(times[CACHED], times[SAMPLING])]
    figure.ratios.append(
        {"variant": f"{CACHED} + amortised self-play", "against": SFT, **paired_ratio(with_sampling, times[SFT])}
    )
    rows = {row["variant"]: row for row in figure.rows}
    visits = refresh * b / DEMO_TRAIN_CLIPS
    latent = next(iter(algorithm.self_play_latents.values()))
    return [
        "Ideal ≈ 2.67 relative to the SFT step on B clips: policy forward + backward on 2B (positive and negative) "
        "plus a reference forward on 2B, counting a backward as two forwards (8 units against 3). Under LoRA the "
        "backward skips the frozen weights' gradients and the ideal moves towards 3 (backward = forward).",
        f"Amortised self-play per step = sampling time per batch × clips sampled per refresh period / (refresh_every "
        f"× batch_size). With the recipe's numbers ({DEMO_TRAIN_CLIPS} training clips, refresh_every {refresh}, "
        f"batch size {b}, self-play share {p:.3g} of the mix) a period visits each clip {visits:.2f} times and "
        f"samples {DEMO_TRAIN_CLIPS} × (1 − (1 − {p:.3g})^{visits:.2f}) = {share * refresh * b:.1f} clips (a clip "
        f"is sampled at its first self-play draw, then cached), so a step costs {share:.4f} × "
        f"{rows[SAMPLING]['median_ms']:.1f} ms = {share * rows[SAMPLING]['median_ms']:.1f} ms of sampling (medians), "
        f"and the ReFree step with it {rows[CACHED]['median_ms'] + share * rows[SAMPLING]['median_ms']:.1f} ms. "
        "The ratio with it (under the table) adds that share of each round's sampling time to the round's step.",
        f"The amortisation assumes sampling costs the same per clip whatever the number sampled at once; in "
        f"training the missing clips of each step are sampled together (about {p * b:.1f} per step early in a "
        "period, fewer later), which on a GPU costs more per clip than a full batch. The cache holds "
        f"{latent.numel() * latent.element_size() / MIB:.2f} MiB per clip, "
        f"{DEMO_TRAIN_CLIPS * latent.numel() * latent.element_size() / MIB:.1f} MiB with every clip cached; the "
        "reference copy column is the lagged snapshot of the trained tensors.",
    ]


def figure(bench: Bench) -> Figure:
    """A ReFree training step with its self-play negatives cached, against an SFT step, and what sampling those
    negatives adds once amortised over the refresh period."""
    module, data = from_recipe(REFREE_RECIPE)
    refree = module.algorithm
    mix = dict(zip(refree.kinds, refree.weights.tolist()))
    p = mix.get("self_play", 0.0) / sum(mix.values())
    refresh, mouth_weight = refree.refresh_every, refree.mouth_weight
    figure = describe(module, mix, data.batch_size, data.num_frames)
    del module, refree  # read for their settings only: every variant builds its own
    batch = demo_batch(bench.device, data)
    modules: dict = {}
    with without_trainer():
        bench.compare(
            figure,
            {
                SFT: lambda: sft_control_step(bench, batch, mouth_weight),
                CACHED: lambda: refree_step_cached(bench, batch, modules),
                SAMPLING: lambda: self_play_step(bench, batch),
            },
        )
    if bench.probing:
        return figure
    algorithm = modules["cached"].algorithm
    if algorithm.self_play_sampled != data.batch_size:
        raise RuntimeError(
            f"refree_step: the cached step sampled {algorithm.self_play_sampled - data.batch_size}"
            " self-play negatives while timed: the cache missed"
        )
    figure.notes += amortised_notes(figure, algorithm, p, refresh, data.batch_size)
    return figure
