"""The sampler: from the prior to latents under any model and process, and long videos chunk by chunk.

One loop serves every caller: validation, ``prefalign test`` and ``predict`` (``generate``), GRPO's rollouts (which
record every state and the log-prob of every step), ReFree's self-play and DPO's online pairs (deterministic steps
of a reference or of the policy), and the benchmarks. What differs between them is an argument of
:func:`sample_latents`, not a copy of the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Container, Optional, Union

import torch

from prefalign.denoisers.base import PortraitDenoiser, join_chunks
from prefalign.processes.base import Process, randn

#: ``model(x_t, model_time, cond) -> prediction``: the denoiser, a reference policy, or any function of that form.
Model = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclass
class SamplingSettings:
    """How videos are sampled for validation and ``predict``."""

    num_steps: int = 20
    """Sampler steps from noise to data."""
    guidance_scale: float = 1.0
    """Classifier-free guidance on speech (1 = off; >1 needs a model trained with ``cond_dropout``)."""
    stochastic: bool = False
    """Use the process's stochastic step (SDE / DDIM with eta) instead of the deterministic one."""
    seed: int = 0
    """Seed of the initial noise, so that validation figures are comparable across epochs."""
    chunk_frames: Optional[int] = None
    """Generate videos longer than this many frames in chunks (FlowPortrait's autoregressive generation), each
    starting from the end of the one before; the model's training length is the natural choice. None: one pass."""
    motion_frames: int = 5
    """Frames of the previous chunk that start the next one (the codec's r·n+1, e.g. 5 with Wan's VAE)."""

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"model.sampling.num_steps must be an integer >= 1, got {self.num_steps!r}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"model.sampling.guidance_scale must be a finite number (1 = off), got "
                             f"{self.guidance_scale!r}")
        if self.chunk_frames is not None and self.chunk_frames < 1:
            raise ValueError(f"model.sampling.chunk_frames must be an integer >= 1, or null (one pass), got "
                             f"{self.chunk_frames!r}")
        if self.chunk_frames is not None and not 0 < self.motion_frames < self.chunk_frames:
            raise ValueError(f"model.sampling.motion_frames must be between 0 and chunk_frames ({self.chunk_frames}), "
                             f"exclusive, got {self.motion_frames!r}")


@dataclass
class Trajectory:
    """What one run of :func:`sample_latents` leaves.

    Attributes:
        latents (Tensor): the final sample ``[N, C, F, h, w]``.
        states (Tensor | None): with ``record``, ``[S + 1, N, C, F, h, w]``: the model's input at every step, then
            the final sample.
        log_probs (Tensor | None): with ``record``, ``[S, N]``: the log-prob of each step's sample under the
            sampling model, over the generated latent frames (NaN where the step is deterministic: no density).
        means (dict): with ``keep_means``, step -> ``[N, C, F, h, w]``: the mean of each stochastic step.
    """

    latents: torch.Tensor
    states: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    means: dict = field(default_factory=dict)


def micro_batches(n: int, size: Optional[int]) -> list[slice]:
    """``n`` rows in slices of ``size`` (all at once for None)."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def slice_conditions(cond: dict, part: slice, n: int) -> dict:
    """The rows ``part`` of every per-sample tensor of the conditions ``cond`` of ``n`` samples."""
    return {k: (v[part] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v) for k, v in cond.items()}


def guided_prediction(model: Model, x: torch.Tensor, model_t: torch.Tensor, cond: dict, guidance_scale: float = 1.0,
                      drop: Optional[Callable[[dict, torch.Tensor], dict]] = None) -> torch.Tensor:
    """The model's prediction, with classifier-free guidance on speech when ``guidance_scale`` is not 1:
    ``p_u + s·(p_c − p_u)``, the unconditional branch ``p_u`` run on ``drop(cond, keep=False)``."""
    pred = model(x, model_t, cond)
    if guidance_scale == 1.0:
        return pred
    if drop is None:
        raise ValueError("classifier-free guidance needs the denoiser's drop_conditions (drop=...)")
    uncond = model(x, model_t, drop(cond, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)))
    return uncond + guidance_scale * (pred - uncond)


def step_distribution(model: Model, process: Process, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                      cond: dict, guidance_scale: float = 1.0, drop=None,
                      stochastic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the step from ``x`` at ``t`` to ``t_next`` under ``model``: the process's stochastic step,
    or its deterministic one (std 0)."""
    pred = guided_prediction(model, x, process.model_time(t.expand(x.shape[0])), cond, guidance_scale, drop)
    if not stochastic:
        out = process.step(pred, x, t, t_next)
    else:
        out = process.step(pred, x, t, t_next, stochastic=True, noise=torch.zeros_like(x, dtype=torch.float32))
    return out.mean, out.std


@torch.no_grad()
def sample_latents(model: Model, process: Process, cond: dict, x: torch.Tensor, num_steps: int,
                   generator: Optional[torch.Generator] = None, *, guidance_scale: float = 1.0, drop=None,
                   stochastic: Union[bool, Container[int]] = False, known: Optional[torch.Tensor] = None,
                   region: Optional[torch.Tensor] = None, micro_batch: Optional[int] = None, record: bool = False,
                   keep_means: bool = False) -> Trajectory:
    """Run the process's sampler from ``x`` (the prior's draw) over ``num_steps`` steps of its schedule.

    Args:
        model (Model): ``model(x_t, model_time, cond)``.
        process (Process): the schedule, the steps and their log-probs.
        cond (dict): the model's conditions for the ``N`` samples.
        x (Tensor): ``[N, C, F, h, w]`` the starting noise; the states keep its dtype.
        num_steps (int): sampler steps.
        generator (torch.Generator | None): the noise of the stochastic steps and of ``known``'s noising.
        guidance_scale (float): classifier-free guidance (1 = off), with ``drop`` the condition dropper.
        stochastic (bool | Container[int]): every step stochastic (True), none (False), or the steps whose index
            is in the container (MixGRPO's window). A stochastic step of std 0 (the last DDIM step) is taken
            deterministically and draws no noise.
        known (Tensor | None): latents that fix the first latent frames (a chunk's given frames): at every step
            they are set to ``known`` noised to the step's level, and exactly at the end.
        region (Tensor | None): ``[N, 1, F, h, w]`` 0/1: the stochastic steps draw noise only there (GRPO's mouth
            exploration), and the log-probs average over it.
        micro_batch (int | None): samples per forward (None: all at once).
        record (bool): keep every state and each step's log-prob (GRPO's rollouts).
        keep_means (bool): with ``record``, also keep each stochastic step's mean (GRPO-Guard's RatioNorm).
    """
    schedule = process.timesteps(num_steps, device=x.device)
    n = x.shape[0]
    m = 0 if known is None else known.shape[2]
    free_region = None if region is None else region[:, :, m:]
    if known is not None:
        known_noise = process.prior(known.shape, device=x.device, generator=generator).to(known.dtype)
    states, log_probs, means = [], [], {}
    for j, (t, t_next) in enumerate(zip(schedule[:-1], schedule[1:])):
        if known is not None:
            x = torch.cat([process.noise(known, known_noise, t.expand(n)).to(x.dtype), x[:, :, m:]], dim=2)
        if record:
            states.append(x)
        noisy = stochastic if isinstance(stochastic, bool) else j in stochastic
        parts = [step_distribution(model, process, x[part], t, t_next, slice_conditions(cond, part, n),
                                   guidance_scale, drop, stochastic=noisy) for part in micro_batches(n, micro_batch)]
        mean, std = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if noisy and bool((std > 0).all()):
            noise = randn(mean.shape, generator=generator, device=x.device, dtype=mean.dtype)
            sample = mean + std * (noise if region is None else noise * region)
            if record:
                log_probs.append(process.log_prob(sample[:, :, m:], mean[:, :, m:], std, free_region))
            if keep_means:
                means[j] = mean
        else:
            sample = mean
            if record:
                log_probs.append(torch.full((n,), float("nan"), device=x.device))
        x = sample.to(x.dtype)
    if known is not None:
        x = torch.cat([known.to(x.dtype), x[:, :, m:]], dim=2)
    if not record:
        return Trajectory(x)
    states.append(x)
    return Trajectory(x, torch.stack(states), torch.stack(log_probs), means)


def run_chunks(denoiser: PortraitDenoiser, batch: dict, num_frames: int, chunk_frames: Optional[int],
               motion_frames: int, one_pass: Callable) -> tuple[list, torch.Tensor]:
    """Sample a clip in one pass, or chunk by chunk when it is longer than ``chunk_frames`` (FlowPortrait's
    autoregressive generation): chunks of ``chunk_frames`` frames, each starting with the last ``motion_frames``
    frames of the one before.

    Those frames are given, not generated: ``one_pass(inputs, frames, known)`` receives the previous chunk's
    encoded tail as ``known`` (see :func:`sample_latents`), so the rest of the chunk is denoised in their context.
    Audio and pose are cut to each chunk's frames (the tail of the last chunk is padded, then cropped away). Works
    with every process and backbone, with no training of its own.

    Args:
        one_pass (Callable): ``one_pass(inputs, frames, known) -> (result, video)``, video ``[B, frames, 3, H, W]``.

    Returns:
        tuple[list, Tensor]: every pass's result, and the joined video ``[B, num_frames, 3, H, W]``.
    """
    if chunk_frames is None or num_frames <= chunk_frames:
        result, video = one_pass(batch, num_frames, None)
        return [result], video
    size, overlap = chunk_frames, motion_frames
    codec = denoiser.codec
    codec.num_latent_frames(size)  # both must be lengths the codec encodes (Wan's 4n + 1)
    codec.num_latent_frames(overlap)
    if not 0 < overlap < size:
        raise ValueError(f"motion_frames ({overlap}) must be between 0 and chunk_frames ({size})")
    results, videos, start = [], [], 0
    while True:
        part = denoiser.chunk_inputs(batch, start, size)
        known = codec.encode(videos[-1][:, -overlap:]) if videos else None
        result, video = one_pass(part, size, known)
        results.append(result)
        videos.append(video)
        if start + size >= num_frames:
            return results, join_chunks(videos, overlap, num_frames)
        start += size - overlap


@torch.no_grad()
def sample_clip_latents(model: Model, denoiser: PortraitDenoiser, process: Process, batch: dict, num_frames: int,
                        generator: Optional[torch.Generator], num_steps: int, *, guidance_scale: float = 1.0,
                        stochastic: bool = False, known: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Latents ``[B, C, F, h, w]`` of ``num_frames`` frames for the batch's conditions (reference image, audio,
    pose): a draw of the prior (from ``generator``, in the reference's dtype), then :func:`sample_latents`."""
    reference = batch["reference"]
    cond = denoiser.condition(batch, num_frames=num_frames)
    shape = (reference.shape[0], *denoiser.latent_shape(num_frames, *reference.shape[-2:]))
    x = process.prior(shape, device=reference.device, generator=generator).to(reference.dtype)
    return sample_latents(model, process, cond, x, num_steps, generator, guidance_scale=guidance_scale,
                          drop=denoiser.drop_conditions, stochastic=stochastic, known=known).latents


@torch.no_grad()
def generate(model: Model, denoiser: PortraitDenoiser, process: Process, batch: dict, num_frames: int,
             settings: SamplingSettings) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sample videos ``[B, T, 3, H, W]`` in [0, 1] for the batch's conditions under ``settings``, chunk by chunk
    where ``settings.chunk_frames`` says so (see :func:`run_chunks`); the noise is seeded by ``settings.seed``.

    Returns:
        tuple[list[Tensor], Tensor]: the chunks ``[B, chunk_frames, 3, H, W]`` (one, the whole video, without
        chunking; chunk k+1's first ``motion_frames`` frames are chunk k's last ones) and the joined video.
    """
    generator = torch.Generator(device=batch["reference"].device).manual_seed(settings.seed)

    def one_pass(inputs: dict, frames: int, known: Optional[torch.Tensor]):
        latents = sample_clip_latents(model, denoiser, process, inputs, frames, generator, settings.num_steps,
                                      guidance_scale=settings.guidance_scale, stochastic=settings.stochastic,
                                      known=known)
        video = denoiser.decode(latents)
        return video, video

    return run_chunks(denoiser, batch, num_frames, settings.chunk_frames, settings.motion_frames, one_pass)
