"""Figure ``grpo_step``: what GRPO's bookkeeping costs (rollouts that keep states and log-probs, the per-timestep
policy update) next to the bare work, on the module of recipes/demo/grpo.yaml, and what batching the judge's
requests gains."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from benchmarks.figures.common import (
    JUDGE_CONCURRENCY,
    JUDGE_DELAY_S,
    JUDGE_KEY_ENV,
    SFT_RECIPE,
    demo_batch,
    from_recipe,
    judge_server,
    recipe_name,
)
from benchmarks.harness import MIB, ROOT, Bench, Figure, Step
from prefalign.algorithms.base import mouth_mask
from prefalign.algorithms.grpo import gaussian_kl, ppo_clip_loss
from prefalign.rewards import OpenAIJudge, group_advantages
from prefalign.sampling import sample_latents

GRPO_RECIPE = ROOT / "recipes" / "demo" / "grpo.yaml"
JUDGE_VIDEOS = 16  # videos the judge rows score per step
PLAIN, ROLLOUT = "plain sampling", "rollout with log-probs"
BARE, UPDATE = "bare forward + backward", "policy update per trained timestep"
BATCHED, SINGLE = "judge, batched", "judge, one by one"


def grpo_parts(bench: Bench, batch: dict) -> tuple:
    """The GRPO demo's module (seeded, so that every variant starts from the same weights), the ``N = B·G`` rollout
    inputs made from the first ``B`` clips of ``batch`` (B: the recipe's batch size) as ``GRPO.training_step`` makes
    them, their frame count, and the prior latents ``[N, C, F, h, w]`` (seeded)."""
    module, data = from_recipe(GRPO_RECIPE)
    module = module.to(bench.device).train()
    b, g = data.batch_size, module.algorithm.group_size
    size = batch["reference"].shape[0]
    inputs = {
        key: value[:b].repeat_interleave(g, dim=0)
        if torch.is_tensor(value) and value.ndim and len(value) == size
        else value
        for key, value in batch.items()
    }
    num_frames = batch["video"].shape[1]
    shape = module.denoiser.latent_shape(num_frames, *batch["reference"].shape[-2:])
    x = module.process.prior((b * g, *shape), device=bench.device, generator=torch.Generator().manual_seed(0))
    return module, inputs, num_frames, x


def plain_sampling(module, inputs: dict, num_frames: int, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The sampler a GRPO rollout runs, less what the rollout keeps for training: ``sampling.sample_latents`` with
    the same conditions, schedule, guidance and stochastic steps (noise from ``generator``, drawn on the mouth's
    latents only where the recipe sets ``explore: mouth``, as ``GRPO.rollout`` draws it), without ``record`` (no
    stored states, no log-probs)."""
    algorithm, denoiser = module.algorithm, module.denoiser
    cond = denoiser.condition(inputs, num_frames)
    region = mouth_mask(denoiser, inputs).to(x.dtype) if algorithm.explore == "mouth" else None
    return sample_latents(denoiser, module.process, cond, x, algorithm.num_steps, generator,
                          guidance_scale=algorithm.guidance_scale, drop=denoiser.drop_conditions, stochastic=True,
                          region=region, micro_batch=algorithm.micro_batch).latents


def grpo_sampling_step(bench: Bench, batch: dict, log_probs: bool) -> Step:
    """Sampling the N rollouts: ``GRPO.rollout`` (states and log-probs kept) or ``plain_sampling``; the same
    prior and the same step noise (a generator seeded afresh every run)."""
    module, inputs, num_frames, x = grpo_parts(bench, batch)
    algorithm = module.algorithm

    def run() -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        with bench.autocast():
            if log_probs:
                return algorithm.rollout(module.policy, inputs, num_frames, x, generator).states[-1]
            return plain_sampling(module, inputs, num_frames, x, generator)

    return Step(run, None, list(module.parameters()))


def grpo_update_step(bench: Bench, batch: dict, ppo: bool) -> Step:
    """One trained timestep of the GRPO update on a stored rollout of the N latents, gradients accumulating as
    they do over an update's timesteps (no optimizer step: it comes once per update). With ``ppo``: the policy's
    step distribution with grad, the log-prob of the stored next state, the PPO-clip loss (and the KL when the
    recipe sets ``kl_beta``), backward. Without: the bare denoiser forward on the same latents and conditions, MSE to
    a fixed target, backward. Each run takes the next stochastic sampler step in turn."""
    module, inputs, num_frames, x = grpo_parts(bench, batch)
    algorithm, denoiser, process = module.algorithm, module.denoiser, module.process
    segment = algorithm.rollout(module.policy, inputs, num_frames, x, torch.Generator().manual_seed(1))
    n, m = x.shape[0], segment.free_from
    steps = [j for j in range(algorithm.num_steps) if bool(torch.isfinite(segment.log_probs[j]).all())]
    trained = max(1, math.ceil(algorithm.train_fraction * len(steps)))  # per update: it scales the loss
    schedule = process.timesteps(algorithm.num_steps, device=bench.device)
    # Random rewards: an advantage's value does not change what the update computes.
    rewards = torch.rand(n, generator=torch.Generator().manual_seed(2)).to(bench.device)
    group_ids = torch.arange(n // algorithm.group_size, device=bench.device).repeat_interleave(algorithm.group_size)
    advantages = group_advantages(rewards, group_ids, algorithm.global_std, algorithm.advantage_clip)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(bench.device)
    encoder = denoiser.audio_encoder
    encoder_trains = encoder is not None and any(p.requires_grad for p in encoder.parameters())
    turn = itertools.count()

    def run() -> torch.Tensor:
        j = steps[next(turn) % len(steps)]
        # As GRPO.training_step: the rollout's conditions were made without a graph.
        cond = denoiser.condition(segment.inputs, segment.num_frames) if encoder_trains else segment.cond
        x_j, t, t_next = segment.states[j], schedule[j], schedule[j + 1]
        with bench.autocast():
            if ppo:
                mean, std = algorithm.step_distribution(
                    denoiser, process, x_j, t, t_next, cond, denoiser.drop_conditions
                )
                log_prob = process.log_prob(segment.states[j + 1][:, :, m:], mean[:, :, m:], std)
                per_sample, _ = ppo_clip_loss(log_prob, segment.log_probs[j], advantages, algorithm.clip_range)
                if algorithm.kl_beta > 0:
                    with module.reference() as reference:
                        ref_mean, _ = algorithm.step_distribution(
                            reference, process, x_j, t, t_next, cond, denoiser.drop_conditions
                        )
                    per_sample = per_sample + algorithm.kl_beta * gaussian_kl(mean[:, :, m:], ref_mean[:, :, m:], std)
                loss = per_sample.sum() / (n * trained)
            else:
                pred = denoiser(x_j, process.model_time(t.expand(n)), cond)
                loss = F.mse_loss(pred.float(), target)
        loss.backward()
        return loss

    return Step(run, None, list(module.parameters()))


def same_sampler_check(bench: Bench, batch: dict) -> tuple[float, int]:
    """Largest difference between the final samples of plain sampling and of a rollout from the same prior and
    generator seed (shows that both run the same sampler), and the bytes of the trajectory the rollout stores."""
    module, inputs, num_frames, x = grpo_parts(bench, batch)
    algorithm = module.algorithm
    segment = algorithm.rollout(module.policy, inputs, num_frames, x, torch.Generator().manual_seed(1))
    plain = plain_sampling(module, inputs, num_frames, x, torch.Generator().manual_seed(1))
    stored = sum(t.numel() * t.element_size() for t in (segment.states, segment.log_probs))
    return (segment.states[-1] - plain).abs().max().item(), stored


def judge_step(url: str, videos: torch.Tensor, batched: bool, judges: dict) -> Step:
    """Scoring ``videos`` with an ``OpenAIJudge`` at ``url``: one ``score()`` call with up to
    ``JUDGE_CONCURRENCY`` requests in flight, or one ``score()`` call per video with one in flight. A request is
    neither re-sent nor asked again (a failure is counted, not retried into the timing)."""
    judge = OpenAIJudge(
        model="benchmark-judge",
        base_url=url,
        api_key_env=JUDGE_KEY_ENV,
        timeout=30.0,
        http_retries=0,
        max_retries=0,
        max_concurrency=JUDGE_CONCURRENCY if batched else 1,
        inputs=["video"],  # the image-only judge of stills: batching is what this figure measures
        num_frames=8,
    )
    judges["batched" if batched else "one by one"] = judge

    def run() -> list[dict]:
        if batched:
            return [judge.score(videos, {})]
        return [judge.score(video[None], {}) for video in videos]

    return Step(run, None, [])


def describe(b: int, g: int, steps: int, rank: int | None, num_frames: int) -> Figure:
    return Figure(
        name="grpo_step",
        title="GRPO: rollouts with log-probs vs. plain sampling, the policy update, the judge batched",
        description=(
            f"The GRPO demo's module as `prefalign fit` builds it from {recipe_name(GRPO_RECIPE)} (the Wan DiT of "
            f"`sft_step` with MelAudioEncoder and audio attention, LoRA rank {rank}, `FlowMatching`, `GRPO` with "
            f"G = {g} rollouts per condition and {steps} sampler steps), on the first B = {b} clips of the demo batch "
            f"({num_frames} frames at 32×32 with audio and pose), each repeated G times as `GRPO.training_step` "
            f"does: N = B·G = {b * g} rollouts. **{PLAIN}** (baseline): the {steps} stochastic steps from the same "
            "prior, written in benchmarks/figures/grpo_step.py: a denoiser forward and `process.step(..., "
            "stochastic=True, generator=g)` per step (noise on the mouth's latents only under `explore: mouth`, as "
            f"the rollout draws it) under no_grad, nothing stored. **{ROLLOUT}**: `GRPO.rollout` on "
            "the same inputs, prior and step noise: every state and every step's log-prob kept (target ≤ 1.05× "
            f"plain sampling). **{UPDATE}**: one sampler step of the update on the N stored latents (each run the "
            "next stochastic step): `GRPO.step_distribution` with grad, `process.log_prob` of the stored next "
            "state, `ppo_clip_loss` with group-standardised advantages of random rewards, backward (gradients "
            "accumulate as over an update's steps; the optimizer steps once per update, not here). "
            f"**{BARE}**: the denoiser forward on the same N latents, timestep and conditions, MSE to a fixed "
            f"target, backward. **{BATCHED}** / **{SINGLE}**: `OpenAIJudge` scoring {JUDGE_VIDEOS} demo videos "
            "against a loopback chat-completions server (`http.server.ThreadingHTTPServer` in a thread) that "
            f"answers every request after {1e3 * JUDGE_DELAY_S:.0f} ms, as a served MLLM would: one `score()` call "
            f"with `max_concurrency={JUDGE_CONCURRENCY}`, against one `score()` call per video with "
            "`max_concurrency=1`; a step scores all the videos."
        ),
        baseline=PLAIN,
        targets={ROLLOUT: 1.05},
        compare_also=[(UPDATE, BARE), (SINGLE, BATCHED)],
    )


def judge_notes(figure: Figure, judges: dict) -> list[str]:
    failed = {name: judge.stats for name, judge in judges.items() if judge.stats["failures"]}
    if failed:
        raise RuntimeError(f"grpo_step: the judge got no answer for some videos: {failed}")
    rows = {row["variant"]: row for row in figure.rows}
    speed = {name: JUDGE_VIDEOS / (1e-3 * rows[name]["median_ms"]) for name in (BATCHED, SINGLE)}
    waves = math.ceil(JUDGE_VIDEOS / JUDGE_CONCURRENCY)
    return [
        f"Judge throughput: {speed[BATCHED]:.1f} videos/s batched, {speed[SINGLE]:.1f} videos/s one by one "
        f"(medians); every request was answered ({sum(j.stats['requests'] for j in judges.values())} requests, no "
        f"failure). Ideal speed-up {JUDGE_VIDEOS}/{waves} = {JUDGE_VIDEOS / waves:.0f}×: {waves} waves of "
        f"{JUDGE_CONCURRENCY} concurrent {1e3 * JUDGE_DELAY_S:.0f} ms answers against {JUDGE_VIDEOS} in a row; "
        "sampling the frames and encoding them as PNG stay serial.",
    ]


def figure(bench: Bench) -> Figure:
    """What GRPO's bookkeeping costs next to the bare work, and what batching the judge's requests gains."""
    module, data = from_recipe(GRPO_RECIPE)
    demo = from_recipe(SFT_RECIPE)[1]  # the demo batch's size and clip length
    b, steps = data.batch_size, module.algorithm.num_steps
    if b > demo.batch_size:
        raise ValueError(
            f"grpo_step: {recipe_name(GRPO_RECIPE)} asks for batches of {b} conditions; the demo batch has "
            f"{demo.batch_size}"
        )
    rank = module.lora.rank if module.lora else None
    figure = describe(b, module.algorithm.group_size, steps, rank, demo.num_frames)
    del module  # read for its settings only: every variant builds its own
    batch = demo_batch(bench.device, demo)
    if not bench.probing:
        difference, stored = same_sampler_check(bench, batch)
        if difference > 1e-4:
            raise RuntimeError(
                f"grpo_step: the rollout and plain sampling do not run the same sampler (max difference {difference})"
            )
        figure.notes.append(
            f"Same sampler: from the same prior and step noise, the rollout and plain sampling end on the same "
            f"sample (max difference {difference:.1e}). The rollout keeps {steps + 1} states of the N latents and "
            f"{steps} log-probs: {stored / MIB:.1f} MiB, counted in its peak memory growth."
        )
        if data.num_frames != demo.num_frames:
            figure.notes.append(
                f"**{recipe_name(GRPO_RECIPE)} has moved on**: it trains on {data.num_frames} frames, this benchmark "
                f"used {demo.num_frames}."
            )
    videos = batch["video"].repeat(math.ceil(JUDGE_VIDEOS / demo.batch_size), 1, 1, 1, 1)[:JUDGE_VIDEOS]
    judges: dict = {}
    with judge_server(JUDGE_DELAY_S) as url:
        bench.compare(
            figure,
            {
                PLAIN: lambda: grpo_sampling_step(bench, batch, log_probs=False),
                ROLLOUT: lambda: grpo_sampling_step(bench, batch, log_probs=True),
                BARE: lambda: grpo_update_step(bench, batch, ppo=False),
                UPDATE: lambda: grpo_update_step(bench, batch, ppo=True),
                BATCHED: lambda: judge_step(url, videos, batched=True, judges=judges),
                SINGLE: lambda: judge_step(url, videos, batched=False, judges=judges),
            },
        )
    if bench.probing:
        return figure
    figure.notes.append(
        f"{UPDATE} / {BARE}: ideal ≈ 1: the update adds to the forward and backward only the step's mean and "
        "std, a Gaussian log-density and the clipped ratio, all elementwise."
    )
    figure.notes += judge_notes(figure, judges)
    figure.notes.append(
        "The ratio column compares every row with plain sampling; only the rollout's is a comparison of like with "
        "like, the other pairs are under the table."
    )
    return figure
