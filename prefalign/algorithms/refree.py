"""Reward-free RL inside flow-matching training (ReFree-S2V), in our reading of it (DESIGN.md).

No reward model and no labels: the ground-truth clip is the positive; the negative is a video that is perceptually
implausible for the same conditions — the policy's own sample from a lagged snapshot (self-play, as SPIN-Diffusion),
or the ground truth with its motion broken (temporal jitter, a frozen head, a time warp, an audio offset). The loss
is a Flow-DPO term between the two against the lagged reference, plus λ times the plain flow-matching loss on the
positive, which keeps the model on the data while the preference term pushes it away from the implausible.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from prefalign.algorithms.base import Algorithm, mouth_weights, paired_errors, per_sample_mse, with_pose
from prefalign.algorithms.dpo import LossType, dpo_loss
from prefalign.policy import Policy
from prefalign.sampling import sample_clip_latents

NegativeKind = Literal["self_play", "jitter", "freeze", "time_warp", "audio_offset"]
PERTURBATIONS = ("jitter", "freeze", "time_warp", "audio_offset")


# --- perturbations of the ground truth: [B, T, 3, H, W] → the same shape, motion made implausible -------------------
def jitter_frames(video: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Temporal jitter: every frame after the first is shifted by its own random offset of up to ``max_shift``
    pixels in x and y (camera or head shake that no speech explains)."""
    out = video.clone()
    b, t = video.shape[:2]
    shifts = torch.randint(-max_shift, max_shift + 1, (b, t, 2), generator=generator)
    shifts[:, 0] = 0
    for i in range(b):
        for f in range(1, t):
            dy, dx = shifts[i, f].tolist()
            out[i, f] = torch.roll(video[i, f], shifts=(dy, dx), dims=(-2, -1))
    return out


def freeze_frames(video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A frozen head: one random frame of the clip held for its whole length while the speech goes on (a stuck
    generator). Freezing only part of a clip can land on a pause, where a still face is plausible."""
    b, t = video.shape[:2]
    frames = torch.randint(0, t, (b,), generator=generator)
    return video[torch.arange(b), frames][:, None].expand_as(video).clone()


def time_warp(video: torch.Tensor, generator: torch.Generator, strength: float = 0.6) -> torch.Tensor:
    """Time-warping: the frames are resampled on a monotone non-linear clock ``τ(s) = s^γ`` over the clip (γ drawn
    from ``[1 + strength/2, 1 + strength]`` or its inverse), so the mouth runs ahead of or behind the speech and
    speeds up or slows down. Nearest frame."""
    b, t = video.shape[:2]
    out = torch.empty_like(video)
    s = torch.linspace(0, 1, t)
    for i in range(b):
        gamma = 1 + strength * (0.5 + 0.5 * torch.rand((), generator=generator).item())
        if torch.rand((), generator=generator).item() < 0.5:
            gamma = 1 / gamma
        index = torch.round(s.pow(gamma) * (t - 1)).long().clamp(0, t - 1)
        out[i] = video[i, index]
    return out


def offset_frames(video: torch.Tensor, generator: torch.Generator, max_offset: int = 3) -> torch.Tensor:
    """An audio offset: the video is moved by 1 to ``max_offset`` frames against its audio (either way; the
    edge frame repeats), as a badly muxed or lagging generator would."""
    b, t = video.shape[:2]
    out = torch.empty_like(video)
    for i in range(b):
        k = int(torch.randint(1, max_offset + 1, (), generator=generator)) * (
            1 if torch.rand((), generator=generator).item() < 0.5 else -1
        )
        index = (torch.arange(t) - k).clamp(0, t - 1)
        out[i] = video[i, index]
    return out


def perturb(video: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Apply the named perturbation (one of ``PERTURBATIONS``)."""
    if kind == "jitter":
        return jitter_frames(video, generator)
    if kind == "freeze":
        return freeze_frames(video, generator)
    if kind == "time_warp":
        return time_warp(video, generator)
    if kind == "audio_offset":
        return offset_frames(video, generator)
    raise ValueError(f"unknown perturbation {kind!r}: use one of {', '.join(PERTURBATIONS)}")


class ReFree(Algorithm):
    """Reward-free preference training against implausible negatives, inside flow-matching training.

    ``loss = [ℓ_DPO(e⁺, e⁻, e⁺_ref, e⁻_ref; β) − ℓ_DPO(0)] + λ · e⁺`` per clip, with the errors of the policy and of
    the lagged reference on the positive (ground truth) and the negative under shared noise and timestep. The
    DPO term is shifted by its value at zero margin, so it is 0 when the policy equals the reference, and β = 0
    leaves exactly the flow-matching loss λ·e⁺.

    Args:
        beta (float): DPO β (the 1/2 inside, as ``DiffusionDPO``); 0 switches the preference term off.
        fm_weight (float): λ, weight of the plain flow-matching loss on the positive.
        loss_type (str): ``sigmoid``, ``hinge`` or ``ipo`` (see ``dpo_loss``).
        refresh_every (int): steps between refreshes of the lagged reference (and of the self-play negatives
            sampled from it, which are cached per clip until then: their sampling cost is amortised over
            ``refresh_every`` steps).
        negatives (dict[str, float]): the mix of negative sources, as relative weights: ``self_play`` (a sample of
            the lagged snapshot for the clip's conditions) and the perturbations ``jitter``, ``freeze``,
            ``time_warp``, ``audio_offset`` of the ground truth. Each clip's negative source is drawn from it.
        self_play_steps (int): sampler steps of the self-play samples (deterministic).
        mouth_weight (float): weigh the latents around the mouth by ``1 + mouth_weight`` in every error (as
            ``SFT.mouth_weight``; needs pose), so that the flow-matching term is the SFT loss it continues.
        seed (int): seeds the negative draws.
        lr (float | None): the learning rate it is tuned at, in place of the optimizer's (see ``Algorithm.lr``).
        max_grad_norm (float | None): clip the gradient norm to this before each step.
    """

    needs_reference = True
    needs_pixels = True  # the perturbations act on frames

    def __init__(
        self,
        beta: float = 1000.0,
        fm_weight: float = 1.0,
        loss_type: LossType = "sigmoid",
        refresh_every: int = 100,
        negatives: Optional[dict[str, float]] = None,
        self_play_steps: int = 10,
        mouth_weight: float = 0.0,
        seed: int = 0,
        lr: Optional[float] = None,
        max_grad_norm: Optional[float] = None,
    ):
        negatives = dict(negatives or {"self_play": 0.5, "jitter": 0.125, "freeze": 0.125, "time_warp": 0.125,
                                       "audio_offset": 0.125})
        unknown = sorted(set(negatives) - {"self_play", *PERTURBATIONS})
        if unknown:
            raise ValueError(f"ReFree: unknown negative sources {unknown}; use self_play, {', '.join(PERTURBATIONS)}")
        if any(w < 0 for w in negatives.values()) or sum(negatives.values()) <= 0:
            raise ValueError(f"ReFree: negative weights must be >= 0 and not all 0, got {negatives}")
        if beta < 0 or fm_weight < 0:
            raise ValueError(f"ReFree: beta and fm_weight must be >= 0, got {beta} and {fm_weight}")
        if refresh_every < 1:
            raise ValueError(f"ReFree: refresh_every must be >= 1, got {refresh_every}")
        self.set_optimization(lr, max_grad_norm)
        self.beta = beta
        self.fm_weight = fm_weight
        self.loss_type = loss_type
        self.refresh_every = refresh_every
        self.kinds = [k for k, w in negatives.items() if w > 0]
        self.weights = torch.tensor([negatives[k] for k in self.kinds], dtype=torch.float64)
        self.self_play_steps = self_play_steps
        self.mouth_weight = mouth_weight
        self.generator = torch.Generator().manual_seed(seed)
        self.self_play_latents: dict = {}  # (clip id, conditions fingerprint) -> self-play latents [C, F, h, w]
        self.refreshes = 0
        self.self_play_sampled = 0

    @property
    def required_fields(self) -> tuple[str, ...]:
        return with_pose(("video", "audio", "reference"), bool(self.mouth_weight))

    # --- the lagged snapshot and its self-play latents ------------------------------------------------------------
    def setup(self, policy: Policy) -> None:
        policy.refresh_reference()  # the lagged reference starts as the starting policy
        self.self_play_latents.clear()

    def on_step_end(self, policy: Policy, step: int) -> None:
        if step % self.refresh_every == 0:
            policy.refresh_reference()
            self.self_play_latents.clear()
            self.refreshes += 1

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            # Gathered from every rank: on CPU.
            "self_play_latents": [[*key, value.cpu()] for key, value in self.self_play_latents.items()],
            "refreshes": self.refreshes,
            "self_play_sampled": self.self_play_sampled,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        # Moved to the device when used.
        self.self_play_latents = {tuple(entry[:-1]): entry[-1] for entry in state["self_play_latents"]}
        self.refreshes = state["refreshes"]
        self.self_play_sampled = state["self_play_sampled"]

    @staticmethod
    def self_play_key(batch: dict, i: int) -> tuple:
        """A clip's identity and the conditions it was cut with (a random crop has other audio)."""
        audio = batch["audio"][i]
        return batch["id"][i], int(batch["video"].shape[1]), round(float(audio.abs().sum()), 3)

    @torch.no_grad()
    def self_play(self, policy: Policy, batch: dict, rows: list[int]) -> dict[int, torch.Tensor]:
        """Latents of the lagged snapshot's samples for the clips ``rows`` (kept ones where there are)."""
        missing = [i for i in rows if self.self_play_key(batch, i) not in self.self_play_latents]
        discard = False
        if policy.forwards_are_collective() and policy.any_rank(bool(missing)) and not missing:
            # Another rank samples, and under FSDP each of its forwards needs this rank: sample a clip alongside.
            missing, discard = [0], True
        if missing:
            part = {k: v[missing] for k, v in batch.items() if torch.is_tensor(v) and v.ndim and k != "rejected"}
            with policy.reference() as lagged:
                x = sample_clip_latents(lagged, policy.denoiser, policy.process, part, batch["video"].shape[1],
                                        self.generator, self.self_play_steps)
            if not discard:
                for j, i in enumerate(missing):
                    self.self_play_latents[self.self_play_key(batch, i)] = x[j]
                self.self_play_sampled += len(missing)
        return {i: self.self_play_latents[self.self_play_key(batch, i)] for i in rows}

    def negatives(self, policy: Policy, batch: dict) -> tuple[torch.Tensor, list[str]]:
        """One negative per clip, its source drawn from the mix: latents ``[B, C, F, h, w]`` and the sources."""
        video = batch["video"]
        draws = torch.multinomial(self.weights, video.shape[0], replacement=True, generator=self.generator)
        kinds = [self.kinds[d] for d in draws.tolist()]
        perturbed = video.clone()
        for i, kind in enumerate(kinds):
            if kind != "self_play":
                perturbed[i : i + 1] = perturb(video[i : i + 1].cpu(), kind, self.generator).to(video.device)
        latents = policy.denoiser.encode_video(perturbed)
        played = self.self_play(policy, batch, [i for i, k in enumerate(kinds) if k == "self_play"])
        for i, value in played.items():
            latents[i] = value.to(latents.device, latents.dtype)
        return latents, kinds

    # --- the loss -------------------------------------------------------------------------------------------------
    def loss(self, policy: Policy, batch: dict):
        denoiser, process = policy.denoiser, policy.process
        positive = denoiser.encode_video(batch["video"])
        size = positive.shape[0]
        cond = denoiser.condition(batch)
        weights = mouth_weights(denoiser, batch, self.mouth_weight)
        if self.beta == 0:  # the preference term is off: plain (weighted) flow matching, no negatives needed
            eps = torch.randn_like(positive)
            t = process.sample_t(size, device=positive.device)
            pred = denoiser(process.noise(positive, eps, t), process.model_time(t), cond)
            fm = per_sample_mse(pred, process.target(positive, eps, t), weights).mean()
            return self.fm_weight * fm, {"loss": (self.fm_weight * fm).detach(), "fm_loss": fm.detach()}

        negative, kinds = self.negatives(policy, batch)
        e_pos, e_neg, r_pos, r_neg = paired_errors(policy, positive, negative, cond, weights)
        per_clip, margin = dpo_loss(e_pos, e_neg, r_pos, r_neg, self.beta, self.loss_type)
        at_zero, _ = dpo_loss(*(torch.zeros(1, device=e_pos.device),) * 4, self.beta, self.loss_type)
        preference = per_clip.mean() - at_zero.squeeze()
        fm = e_pos.mean()
        loss = preference + self.fm_weight * fm
        logged = {
            "loss": loss.detach(),
            "fm_loss": fm.detach(),
            "preference_loss": preference.detach(),
            "implicit_accuracy": (margin > 0).float().mean(),
            "reward_margin": margin.detach().mean(),
            "error_negative": e_neg.detach().mean(),
            "self_play_fraction": torch.tensor(sum(k == "self_play" for k in kinds) / len(kinds)),
        }
        return loss, logged
