"""Diffusion-DPO and Flow-DPO on preference pairs (Hallo4's alignment of portrait animation with human preferences)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from prefalign.algorithms.base import Algorithm, paired_errors, repeat_conditions, step_generator
from prefalign.data.errors import DataError
from prefalign.denoisers.base import frames_of
from prefalign.policy import Policy
from prefalign.rewards.base import Reward

LossType = Literal["sigmoid", "hinge", "ipo"]


def dpo_loss(
    policy_win: torch.Tensor,
    policy_lose: torch.Tensor,
    reference_win: torch.Tensor,
    reference_lose: torch.Tensor,
    beta: float,
    loss_type: LossType = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Diffusion-DPO loss from per-sample denoising errors (Wallace et al., arXiv 2311.12908).

    With ``m = (e_l - e_l^ref) - (e_w - e_w^ref)`` (how much more the policy improved on the winner than on the
    loser, relative to the reference) and the log-likelihood-ratio surrogate ``h = m / 2`` of a Gaussian step:

    - ``sigmoid``: ``-log σ(β·h)``, i.e. ``-log σ(-β/2 · [(e_w - e_w^ref) - (e_l - e_l^ref)])``;
    - ``hinge``:   ``max(0, 1 - β·h)``;
    - ``ipo``:     ``(h - 1/(2β))²`` (Azar et al., arXiv 2310.12036: the log-ratio regressed to 1/(2β)).

    β convention: the 1/2 is inside, so β = 5000 reproduces Salesforce's DiffusionDPO (β = 5000 with the 1/2),
    which is the same loss as diffusers' research example's β = 2500 without it.

    Args:
        policy_win (Tensor): ``e_w`` per pair ``[B]``, the policy's error on the chosen clip.
        policy_lose (Tensor): ``e_l`` ``[B]``, on the rejected clip.
        reference_win (Tensor): ``e_w^ref`` ``[B]``.
        reference_lose (Tensor): ``e_l^ref`` ``[B]``.
        beta (float): strength of the KL regularisation towards the reference (larger = further from it).
        loss_type (str): ``sigmoid``, ``hinge`` or ``ipo``.

    Returns:
        tuple[Tensor, Tensor]: the loss per pair ``[B]`` and the implicit reward margin ``β·h`` per pair ``[B]``.
    """
    margin = (reference_win - policy_win) - (reference_lose - policy_lose)
    h = margin / 2
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: use sigmoid, hinge or ipo")
    return loss, beta * h


class DiffusionDPO(Algorithm):
    """Diffusion-DPO (eps / v targets) and Flow-DPO (velocity targets): whatever target the process defines.

    Each pair (chosen ``video``, ``rejected``, shared conditions) is noised with the same noise and timestep; the
    policy sees winner and loser in one batched forward, the reference in one no-grad forward (the adapter-disabled
    base under LoRA; a frozen copy under full fine-tuning). Hallo4 curates pairs per aspect (lip sync, expression,
    motion): with ``aspect_weights``, a pair's weight is ``Σ_a w_a·label_a`` over its labels in {-1, 0, 1}, and a
    negative total swaps winner and loser.

    Args:
        beta (float): DPO β with the 1/2 inside the loss (5000 ≙ Salesforce, 2500-without-½ ≙ diffusers); Flow-DPO
            on velocity targets typically uses 100-2000.
        loss_type (str): ``sigmoid`` (Diffusion-DPO), ``hinge`` or ``ipo``.
        sft_weight (float): weight of an extra plain denoising loss on the winner (0 = pure DPO).
        aspect_weights (dict[str, float] | None): per-aspect weights for pairs with ``labels`` (e.g.
            ``{lip_sync: 1.0, expression: 0.5, motion: 0.5}``); pairs without labels weigh 1.
        reference_refresh_every (int | None): online DPO: make the reference the current policy every k steps
            (under LoRA a snapshot of the adapters, under full fine-tuning the frozen copy).
        reward (Reward | None): online pairs (Flow-DPO's online variant): for a batch without ``rejected``
            clips, sample ``group_size`` videos per condition with the current policy, score them with this reward
            and train on the best (chosen) against the worst (rejected) of each group. Batches with ``rejected``
            clips train on them. None: the data must have ``rejected``.
        group_size (int): samples per condition for online pairs (>= 2).
        sample_steps (int): sampler steps of the online samples (deterministic steps from different noise).
        guidance_scale (float): classifier-free guidance of the online samples (1 = off).
        seed (int): seeds the online samples' noise, mixed with the step and the process rank.
        lr (float | None): the learning rate it is tuned at, in place of the optimizer's (see ``Algorithm.lr``).
        max_grad_norm (float | None): clip the gradient norm to this before each step.
    """

    needs_reference = True

    def __init__(
        self,
        beta: float = 5000.0,
        loss_type: LossType = "sigmoid",
        sft_weight: float = 0.0,
        aspect_weights: Optional[dict[str, float]] = None,
        reference_refresh_every: Optional[int] = None,
        reward: Optional[Reward] = None,
        group_size: int = 4,
        sample_steps: int = 20,
        guidance_scale: float = 1.0,
        seed: int = 0,
        lr: Optional[float] = None,
        max_grad_norm: Optional[float] = None,
    ):
        if beta <= 0:
            raise ValueError(f"DiffusionDPO: beta must be > 0, got {beta}")
        if loss_type not in ("sigmoid", "hinge", "ipo"):
            raise ValueError(f"DiffusionDPO: unknown loss_type {loss_type!r}: use sigmoid, hinge or ipo")
        if group_size < 2:
            raise ValueError(f"DiffusionDPO: group_size must be >= 2 (a pair is the best and worst of a group), got {group_size}")
        if sample_steps < 1:
            raise ValueError(f"DiffusionDPO: sample_steps must be >= 1, got {sample_steps}")
        self.set_optimization(lr, max_grad_norm)
        self.reward = reward
        self.group_size = group_size
        self.sample_steps = sample_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.beta = beta
        self.loss_type = loss_type
        self.sft_weight = sft_weight
        self.aspect_weights = aspect_weights
        self.reference_refresh_every = reference_refresh_every

    @property
    def required_fields(self) -> tuple[str, ...]:
        if self.reward is None:
            return ("video", "rejected", "audio", "reference")
        return ("audio", "reference")  # pairs are made online where the data has no rejected clips

    def state_dict(self) -> dict:
        """The reward's running statistics (online pairs' noise is a function of the step)."""
        return {"reward": self.reward.state_dict()} if hasattr(self.reward, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if "reward" in state and self.reward is not None:
            self.reward.load_state_dict(state["reward"])

    def setup(self, policy: Policy) -> None:
        if self.reference_refresh_every:
            # The starting policy as a lagged snapshot (the same model): its tensors exist from the start, so a
            # strategy that loads checkpoints strictly before our hook (FSDP) finds them when resuming.
            policy.refresh_reference()

    def on_step_end(self, policy: Policy, step: int) -> None:
        if self.reference_refresh_every and step % self.reference_refresh_every == 0:
            policy.refresh_reference()

    def pair_weights(self, batch: dict, size: int, device: torch.device) -> torch.Tensor:
        """Signed weight per pair from its per-aspect labels (1 where the pair has none or no weights are set)."""
        if not self.aspect_weights or "labels" not in batch:
            return torch.ones(size, device=device)
        weights = []
        for labels in batch["labels"]:
            labels = labels or {}
            weights.append(sum(w * float(labels.get(aspect, 0)) for aspect, w in self.aspect_weights.items()) if labels else 1.0)
        return torch.tensor(weights, device=device, dtype=torch.float32)

    def online_pairs(self, policy: Policy, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Chosen and rejected latents ``[B, C, F, h, w]`` from ``group_size`` policy samples per condition: the
        best and the worst under the reward. A group with fewer than two usable rewards (a judge's dropped
        answers) or no spread gives a pair of weight 0 (it still runs through the model, so that every rank's
        backward covers the same parameters). Returns (chosen, rejected, weight [B], logged)."""
        g, size = self.group_size, batch["reference"].shape[0]
        expanded = repeat_conditions(batch, g)
        generator = step_generator(self.seed, policy.global_step, policy.global_rank, policy.device)
        latents = policy.sample(expanded, frames_of(batch), generator, self.sample_steps, self.guidance_scale)
        with torch.no_grad():
            rewards, _ = self.reward.total(policy.denoiser.decode(latents), expanded)
        rewards = rewards.float().view(size, g).to(latents.device)
        usable = torch.isfinite(rewards)
        best = torch.where(usable, rewards, -torch.inf).argmax(dim=1)
        worst = torch.where(usable, rewards, torch.inf).argmin(dim=1)
        spread = rewards.gather(1, best[:, None]) - rewards.gather(1, worst[:, None])
        weight = ((usable.sum(dim=1) >= 2) & (spread[:, 0] > 0)).float()
        rows = torch.arange(size, device=latents.device) * g
        logged = {
            "online_reward_best": rewards.gather(1, best[:, None]).nanmean(),
            "online_reward_worst": rewards.gather(1, worst[:, None]).nanmean(),
            "online_pairs_used": weight.mean(),
            "online_dropped_fraction": 1 - usable.float().mean(),
        }
        return latents[rows + best], latents[rows + worst], weight, logged

    def loss(self, policy: Policy, batch: dict):
        denoiser = policy.denoiser
        online = {}
        if "rejected" in batch or "rejected_latents" in batch:
            chosen = denoiser.latents(batch)
            rejected = denoiser.latents(batch, "rejected")
            weight = self.pair_weights(batch, chosen.shape[0], chosen.device)
        elif self.reward is not None:
            chosen, rejected, weight, online = self.online_pairs(policy, batch)
        else:
            raise DataError("DiffusionDPO needs rejected clips, or a `reward` to make pairs from its own samples "
                            "(model.algorithm.init_args.reward)", field="rejected")
        swap = (weight < 0).view(-1, *([1] * (chosen.dim() - 1)))
        win, lose = torch.where(swap, rejected, chosen), torch.where(swap, chosen, rejected)
        e_w, e_l, r_w, r_l = paired_errors(policy, win, lose, denoiser.condition(batch))
        per_pair, reward_margin = dpo_loss(e_w, e_l, r_w, r_l, self.beta, self.loss_type)
        magnitude = weight.abs()
        loss = (magnitude * per_pair).sum() / magnitude.sum().clamp_min(1.0 if online else 1e-8)
        if self.sft_weight:
            loss = loss + self.sft_weight * e_w.mean()

        logged = {
            "loss": loss.detach(),
            "implicit_accuracy": (reward_margin > 0).float().mean(),
            "reward_margin": reward_margin.detach().mean(),
            "error_win": e_w.detach().mean(),
            "error_lose": e_l.detach().mean(),
            "reference_error_win": r_w.mean(),
            "reference_error_lose": r_l.mean(),
            **online,
        }
        return loss, logged


