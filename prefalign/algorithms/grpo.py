"""GRPO for portrait video (FlowPortrait): stochastic rollouts with log-probs, group advantages, PPO-clip, KL.

One training step: for each of the batch's B conditions (reference image, audio, pose), ``group_size`` rollouts are
sampled with the process's stochastic step (the Flow-GRPO SDE on flow matching, DDIM with η > 0 on diffusion),
keeping every state and the log-prob of every step; the decoded videos are scored by the reward; advantages are
standardised within each group; then the policy takes ``inner_epochs`` optimizer steps on a random subset of the
sampler steps, accumulating gradients over those steps, with the PPO-clip loss on the ratio of new to old
log-probs and an optional KL penalty to the reference policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from prefalign.algorithms.base import Algorithm
from prefalign.denoisers.base import frames_of, join_chunks
from prefalign.processes.base import randn
from prefalign.rewards.base import Reward
from prefalign.rewards.composite import CompositeReward, group_advantages

if TYPE_CHECKING:
    from prefalign.module import AlignmentModule


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float):
    """Per-sample PPO-clip loss ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`` with ``ρ = exp(lp − lp_old)``, and ``ρ``."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussian steps of the same std, per sample, averaged over elements: ``‖μ − μ_ref‖² / (2σ²)``."""
    per_element = (mean.float() - reference_mean.float()).pow(2) / (2 * std.float().pow(2))
    return per_element.flatten(1).mean(dim=1)


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
    """

    inputs: dict
    num_frames: int
    cond: dict
    states: torch.Tensor
    log_probs: torch.Tensor
    free_from: int = 0


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
        advantage_clip (float): advantages are clipped to ±this.
        global_std (bool): standardise by the std of all rewards in the batch instead of each group's.
        micro_batch (int | None): rollouts per forward (rollout and update split identically, so the first pass
            reproduces the rollout's log-probs exactly); None: all at once.
        max_grad_norm (float | None): clip the gradient norm before each optimizer step (manual optimization:
            the trainer's ``gradient_clip_val`` does not apply).
        chunk_frames (int | None): roll out clips longer than this chunk by chunk (FlowPortrait's autoregressive
            generation, see ``AlignmentModule.generate_chunks``); every chunk's steps are trained with the
            clip's advantage. None: one pass.
        motion_frames (int): frames of the previous chunk that start the next.
        seed (int): seeds the rollout noise, mixed with the step and the process rank so that no two ranks or
            steps share noise.
    """

    required_fields = ("audio", "reference")
    manual_optimization = True

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
        advantage_clip: float = 5.0,
        global_std: bool = False,
        micro_batch: Optional[int] = None,
        max_grad_norm: Optional[float] = 1.0,
        chunk_frames: Optional[int] = None,
        motion_frames: int = 5,
        seed: int = 0,
    ):
        if group_size < 2:
            raise ValueError(f"GRPO: group_size must be >= 2 (advantages compare rollouts of a group), got {group_size}")
        if not 0 < train_fraction <= 1:
            raise ValueError(f"GRPO: train_fraction must be in (0, 1], got {train_fraction}")
        if inner_epochs < 1:
            raise ValueError(f"GRPO: inner_epochs must be >= 1, got {inner_epochs}")
        self.reward = reward
        self.group_size = group_size
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.train_fraction = train_fraction
        self.same_noise_per_group = same_noise_per_group
        self.clip_range = clip_range
        self.kl_beta = kl_beta
        self.inner_epochs = inner_epochs
        self.advantage_clip = advantage_clip
        self.global_std = global_std
        self.micro_batch = micro_batch
        self.max_grad_norm = max_grad_norm
        self.chunk_frames = chunk_frames
        self.motion_frames = motion_frames
        self.seed = seed
        self.needs_reference = kl_beta > 0
        self.last_rollouts: dict = {}

    # --- the policy's Gaussian step -----------------------------------------------------------------------------
    def step_distribution(self, model: Callable, process, x: torch.Tensor, t, t_next, cond: dict, drop):
        """Mean and std of the stochastic step from ``x`` at ``t`` under ``model`` (with CFG when configured)."""
        model_t = process.model_time(t.expand(x.shape[0]))
        pred = model(x, model_t, cond)
        if self.guidance_scale != 1.0:
            uncond = model(x, model_t, drop(cond, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)))
            pred = uncond + self.guidance_scale * (pred - uncond)
        out = process.step(pred, x, t, t_next, stochastic=True, noise=torch.zeros_like(x, dtype=torch.float32))
        return out.mean, out.std

    def chunks(self, n: int) -> list[slice]:
        size = self.micro_batch or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    @staticmethod
    def slice_cond(cond: dict, part: slice, n: int) -> dict:
        return {k: (v[part] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v) for k, v in cond.items()}

    # --- rollouts ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, module: AlignmentModule, inputs: dict, num_frames: int, x: torch.Tensor,
                generator: torch.Generator, known: Optional[torch.Tensor] = None) -> Segment:
        """Sample from ``x`` (the prior) with stochastic steps, storing states and log-probs. ``known`` latents fix
        the first latent frames at every step (a chunk's given frames), noised to the step's level."""
        process, denoiser = module.process, module.denoiser
        cond = denoiser.condition(inputs, num_frames)
        schedule = process.timesteps(self.num_steps, device=x.device)
        n = x.shape[0]
        m = 0 if known is None else known.shape[2]
        if known is not None:
            known_noise = randn(known.shape, generator=generator, device=x.device, dtype=known.dtype)
        states, log_probs = [], []
        for t, t_next in zip(schedule[:-1], schedule[1:]):
            if known is not None:
                x = torch.cat([process.noise(known, known_noise, t.expand(n)).to(x.dtype), x[:, :, m:]], dim=2)
            states.append(x)
            means, stds = [], []
            for part in self.chunks(n):
                mean, std = self.step_distribution(
                    denoiser, process, x[part], t, t_next, self.slice_cond(cond, part, n), denoiser.drop_conditions
                )
                means.append(mean)
                stds.append(std)
            mean, std = torch.cat(means), torch.cat(stds)
            if bool((std > 0).all()):
                sample = mean + std * randn(mean.shape, generator=generator, device=x.device, dtype=mean.dtype)
                log_probs.append(process.log_prob(sample[:, :, m:], mean[:, :, m:], std))
            else:  # a deterministic step (the last DDIM / CPS step): no density, never trained
                sample = mean
                log_probs.append(torch.full((n,), float("nan"), device=x.device))
            x = sample.to(x.dtype)
        if known is not None:
            x = torch.cat([known.to(x.dtype), x[:, :, m:]], dim=2)
        states.append(x)
        return Segment(inputs, num_frames, cond, torch.stack(states), torch.stack(log_probs), free_from=m)

    def rollouts(self, module: AlignmentModule, batch: dict, num_frames: int, generator: torch.Generator):
        """All rollouts of a batch of conditions: the segments to train on and the decoded videos ``[N, T, ...]``."""
        denoiser, process = module.denoiser, module.process
        n = batch["reference"].shape[0]
        height, width = batch["reference"].shape[-2:]

        def prior(frames: int) -> torch.Tensor:
            shape = denoiser.latent_shape(frames, height, width)
            if self.same_noise_per_group:
                x = process.prior((n // self.group_size, *shape), device=module.device, generator=generator)
                return x.repeat_interleave(self.group_size, dim=0)
            return process.prior((n, *shape), device=module.device, generator=generator)

        if self.chunk_frames is None or num_frames <= self.chunk_frames:
            segment = self.rollout(module, batch, num_frames, prior(num_frames), generator)
            return [segment], denoiser.decode(segment.states[-1])

        size, overlap = self.chunk_frames, self.motion_frames
        codec = denoiser.codec
        segments, videos, start = [], [], 0
        while True:
            part = denoiser.chunk_inputs(batch, start, size)
            known = codec.encode(videos[-1][:, -overlap:]) if videos else None
            segment = self.rollout(module, part, size, prior(size), generator, known)
            segments.append(segment)
            videos.append(denoiser.decode(segment.states[-1]))
            if start + size >= num_frames:
                break
            start += size - overlap
        return segments, join_chunks(videos, overlap, num_frames)

    # --- advantages -------------------------------------------------------------------------------------------------
    def advantages(self, total: torch.Tensor, terms: dict, group_ids: torch.Tensor) -> torch.Tensor:
        """Per-sample advantages; samples whose reward is not finite (a judge's dropped answer) get NaN."""
        valid = torch.isfinite(total)
        result = torch.full_like(total, float("nan"))
        if not valid.any():
            return result
        if isinstance(self.reward, CompositeReward) and self.reward.aggregate == "advantage":
            kept = {name: value[valid] for name, value in terms.items() if torch.is_tensor(value)}
            result[valid] = self.reward.weighted_advantages(kept, group_ids[valid])
        else:
            result[valid] = group_advantages(total[valid], group_ids[valid], self.global_std, self.advantage_clip)
        return result.clamp(-self.advantage_clip, self.advantage_clip)

    def state_dict(self) -> dict:
        """The reward's running statistics (rollout noise is a function of the step, so it needs no state)."""
        return {"reward": self.reward.state_dict()} if hasattr(self.reward, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if "reward" in state:
            self.reward.load_state_dict(state["reward"])

    # --- the update -------------------------------------------------------------------------------------------------
    def generator(self, module: AlignmentModule) -> torch.Generator:
        """Rollout noise seeded by (seed, step, rank): reproducible, and never shared between ranks or steps."""
        state = np.random.SeedSequence([self.seed, module.global_step, module.global_rank]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(state))

    def training_step(self, module: AlignmentModule, batch: dict) -> dict[str, torch.Tensor]:
        denoiser, process = module.denoiser, module.process
        optimizer, scheduler = module.optimizers(), module.lr_schedulers()
        g = self.group_size
        num_conditions = batch["reference"].shape[0]
        num_frames = frames_of(batch)
        expanded = {
            k: (v.repeat_interleave(g, dim=0) if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == num_conditions else v)
            for k, v in batch.items()
        }
        n = num_conditions * g
        group_ids = torch.arange(num_conditions, device=module.device).repeat_interleave(g)
        generator = self.generator(module)

        segments, videos = self.rollouts(module, expanded, num_frames, generator)
        with torch.no_grad():
            total, terms = self.reward.total(videos, expanded)
        advantages = self.advantages(total.to(module.device).float(), terms, group_ids)
        valid = torch.isfinite(advantages)
        num_valid = int(valid.sum())

        # The units to train: (segment, sampler step) with a density, a random train_fraction of them.
        units = [(s, j) for s, seg in enumerate(segments) for j in range(self.num_steps)
                 if bool(torch.isfinite(seg.log_probs[j]).all())]
        keep = max(1, math.ceil(self.train_fraction * len(units)))
        order = torch.randperm(len(units), generator=generator)[:keep].sort().values
        units = [units[i] for i in order.tolist()]
        schedule = process.timesteps(self.num_steps, device=module.device)

        encoder = denoiser.audio_encoder
        encoder_trains = encoder is not None and any(p.requires_grad for p in encoder.parameters())
        stats = {"ratio": [], "clip_fraction": [], "approx_kl": [], "kl": [], "policy_loss": []}
        for _ in range(self.inner_epochs):
            optimizer.zero_grad()
            if num_valid == 0:
                break
            for s, j in units:
                segment = segments[s]
                cond = segment.cond
                if encoder_trains:  # the rollout's conditions were made without a graph
                    cond = denoiser.condition(segment.inputs, segment.num_frames)
                m = segment.free_from
                for part in self.chunks(n):
                    part_valid = valid[part]
                    if not part_valid.any():
                        continue
                    part_cond = self.slice_cond(cond, part, n)
                    x, x_next = segment.states[j][part], segment.states[j + 1][part]
                    mean, std = self.step_distribution(
                        denoiser, process, x, schedule[j], schedule[j + 1], part_cond, denoiser.drop_conditions
                    )
                    log_prob = process.log_prob(x_next[:, :, m:], mean[:, :, m:], std)
                    adv = torch.nan_to_num(advantages[part])
                    per_sample, ratio = ppo_clip_loss(log_prob, segment.log_probs[j][part], adv, self.clip_range)
                    if self.kl_beta > 0:
                        with module.reference() as reference:
                            ref_mean, _ = self.step_distribution(
                                reference, process, x, schedule[j], schedule[j + 1], part_cond,
                                denoiser.drop_conditions,
                            )
                        kl = gaussian_kl(mean[:, :, m:], ref_mean[:, :, m:], std)
                        per_sample = per_sample + self.kl_beta * kl
                        stats["kl"].append(kl[part_valid].detach())
                    loss = (per_sample * part_valid).sum() / (num_valid * len(units))
                    module.manual_backward(loss)
                    ratio = ratio[part_valid].detach()
                    stats["ratio"].append(ratio)
                    stats["clip_fraction"].append(((ratio - 1).abs() > self.clip_range).float())
                    stats["approx_kl"].append(0.5 * (log_prob - segment.log_probs[j][part])[part_valid].detach() ** 2)
                    stats["policy_loss"].append(per_sample[part_valid].detach())
            if self.max_grad_norm is not None:
                module.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            if scheduler is not None:
                scheduler.step()

        self.last_rollouts = {  # what the last update saw, for inspection (and the DDP test)
            "group_ids": group_ids.cpu(),
            "rewards": total.detach().cpu(),
            "advantages": advantages.detach().cpu(),
            "start_noise": segments[0].states[0].flatten(1)[:, :8].cpu(),
        }
        logged = {"reward": total[torch.isfinite(total)].mean() if torch.isfinite(total).any() else total.new_tensor(0.0)}
        for name, value in terms.items():
            if torch.is_tensor(value):
                finite = value[torch.isfinite(value)]
                logged[f"reward/{name}"] = finite.float().mean() if finite.numel() else value.new_tensor(float("nan"))
        finite_adv = advantages[valid]
        logged.update(
            advantage_mean=finite_adv.mean() if num_valid else advantages.new_tensor(0.0),
            advantage_std=finite_adv.std(unbiased=False) if num_valid else advantages.new_tensor(0.0),
            advantage_abs_max=finite_adv.abs().max() if num_valid else advantages.new_tensor(0.0),
            dropped_samples=advantages.new_tensor(float(n - num_valid)),
            trained_steps=advantages.new_tensor(float(len(units))),
        )
        for name, values in stats.items():
            if values:
                logged[name] = torch.cat(values).float().mean()
        return logged
