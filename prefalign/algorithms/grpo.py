"""GRPO for portrait video (FlowPortrait): stochastic rollouts with log-probs, group advantages, PPO-clip, KL.

One training step: for each of the batch's B conditions (reference image, audio, pose), ``group_size`` rollouts are
sampled with the process's stochastic step (the Flow-GRPO SDE on flow matching, DDIM with η > 0 on diffusion),
keeping every state and the log-prob of every step (with ``sde_window``, only MixGRPO's window of steps is
stochastic, the rest ODE; with ``explore: mouth``, their noise falls on the mouth box only); the decoded videos are scored by the reward; advantages are standardised within each
group; then the policy takes ``inner_epochs`` optimizer steps on a random subset of the stochastic sampler steps,
accumulating gradients over those steps, with the PPO-clip loss on the ratio of new to old log-probs (GRPO-Guard's
normalised ratio with ``ratio_norm``) and an optional KL penalty to the reference policy. A batch in which no rollout on any rank has a
usable reward (every one dropped by the judge) still takes its optimizer steps, which change nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from prefalign.algorithms.base import Algorithm, mouth_mask, repeat_conditions, step_generator, with_pose
from prefalign.denoisers.base import frames_of
from prefalign.policy import Policy
from prefalign.processes.base import masked_mean
from prefalign.rewards.base import Reward
from prefalign.rewards.composite import CompositeReward, group_advantages
from prefalign.sampling import micro_batches, run_chunks, sample_latents, slice_conditions, step_distribution


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float):
    """Per-sample PPO-clip loss ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`` with ``ρ = exp(lp − lp_old)``, and ``ρ``."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def guard_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor,
                    std: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GRPO-Guard's RatioNorm (Wang et al., arXiv 2510.22319): the log-ratio of a Gaussian step rescaled by its
    std σ and freed of its negative bias, ``(lp − lp_old)·σ + ‖μ − μ_old‖²/(2σ)``, per sample.

    With log-probs averaged over elements, ``lp − lp_old = mean(ε·Δμ)/σ − mean(Δμ²)/(2σ²)`` for the rollout's noise
    ``ε``: the ratio is biased below 1 and its gradient scales as 1/σ, so the low-noise steps dominate the update.
    The normalised log-ratio is ``mean(ε·Δμ)``: unbiased, and every step weighs alike.

    Args:
        log_prob, old_log_prob (Tensor): ``[N]`` element-averaged log-probs under the policy and the rollout policy.
        mean, old_mean (Tensor): ``[N, ...]`` the step means under the policy and the rollout policy.
        std (Tensor): the step's std, ``[N]`` or ``[N, 1, ..., 1]``.
        mask (Tensor | None): the elements the log-probs average over (a region-restricted step), else all.
    """
    sigma = std.float().reshape(std.shape[0], -1)[:, 0]
    mse = masked_mean((mean.float() - old_mean.float()).pow(2), mask)
    return (log_prob - old_log_prob) * sigma + mse / (2 * sigma)


def group_spread(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The within-group population std of ``values`` averaged over groups, and the fraction of groups with no
    spread (std ≤ 1e-6: every advantage 0, nothing to learn). Non-finite values are left out."""
    finite = torch.isfinite(values)
    stds = []
    for group in torch.unique(group_ids[finite]):
        members = values[finite & (group_ids == group)].double()
        stds.append(members.std(unbiased=False) if members.numel() > 1 else members.new_tensor(0.0))
    if not stds:
        return values.new_tensor(float("nan")), values.new_tensor(float("nan"))
    stds = torch.stack(stds)
    return stds.mean().float(), (stds <= 1e-6).float().mean()


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL between two Gaussian steps of the same std, per sample, averaged over elements (those of ``mask``, where
    given): ``‖μ − μ_ref‖² / (2σ²)``."""
    per_element = (mean.float() - reference_mean.float()).pow(2) / (2 * std.float().pow(2))
    return masked_mean(per_element, mask)


@dataclass
class Segment:
    """The stored trajectory of one rollout pass (a whole clip, or one chunk of a long one).

    Attributes:
        inputs (dict): the batch fields its conditions were made from (rebuilt with a graph when the audio
            encoder trains).
        num_frames (int): video frames it covers.
        cond (dict): the denoiser conditions of its ``N = B·G`` rollouts.
        states (Tensor): ``[S + 1, N, C, F, h, w]``: the model's input at every step, then the final sample.
        log_probs (Tensor): ``[S, N]`` log-prob of each step's sample under the rollout policy (NaN where the step
            is deterministic: no density, not trained).
        free_from (int): the first latent frame the rollout generated (earlier ones are a chunk's given frames);
            log-probs and the KL cover frames from here on.
        means (dict): step -> ``[N, C, F, h, w]`` the rollout policy's mean of that stochastic step (kept only for
            GRPO-Guard's ratio normalisation).
        region (Tensor | None): ``[N, 1, F − free_from, h, w]`` 0/1 over the generated latent frames: the latents
            the stochastic steps drew noise on (and the log-probs average over) when exploration is restricted to a
            region; None: all of them.
    """

    inputs: dict
    num_frames: int
    cond: dict
    states: torch.Tensor
    log_probs: torch.Tensor
    free_from: int = 0
    means: dict = field(default_factory=dict)
    region: Optional[torch.Tensor] = None


@dataclass
class Rollouts:
    """A batch's rollouts: the ``N = B·G`` inputs (each condition repeated ``group_size`` times), their group ids
    ``[N]``, the segments to train on, the decoded videos ``[N, T, 3, H, W]``, the step's generator (it draws the
    trained steps next) and the SDE window the rollouts used."""

    inputs: dict
    group_ids: torch.Tensor
    segments: list[Segment]
    videos: torch.Tensor
    generator: torch.Generator
    window: range


class GRPO(Algorithm):
    """Group Relative Policy Optimization on stochastic sampler trajectories (Flow-GRPO, DanceGRPO, FlowPortrait).

    Args:
        reward (Reward): scores decoded videos; a ``CompositeReward`` with ``aggregate: advantage`` gives one
            advantage per term, weighted (FlowPortrait's judge + texture + jitter), else advantages of the total.
        group_size (int): rollouts per condition (G); a group is the rollouts of one reference/audio/pose.
        num_steps (int): sampler steps of a rollout.
        guidance_scale (float): classifier-free guidance on speech during rollouts and the update (1 = off).
        train_fraction (float): fraction of the stochastic sampler steps trained per update (drawn at random).
        same_noise_per_group (bool): start a group's rollouts from the same noise (the SDE noise still differs;
            risks collapsing a group's spread).
        clip_range (float): PPO clip ε on the ratio; tiny (~1e-4) because log-probs are averaged over elements.
        kl_beta (float): weight of the KL to the reference policy, ``‖μ_θ − μ_ref‖²/(2σ_t²)`` per step (0 = off).
        inner_epochs (int): optimizer steps per batch of rollouts, each over the same stored trajectories.
        sde_window (int | None): MixGRPO (Li et al., arXiv 2507.21802): only this many consecutive sampler steps
            are stochastic, the rest deterministic (ODE), and only the window's steps are trained, so a group's
            reward spread comes from the steps that learn. None: every step is stochastic (Flow-GRPO).
        window_start (int): the window's first step (0 = the noisiest).
        window_shift_every (int | None): move the window ``window_stride`` steps later every this many training
            steps, from high noise towards low, until it reaches the last step (MixGRPO's sliding window);
            None: the window stays put.
        window_stride (int): steps the window moves at each shift.
        ratio_norm (bool): GRPO-Guard's RatioNorm (see ``guard_log_ratio``): the log-ratio is rescaled by each
            step's std and unbiased, so that every trained step weighs alike in the update and the ratio is centred
            on 1. ``clip_range`` then applies to that normalised ratio.
        explore (str): where the stochastic steps draw their noise. ``"all"``: every latent (Flow-GRPO).
            ``"mouth"``: only the latents of the mouth box (located from the ``pose`` keypoints, as SFT's
            ``mouth_weight``; pose becomes a required field); every other latent takes the step's mean, and
            log-probs, RatioNorm and the KL average over the box. Localised exploration as in RC-GRPO (Ouyang et
            al., arXiv 2604.09386, which localises the initial noise of an edit): a group's reward spread then
            comes from the region the lip-sync reward judges, not from nuisance variation elsewhere, and the
            policy gradient has no noise directions outside it. Rollouts whose box holds no latent (a mouth outside
            the frame) explore nothing and are counted as ``unexplored_rollouts``.
        grad_diagnostics (bool): also log the gradient norm each trained step contributes (``grad_norm/step_<j>``)
            and the relative size of each optimizer update (``update_size``, ‖Δθ‖/‖θ‖ over trained parameters);
            costs a copy of the trained gradients and weights.
        advantage_clip (float): advantages are clipped to ±this.
        global_std (bool): standardise by the std of all rewards in the batch instead of each group's.
        micro_batch (int | None): rollouts per forward (rollout and update split identically, so the first pass
            reproduces the rollout's log-probs exactly); None: all at once.
        max_grad_norm (float | None): clip the gradient norm before each optimizer step (manual optimization:
            the trainer's ``gradient_clip_val`` does not apply).
        chunk_frames (int | None): roll out clips longer than this chunk by chunk (FlowPortrait's autoregressive
            generation, see ``sampling.run_chunks``); every chunk's steps are trained with the
            clip's advantage. None: one pass.
        motion_frames (int): frames of the previous chunk that start the next.
        seed (int): seeds the rollout noise, mixed with the step and the process rank so that no two ranks or
            steps share noise.
        max_empty_batches (int | None): stop with an error after this many consecutive batches in which no
            sample on any rank has a usable reward (a dead judge endpoint, a judge answering garbage under
            ``on_failure: drop``). Each such batch still counts as its optimizer steps, which change nothing.
            None: never stop.
        lr (float | None): the learning rate it is tuned at, in place of the optimizer's (see ``Algorithm.lr``).
    """

    manual_optimization = True

    @property
    def required_fields(self) -> tuple[str, ...]:
        return with_pose(("audio", "reference"), self.explore == "mouth")

    def __init__(
        self,
        reward: Reward,
        group_size: int = 4,
        num_steps: int = 10,
        guidance_scale: float = 1.0,
        train_fraction: float = 0.5,
        same_noise_per_group: bool = False,
        clip_range: float = 1e-4,
        kl_beta: float = 0.0,
        inner_epochs: int = 1,
        sde_window: Optional[int] = None,
        window_start: int = 0,
        window_shift_every: Optional[int] = None,
        window_stride: int = 1,
        ratio_norm: bool = False,
        explore: str = "all",
        grad_diagnostics: bool = False,
        advantage_clip: float = 5.0,
        global_std: bool = False,
        micro_batch: Optional[int] = None,
        max_grad_norm: Optional[float] = 1.0,
        chunk_frames: Optional[int] = None,
        motion_frames: int = 5,
        seed: int = 0,
        max_empty_batches: Optional[int] = 20,
        lr: Optional[float] = None,
    ):
        if group_size < 2:
            raise ValueError(f"GRPO: group_size must be >= 2 (advantages compare rollouts of a group), got {group_size}")
        if not 0 < train_fraction <= 1:
            raise ValueError(f"GRPO: train_fraction must be in (0, 1], got {train_fraction}")
        if inner_epochs < 1:
            raise ValueError(f"GRPO: inner_epochs must be >= 1, got {inner_epochs}")
        if sde_window is not None and not 1 <= sde_window <= num_steps:
            raise ValueError(f"GRPO: sde_window must be in [1, num_steps={num_steps}] or None, got {sde_window}")
        if sde_window is not None and not 0 <= window_start <= num_steps - sde_window:
            raise ValueError(f"GRPO: window_start must be in [0, num_steps - sde_window = {num_steps - sde_window}], "
                             f"got {window_start}")
        if window_shift_every is not None and (sde_window is None or window_shift_every < 1):
            raise ValueError("GRPO: window_shift_every needs sde_window and must be >= 1 (or None for a fixed window), "
                             f"got {window_shift_every}")
        if explore not in ("all", "mouth"):
            raise ValueError(f"GRPO: explore must be 'all' or 'mouth', got {explore!r}")
        if window_stride < 1:
            raise ValueError(f"GRPO: window_stride must be >= 1, got {window_stride}")
        if max_empty_batches is not None and max_empty_batches < 1:
            raise ValueError(f"GRPO: max_empty_batches must be >= 1 or None, got {max_empty_batches}")
        self.set_optimization(lr, max_grad_norm)
        self.reward = reward
        self.group_size = group_size
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.train_fraction = train_fraction
        self.same_noise_per_group = same_noise_per_group
        self.clip_range = clip_range
        self.kl_beta = kl_beta
        self.inner_epochs = inner_epochs
        self.sde_window = sde_window
        self.window_start = window_start
        self.window_shift_every = window_shift_every
        self.window_stride = window_stride
        self.ratio_norm = ratio_norm
        self.explore = explore
        self.grad_diagnostics = grad_diagnostics
        self.advantage_clip = advantage_clip
        self.global_std = global_std
        self.micro_batch = micro_batch
        self.chunk_frames = chunk_frames
        self.motion_frames = motion_frames
        self.seed = seed
        self.max_empty_batches = max_empty_batches
        self.empty_batches = 0  # consecutive batches without a usable reward on any rank
        self.needs_reference = kl_beta > 0
        self.last_rollouts: dict = {}

    # --- the policy's Gaussian step -----------------------------------------------------------------------------
    def step_distribution(self, model: Callable, process, x: torch.Tensor, t, t_next, cond: dict, drop,
                          stochastic: bool = True):
        """Mean and std of the step from ``x`` at ``t`` under ``model`` (with CFG when configured): the stochastic
        step, or the deterministic one (std 0); see ``sampling.step_distribution``."""
        return step_distribution(model, process, x, t, t_next, cond, self.guidance_scale, drop, stochastic)

    def stochastic_steps(self, step: int) -> range:
        """The sampler steps that are stochastic (and so may be trained) at training step ``step``: all of them, or
        MixGRPO's window, moved ``window_stride`` later every ``window_shift_every`` steps up to the last step."""
        if self.sde_window is None:
            return range(self.num_steps)
        start = self.window_start
        if self.window_shift_every is not None:
            start += self.window_stride * (step // self.window_shift_every)
        start = min(start, self.num_steps - self.sde_window)
        return range(start, start + self.sde_window)

    # --- rollouts ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, policy: Policy, inputs: dict, num_frames: int, x: torch.Tensor,
                generator: torch.Generator, known: Optional[torch.Tensor] = None,
                stochastic: Optional[range] = None) -> Segment:
        """Sample from ``x`` (the prior), storing states and log-probs (``sampling.sample_latents`` with
        ``record``): the steps in ``stochastic`` (default: all) are stochastic, the others deterministic. ``known``
        latents fix the first latent frames (a chunk's given frames). With ``explore: mouth`` the noise is drawn on
        the mouth box's latents only."""
        denoiser = policy.denoiser
        cond = denoiser.condition(inputs, num_frames)
        region = mouth_mask(denoiser, inputs).to(x.dtype) if self.explore == "mouth" else None
        path = sample_latents(denoiser, policy.process, cond, x, self.num_steps, generator,
                              guidance_scale=self.guidance_scale, drop=denoiser.drop_conditions,
                              stochastic=range(self.num_steps) if stochastic is None else stochastic, known=known,
                              region=region, micro_batch=self.micro_batch, record=True, keep_means=self.ratio_norm)
        m = 0 if known is None else known.shape[2]
        return Segment(inputs, num_frames, cond, path.states, path.log_probs, free_from=m, means=path.means,
                       region=None if region is None else region[:, :, m:])

    def rollouts(self, policy: Policy, batch: dict, num_frames: int, generator: torch.Generator):
        """All rollouts of a batch of conditions, chunk by chunk for a long clip (``sampling.run_chunks``): the
        segments to train on and the decoded videos ``[N, T, ...]``."""
        denoiser = policy.denoiser
        stochastic = self.stochastic_steps(policy.global_step)
        n = batch["reference"].shape[0]
        height, width = batch["reference"].shape[-2:]

        def one_pass(inputs: dict, frames: int, known: Optional[torch.Tensor]):
            shape = denoiser.latent_shape(frames, height, width)
            if self.same_noise_per_group:
                x = policy.process.prior((n // self.group_size, *shape), device=policy.device, generator=generator)
                x = x.repeat_interleave(self.group_size, dim=0)
            else:
                x = policy.process.prior((n, *shape), device=policy.device, generator=generator)
            segment = self.rollout(policy, inputs, frames, x, generator, known, stochastic=stochastic)
            return segment, denoiser.decode(segment.states[-1])

        return run_chunks(denoiser, batch, num_frames, self.chunk_frames, self.motion_frames, one_pass)

    # --- advantages -------------------------------------------------------------------------------------------------
    def advantages(self, total: torch.Tensor, terms: dict, group_ids: torch.Tensor) -> torch.Tensor:
        """Per-sample advantages; samples whose reward is not finite (a judge's dropped answer) get NaN."""
        valid = torch.isfinite(total)
        result = torch.full_like(total, float("nan"))
        if not valid.any():
            return result
        if isinstance(self.reward, CompositeReward) and self.reward.aggregate == "advantage":
            kept = {name: value[valid] for name, value in terms.items() if torch.is_tensor(value)}
            result[valid] = self.reward.weighted_advantages(kept, group_ids[valid], self.global_std,
                                                            self.advantage_clip)
        else:
            result[valid] = group_advantages(total[valid], group_ids[valid], self.global_std, self.advantage_clip)
        return result.clamp(-self.advantage_clip, self.advantage_clip)

    def state_dict(self) -> dict:
        """The reward's running statistics and the count of consecutive empty batches (rollout noise is a function
        of the step, so it needs no state)."""
        state = {"empty_batches": self.empty_batches}
        if hasattr(self.reward, "state_dict"):
            state["reward"] = self.reward.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.empty_batches = state.get("empty_batches", 0)
        if "reward" in state:
            self.reward.load_state_dict(state["reward"])

    def empty_batches_error(self) -> RuntimeError:
        """Why training stops after ``max_empty_batches`` batches without a usable reward, with the counts of the
        reward's parts that keep them (a judge's ``stats``)."""
        parts = [self.reward, *(t for t in getattr(self.reward, "terms", ()) if isinstance(t, Reward))]
        counts = []
        for part in parts:
            stats = getattr(part, "stats", None)
            if isinstance(stats, dict) and stats:
                policy = f" (on_failure={part.on_failure!r})" if hasattr(part, "on_failure") else ""
                counts.append(f"{type(part).__name__}{policy}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
        return RuntimeError(
            f"GRPO: {self.empty_batches} consecutive batches had no usable reward (every sample's reward was "
            f"NaN, i.e. dropped, on every rank), so their optimizer steps changed nothing; stopping at "
            f"max_empty_batches={self.max_empty_batches}. "
            + (f"Reward counts so far: {'; '.join(counts)}. " if counts else "")
            + "Check that the judge endpoint is up and answers (the judge's warnings above give the reason of its "
            "last failures) and that its answers parse; or set the judge's on_failure to 'neutral' to score an "
            "unusable answer 3 instead of dropping the sample."
        )

    # --- the update -------------------------------------------------------------------------------------------------
    def generator(self, policy: Policy) -> torch.Generator:
        """Rollout noise seeded by (seed, step, rank): reproducible, and never shared between ranks or steps."""
        return step_generator(self.seed, policy.global_step, policy.global_rank)

    def training_step(self, policy: Policy, batch: dict) -> dict[str, torch.Tensor]:
        """One batch: roll out, score, take advantages, update (``inner_epochs`` optimizer steps), log."""
        rollouts = self.roll_out(policy, batch)
        with torch.no_grad():
            total, terms = self.reward.total(rollouts.videos, rollouts.inputs)
        advantages = self.advantages(total.to(policy.device).float(), terms, rollouts.group_ids)
        units = self.trained_units(rollouts.segments, rollouts.generator)
        empty = self.batch_is_empty(policy, advantages)
        diagnostics = self.update(policy, rollouts.segments, units, advantages, empty)
        self.last_rollouts = {  # what the last update saw, for inspection (and the DDP test)
            "group_ids": rollouts.group_ids.cpu(),
            "rewards": total.detach().cpu(),
            "advantages": advantages.detach().cpu(),
            "start_noise": rollouts.segments[0].states[0].flatten(1)[:, :8].cpu(),
        }
        return self.logged(rollouts, total, terms, advantages, len(units), diagnostics)

    def roll_out(self, policy: Policy, batch: dict) -> Rollouts:
        """``group_size`` rollouts of each of the batch's conditions, with the step-keyed noise."""
        num_conditions = batch["reference"].shape[0]
        inputs = repeat_conditions(batch, self.group_size)
        generator = self.generator(policy)
        window = self.stochastic_steps(policy.global_step)  # as the rollouts see it (the step moves on below)
        segments, videos = self.rollouts(policy, inputs, frames_of(batch), generator)
        group_ids = torch.arange(num_conditions, device=policy.device).repeat_interleave(self.group_size)
        return Rollouts(inputs, group_ids, segments, videos, generator, window)

    def trained_units(self, segments: list[Segment], generator: torch.Generator) -> list[tuple[int, int]]:
        """The (segment, sampler step) pairs to train: those with a density, a random ``train_fraction`` of them."""
        units = [(s, j) for s, seg in enumerate(segments) for j in range(self.num_steps)
                 if bool(torch.isfinite(seg.log_probs[j]).all())]
        keep = max(1, math.ceil(self.train_fraction * len(units)))
        order = torch.randperm(len(units), generator=generator)[:keep].sort().values
        return [units[i] for i in order.tolist()]

    def batch_is_empty(self, policy: Policy, advantages: torch.Tensor) -> bool:
        """Whether no rollout on any rank has a usable reward; stops after ``max_empty_batches`` such batches.

        Decided over all ranks: under DDP every rank must make the same backward calls (each one all-reduces the
        gradients), so a rank whose reward failed still runs every backward, with zero weight on its samples,
        while any other rank has something to learn from."""
        count = policy.sum_over_ranks(torch.tensor(float(torch.isfinite(advantages).sum()), device=policy.device))
        empty = int(count.item()) == 0
        self.empty_batches = self.empty_batches + 1 if empty else 0
        if empty and self.max_empty_batches is not None and self.empty_batches >= self.max_empty_batches:
            raise self.empty_batches_error()
        return empty

    def update(self, policy: Policy, segments: list[Segment], units: list[tuple[int, int]],
               advantages: torch.Tensor, empty: bool) -> dict:
        """``inner_epochs`` optimizer steps over the stored trajectories, gradients accumulated over ``units``.
        Returns the diagnostics: per-sample statistics, gradient norms per sampler step, update sizes."""
        stats = {"ratio": [], "clip_fraction": [], "approx_kl": [], "kl": [], "policy_loss": [], "ratio_drift": []}
        trained = policy.trainable_parameters() if self.grad_diagnostics else []
        step_grads: dict[int, list[float]] = {}
        update_sizes: list[float] = []
        scale = max(int(torch.isfinite(advantages).sum()), 1) * len(units)
        schedule = policy.process.timesteps(self.num_steps, device=policy.device)
        for epoch in range(self.inner_epochs):
            policy.zero_grad()
            if empty:
                # Still the steps of a batch, or max_steps is never reached and the step-keyed rollout noise
                # repeats. With every .grad None, the optimizer (AdamW) skips every parameter: the weights and its
                # state stay exactly as they were. The LR scheduler steps as for any step.
                policy.optimizer_step()
                continue
            for s, j in units:
                grads_before = [None if p.grad is None else p.grad.detach().clone() for p in trained]
                cond = self.update_conditions(policy, segments[s])
                for part in micro_batches(advantages.shape[0], self.micro_batch):
                    self.train_part(policy, segments[s], (schedule[j], schedule[j + 1]), j, part, cond,
                                    advantages, scale, stats, last_epoch=epoch == self.inner_epochs - 1)
                if trained:
                    added = sum(((p.grad if b is None else p.grad - b).float().pow(2).sum() for p, b in
                                 zip(trained, grads_before) if p.grad is not None), torch.zeros(()))
                    step_grads.setdefault(j, []).append(float(added.sqrt()))
            weights_before = [p.detach().clone() for p in trained]
            policy.optimizer_step(self.max_grad_norm)
            if trained:
                change = sum((p.detach() - b).float().pow(2).sum() for p, b in zip(trained, weights_before))
                norm = sum(b.float().pow(2).sum() for b in weights_before)
                update_sizes.append(float((change / norm.clamp_min(1e-30)).sqrt()))
        return {"stats": stats, "step_grads": step_grads, "update_sizes": update_sizes}

    @staticmethod
    def update_conditions(policy: Policy, segment: Segment) -> dict:
        """The segment's conditions, made again with a graph where the audio encoder trains (the rollout's were
        made without one)."""
        encoder = policy.denoiser.audio_encoder
        if encoder is not None and any(p.requires_grad for p in encoder.parameters()):
            return policy.denoiser.condition(segment.inputs, segment.num_frames)
        return segment.cond

    def train_part(self, policy: Policy, segment: Segment, times: tuple, j: int, part: slice, cond: dict,
                   advantages: torch.Tensor, scale: int, stats: dict, last_epoch: bool) -> None:
        """Backward of the PPO-clip loss (and the KL) of sampler step ``j``, from ``times = (t_j, t_j+1)``, for the
        rollouts ``part``."""
        denoiser, process = policy.denoiser, policy.process
        t, t_next = times
        n, m = advantages.shape[0], segment.free_from
        part_valid = torch.isfinite(advantages)[part]
        part_cond = slice_conditions(cond, part, n)
        x, x_next = segment.states[j][part], segment.states[j + 1][part]
        mean, std = self.step_distribution(denoiser, process, x, t, t_next, part_cond, denoiser.drop_conditions)
        region = None if segment.region is None else segment.region[part]
        log_prob = process.log_prob(x_next[:, :, m:], mean[:, :, m:], std, region)
        old_log_prob = segment.log_probs[j][part]
        if self.ratio_norm:  # the ratio becomes exp(guard_log_ratio)
            log_prob = old_log_prob + guard_log_ratio(
                log_prob, old_log_prob, mean[:, :, m:], segment.means[j][part][:, :, m:], std, region)
        per_sample, ratio = ppo_clip_loss(log_prob, old_log_prob, torch.nan_to_num(advantages[part]),
                                          self.clip_range)
        if self.kl_beta > 0:
            with policy.reference() as reference:
                ref_mean, _ = self.step_distribution(reference, process, x, t, t_next, part_cond,
                                                     denoiser.drop_conditions)
            kl = gaussian_kl(mean[:, :, m:], ref_mean[:, :, m:], std, region)
            per_sample = per_sample + self.kl_beta * kl
        # A part without a valid sample still goes through backward (a zero loss): see batch_is_empty.
        per_sample = torch.where(part_valid, per_sample, torch.zeros_like(per_sample))
        policy.backward(per_sample.sum() / scale)
        if not part_valid.any():
            return
        if self.kl_beta > 0:
            stats["kl"].append(kl[part_valid].detach())
        ratio = ratio[part_valid].detach()
        stats["ratio"].append(ratio)
        stats["clip_fraction"].append(((ratio - 1).abs() > self.clip_range).float())
        stats["approx_kl"].append(0.5 * (log_prob - old_log_prob)[part_valid].detach() ** 2)
        stats["policy_loss"].append(per_sample[part_valid].detach())
        if last_epoch:  # how far the last pass has moved from the rollout policy
            stats["ratio_drift"].append((ratio - 1).abs())

    def logged(self, rollouts: Rollouts, total: torch.Tensor, terms: dict, advantages: torch.Tensor,
               trained_steps: int, diagnostics: dict) -> dict[str, torch.Tensor]:
        """The step's metrics: rewards per term and their in-group spread, advantages, the update's statistics."""
        group_ids = rollouts.group_ids.cpu()
        finite = torch.isfinite(total)
        logged = {"reward": total[finite].mean() if finite.any() else total.new_tensor(0.0)}
        for name, value in terms.items():
            if torch.is_tensor(value):
                kept = value[torch.isfinite(value)]
                logged[f"reward/{name}"] = kept.float().mean() if kept.numel() else value.new_tensor(float("nan"))
                logged[f"reward/{name}_group_std"] = group_spread(value.float().cpu(), group_ids)[0]
        # The advantage signal: how much the rollouts of a group differ, and how many groups have nothing to learn.
        logged["reward_group_std"], logged["zero_spread_groups"] = group_spread(total.float().cpu(), group_ids)
        for j, norms in sorted(diagnostics["step_grads"].items()):
            logged[f"grad_norm/step_{j}"] = torch.tensor(sum(norms) / len(norms))
        if diagnostics["update_sizes"]:
            logged["update_size"] = torch.tensor(sum(diagnostics["update_sizes"]) / len(diagnostics["update_sizes"]))
        logged["sde_window_start"] = torch.tensor(float(rollouts.window.start))
        if self.explore == "mouth":  # a mouth box outside the frame leaves a rollout nothing to explore, or learn
            empty_region = torch.stack([seg.region.flatten(1).sum(1) == 0 for seg in rollouts.segments]).any(dim=0)
            logged["unexplored_rollouts"] = empty_region.float().sum()
        valid = torch.isfinite(advantages)
        n, num_valid = advantages.shape[0], int(valid.sum())
        finite_adv = advantages[valid]
        logged.update(
            advantage_mean=finite_adv.mean() if num_valid else advantages.new_tensor(0.0),
            advantage_std=finite_adv.std(unbiased=False) if num_valid else advantages.new_tensor(0.0),
            advantage_abs_max=finite_adv.abs().max() if num_valid else advantages.new_tensor(0.0),
            dropped_samples=advantages.new_tensor(float(n - num_valid)),
            dropped_fraction=advantages.new_tensor((n - num_valid) / n),
            empty_batches=advantages.new_tensor(float(self.empty_batches)),
            trained_steps=advantages.new_tensor(float(trained_steps)),
        )
        for name, values in diagnostics["stats"].items():
            if values:
                logged[name] = torch.cat(values).float().mean()
        return logged
