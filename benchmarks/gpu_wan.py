"""Training steps of a Wan2.1-T2V-1.3B-sized denoiser on a GPU (SFT, DPO, GRPO): step time, MFU, peak memory.

    python benchmarks/gpu_wan.py --device cuda                                   # writes benchmarks/results_gpu.md/.json
    python benchmarks/gpu_wan.py --device cuda --variants lora grpo              # some of the variants
    python benchmarks/gpu_wan.py --tiny --device cpu --steps 2 --out /tmp/gpu.md  # smoke test of the harness

A random-init ``WanTransformer3DModel`` with the published Wan2.1-T2V-1.3B transformer config, inside our
``WanDenoiser`` (mel audio cross-attention in every block, optionally the skeleton) and ``AlignmentModule`` with
``FlowMatching``, the frozen base in bf16 and the training under bf16 autocast, as the real recipes run
(``torch_dtype: bfloat16``, ``precision: bf16-mixed``). ``AlignmentModule`` keeps every trained tensor in float32
(adapters, new modules, or all weights under full fine-tuning), so AdamW's state is float32 too. 33 frames at
480×832 are 9×60×104 latents of 16 channels through Wan's VAE; the batches hold such latents (as a latent cache
does) and the reference image in pixels, and the codec is a cheap stand-in with Wan's ratios (``LatentCodec``: not a
VAE), so no VAE is built. Variants (``--variants``):

- ``lora``: SFT, LoRA (rank ``--rank``) with gradient checkpointing: the headline;
- ``full``: SFT, full fine-tuning with gradient checkpointing (float32 trained weights and AdamW state);
- ``dpo``: a ``DiffusionDPO`` step on a batch of cached winner/loser latents (LoRA, checkpointing);
- ``grpo``: a ``GRPO`` step (``--group-size`` rollouts of ``--sampler-steps`` steps per condition, micro-batches of
  ``--micro-batch``, rewarded by ``TextureReward``), run by a real ``lightning.Trainer`` as users run it (LoRA,
  checkpointing);
- ``lora-no-checkpointing``: SFT, LoRA without gradient checkpointing (may run out of memory: reported as OOM).

An SFT or DPO step is ``algorithm.loss`` under bf16 autocast, backward, gradient clipping where the algorithm sets it,
``AdamW.step`` and ``zero_grad``, timed between device synchronisations after warm-up; a GRPO step is one
``Trainer`` batch (rollouts, decode, reward, the update), timed by a callback. Peak memory is
``torch.cuda.max_memory_allocated()`` over the timed steps (reset after warm-up). MFU is model FLOPs per step (see
:func:`model_flops`) over the median step time times the device's peak dense bf16 FLOP/s (``--peak-tflops``).
The report is rewritten after each variant, so a run cut short (a time limit) keeps the variants it finished.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prefalign.algorithms import GRPO, SFT, DiffusionDPO  # noqa: E402
from prefalign.algorithms.base import Algorithm  # noqa: E402
from prefalign.denoisers import Codec, MelAudioEncoder, WanDenoiser  # noqa: E402
from prefalign.lora import LoraSettings  # noqa: E402
from prefalign.module import AlignmentModule  # noqa: E402
from prefalign.processes import FlowMatching  # noqa: E402
from prefalign.rewards import TextureReward  # noqa: E402

#: The transformer of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` (its ``transformer/config.json``). Its 16 input channels
#: make ``WanDenoiser`` widen the patch embedding to 32 (latents + reference), as loading that checkpoint does.
WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
#: ``--tiny``: 2 blocks of 2 heads, 32 wide; with the default tiny clip (33 frames at 64×64) the latents are 9×8×8.
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2,
            rope_max_seq_len=32)  # fmt: skip

#: Peak dense (no sparsity) bf16 tensor-core TFLOP/s by device name, from NVIDIA's data sheets; the first pattern the
#: name contains wins (the PCIe and NVL H100s before the plain "H100", which torch reports for the SXM part).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))
#: The recipes' GRPO and DPO settings that change the work of a step (recipes/algorithms/grpo.yaml, dpo.yaml).
GRPO_KL_BETA, DPO_BETA, MAX_GRAD_NORM = 0.01, 5000.0, 1.0


class LatentCodec(Codec):
    """Wan's VAE ratios and channels with a cheap deterministic stand-in for the VAE. **Not a VAE.**

    ``encode`` averages the pixels each latent pixel covers (the first frame alone, then ``temporal_ratio`` frames ×
    ``spatial_ratio``² pixels, as Wan's causal VAE groups them), maps [0, 1] to [-1, 1] and tiles the 3 colours over
    the 16 channels; ``decode`` averages each colour's copies and repeats every latent pixel over the pixels it
    covers (so ``decode(encode(video))`` is the block average). It lets the algorithms' own code paths run
    (``denoiser.condition`` encodes the reference image, GRPO decodes its rollouts for the reward) with the shapes a
    real VAE gives, at the cost of a pooling instead of a VAE's compute and memory, which this benchmark leaves out.
    """

    latent_channels = 16
    temporal_ratio = 4
    spatial_ratio = 8

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = video.shape
        f, (hh, ww) = self.num_latent_frames(t), self.latent_size(h, w)
        r, s = self.temporal_ratio, self.spatial_ratio
        grouped = torch.cat([video[:, :1].expand(b, r - 1, c, h, w), video], dim=1)  # the first frame fills its group
        pooled = grouped.reshape(b, f, r, c, hh, s, ww, s).mean(dim=(2, 5, 7))  # [B, F, 3, h, w]
        colours = torch.arange(self.latent_channels, device=video.device) % c
        return (2 * pooled - 1).permute(0, 2, 1, 3, 4)[:, colours]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        r, s = self.temporal_ratio, self.spatial_ratio
        rgb = torch.stack([latents[:, k::3].mean(dim=1) for k in range(3)], dim=1)  # [B, 3, F, h, w]
        rgb = ((rgb + 1) / 2).clamp(0, 1).repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)
        rgb = torch.cat([rgb[:, :, :1], rgb[:, :, 1:].repeat_interleave(r, dim=2)], dim=2)
        return rgb.permute(0, 2, 1, 3, 4)  # [B, T, 3, H, W]


@dataclass
class Variant:
    key: str
    """The ``--variants`` name."""
    name: str
    """The report's row."""
    algorithm: str
    """``sft``, ``dpo`` or ``grpo``."""
    lora: bool
    checkpointing: bool
    torch_dtype: str = "bfloat16"
    """The dtype the weights are built in; ``AlignmentModule`` then makes every trained tensor float32."""


def variants(rank: int) -> list[Variant]:
    lora = f"LoRA r{rank}"
    # The one that may run out of memory last: an OOM can leave the allocator fragmented for what follows.
    return [
        Variant("lora", f"{lora}, checkpointing", "sft", lora=True, checkpointing=True),
        Variant("full", "full FT (fp32 weights), checkpointing", "sft", lora=False, checkpointing=True),
        Variant("dpo", f"DPO step, {lora}, checkpointing", "dpo", lora=True, checkpointing=True),
        Variant("grpo", f"GRPO step (Trainer), {lora}, checkpointing", "grpo", lora=True, checkpointing=True),
        Variant("lora-no-checkpointing", f"{lora}, no checkpointing", "sft", lora=True, checkpointing=False),
    ]


VARIANT_KEYS = [v.key for v in variants(64)]


# --- model FLOPs and MFU --------------------------------------------------------------------------------------------
def model_flops(linear: int, trained: int, sequence: int, width: int, blocks: int, samples: int = 1,
                backward: bool = True) -> float:
    """Model FLOPs of one forward (and backward) of ``samples`` sequences of ``sequence`` tokens through a DiT.

    With ``T = samples·sequence`` tokens, ``N = linear`` and ``S = sequence``:

    - forward: ``2·N·T`` for the linear layers (a multiply and an add per weight and token) plus ``4·S²·d·L`` per
      sequence for self-attention (``Q·Kᵀ`` and ``softmax·V``, ``2·S²·d`` each, in each of the ``L`` blocks);
    - backward: ``2·N·T`` for the activation gradients of every linear layer, ``2·N_trained·T`` for the weight
      gradients of the trained ones, and ``8·S²·d·L`` per sequence for self-attention (twice its forward).

    So a LoRA step (``N_trained ≈ 0``) is about ``4·N·T``, full fine-tuning ``6·N·T``, plus ``12·S²·d·L`` per
    sequence. These are *model* FLOPs: what gradient checkpointing recomputes is not counted (that would be hardware
    FLOPs), nor are norms, activations, embeddings or other elementwise work.

    Args:
        linear (int): ``N``, parameters of the linear layers every token goes through (frozen and trained).
        trained (int): ``N_trained``, those of them that are trained (their weight gradients are computed).
        sequence (int): ``S``, tokens of one sequence (the video tokens of one sample).
        width (int): ``d``, the model width (heads × head dim).
        blocks (int): ``L``, transformer blocks (self-attentions).
        samples (int): sequences in the batch.
        backward (bool): count the backward too (False: a no-grad forward, e.g. a rollout or the reference).

    Returns:
        float: FLOPs.
    """
    tokens = samples * sequence
    attention = samples * sequence**2 * width * blocks
    forward = 2 * linear * tokens + 4 * attention
    if not backward:
        return float(forward)
    return float(forward + 2 * linear * tokens + 2 * trained * tokens + 8 * attention)


def peak_tflops(device_name: str) -> Optional[float]:
    """The device's peak dense bf16 TFLOP/s from its name (see ``PEAK_BF16_TFLOPS``); None where unknown."""
    for pattern, value in PEAK_BF16_TFLOPS:
        if pattern.lower() in device_name.lower():
            return value
    return None


def token_linears(module: AlignmentModule, batch: dict) -> dict[str, tuple[nn.Linear, int]]:
    """The denoiser's linear layers that every video token goes through, with how many times a forward runs each over
    them: found by hooks on one no-grad forward of the batch's first sample (a layer counts where its input has one
    row per video token). In Wan: every block's self-attention, the query and output projections of the text and audio
    cross-attentions, the feed-forward and the output projection, and LoRA's adapters on them; not the keys and values
    of the cross-attentions (text and audio tokens), the timestep and text embedders, nor the patch embedding (a
    convolution of 0.2 M parameters)."""
    denoiser = module.denoiser
    one = {k: v[:1] for k, v in batch.items() if torch.is_tensor(v)}
    x0 = one["latents"]
    p_t, p_h, p_w = denoiser.backbone.config.patch_size
    sequence = (x0.shape[2] // p_t) * (x0.shape[3] // p_h) * (x0.shape[4] // p_w)
    names = {m: n for n, m in denoiser.named_modules() if isinstance(m, nn.Linear)}
    calls = {}

    def count(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if args[0].numel() // layer.in_features == sequence:
            calls[layer] = calls.get(layer, 0) + 1

    handles = [m.register_forward_hook(count) for m in names]
    try:
        with torch.no_grad(), torch.autocast(x0.device.type, dtype=torch.bfloat16):
            t = module.process.model_time(torch.full((1,), 0.5, device=x0.device))
            denoiser(x0, t, denoiser.condition(one))
    finally:
        for handle in handles:
            handle.remove()
    return {names[m]: (m, n) for m, n in calls.items()}


def linear_counts(linears: dict[str, tuple[nn.Linear, int]]) -> dict[str, int]:
    """``N`` (every per-token linear parameter, once per pass), ``N_trained`` and the LoRA adapters' share of ``N``."""
    counts = {"linear_parameters": 0, "trained_linear_parameters": 0, "adapter_linear_parameters": 0}
    for name, (layer, passes) in linears.items():
        for param in layer.parameters():
            counts["linear_parameters"] += passes * param.numel()
            counts["trained_linear_parameters"] += passes * param.numel() * param.requires_grad
            counts["adapter_linear_parameters"] += passes * param.numel() * ("lora_" in name)
    return counts


def step_flops(record: dict, variant: Variant, args: argparse.Namespace) -> float:
    """Model FLOPs of one step of ``variant`` (see :func:`model_flops`). DPO: the policy's forward and backward on
    winners and losers, the reference's forward on both (LoRA: the base, adapters off). GRPO: ``--sampler-steps``
    rollout forwards of every rollout, then for each trained sampler step a forward and backward of every rollout
    and the reference's forward for the KL."""
    n, n_trained, adapters = (record[k] for k in ("linear_parameters", "trained_linear_parameters",
                                                  "adapter_linear_parameters"))  # fmt: skip
    shape = dict(sequence=record["sequence"], width=record["width"], blocks=record["blocks"])
    b = args.batch_size
    if variant.algorithm == "sft":
        return model_flops(n, n_trained, samples=b, **shape)
    if variant.algorithm == "dpo":
        return model_flops(n, n_trained, samples=2 * b, **shape) + model_flops(
            n - adapters, 0, samples=2 * b, backward=False, **shape)  # fmt: skip
    rollouts = b * args.group_size
    units = statistics.median(record["trained_units"])
    update = model_flops(n, n_trained, samples=rollouts, **shape)
    if GRPO_KL_BETA > 0:
        update += model_flops(n - adapters, 0, samples=rollouts, backward=False, **shape)
    return args.sampler_steps * model_flops(n, n_trained, samples=rollouts, backward=False, **shape) + units * update


# --- building -------------------------------------------------------------------------------------------------------
def algorithm_for(args: argparse.Namespace, variant: Variant) -> Algorithm:
    """The algorithm with the recipes' settings that change a step's work (recipes/algorithms/)."""
    if variant.algorithm == "sft":
        return SFT()
    if variant.algorithm == "dpo":
        return DiffusionDPO(beta=DPO_BETA, max_grad_norm=MAX_GRAD_NORM)
    return GRPO(TextureReward(), group_size=args.group_size, num_steps=args.sampler_steps, micro_batch=args.micro_batch,
                kl_beta=GRPO_KL_BETA, max_grad_norm=MAX_GRAD_NORM)  # fmt: skip


def build(args: argparse.Namespace, variant: Variant, device: torch.device) -> AlignmentModule:
    """The module as ``prefalign fit`` would build it from a recipe with these settings (random weights)."""
    config = TINY if args.tiny else WAN_1_3B
    torch.manual_seed(0)
    with device:  # create and randomly initialise the parameters on the device, not on the CPU first
        denoiser = WanDenoiser(
            codec=LatentCodec(),
            audio_encoder=MelAudioEncoder(),
            config=config,
            torch_dtype=variant.torch_dtype,
            gradient_checkpointing=variant.checkpointing,
            audio_heads=config["num_attention_heads"],
            pose_keypoints=args.pose_keypoints,
        )
        lora = LoraSettings(rank=args.rank, alpha=args.rank) if variant.lora else None
        module = AlignmentModule(
            denoiser,
            FlowMatching(timestep_sampling="logit_normal", shift=3.0),
            algorithm_for(args, variant),
            lora=lora,
            optimizer=partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.0),
        )
    return module.to(device).train()


def make_batch(args: argparse.Namespace, denoiser: WanDenoiser, pairs: bool) -> dict:
    """One batch on the CPU as a latent cache gives it: latents (and the rejected clips' latents for DPO), the
    reference image in pixels, the audio, the frame count, ids; the pose where ``--pose-keypoints`` is set."""
    generator = torch.Generator().manual_seed(0)
    b = args.batch_size
    c, f, h, w = denoiser.latent_shape(args.frames, args.height, args.width)
    samples = round(args.frames * denoiser.audio_encoder.sample_rate / denoiser.fps)
    batch = {
        "id": [f"clip{i}" for i in range(b)],
        "latents": torch.randn(b, c, f, h, w, generator=generator),
        "reference": torch.rand(b, 3, args.height, args.width, generator=generator),
        "audio": 0.1 * torch.randn(b, samples, generator=generator),
        "num_frames": torch.full((b,), args.frames),
    }
    if pairs:
        batch["rejected_latents"] = torch.randn(b, c, f, h, w, generator=generator)
    if args.pose_keypoints is not None:
        batch["pose"] = torch.rand(b, args.frames, args.pose_keypoints, 2, generator=generator)
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# --- steps ----------------------------------------------------------------------------------------------------------
def loss_step(module: AlignmentModule, optimizer: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    """``algorithm.loss`` under bf16 autocast as Lightning's ``bf16-mixed`` runs the training step, then backward,
    gradient clipping by norm where the algorithm sets it (as Lightning does), the optimizer step and ``zero_grad``."""
    with torch.autocast(module.device.type, dtype=torch.bfloat16):
        loss, _ = module.algorithm.loss(module.policy, batch)
    loss.backward()
    if module.algorithm.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), module.algorithm.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loss_steps(args: argparse.Namespace, module: AlignmentModule, batch: dict, device: torch.device,
                   record: dict) -> tuple[list[float], torch.optim.Optimizer]:
    """Warm-up and timed steps of an algorithm with a loss (SFT, DPO); the step times."""
    batch = to_device(batch, device)
    optimizer = module.configure_optimizers()
    losses = []
    for i in range(args.warmup):
        record["phase"] = f"warm-up step {i + 1}"
        losses.append(loss_step(module, optimizer, batch))
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.steps):
        record["phase"] = f"timed step {i + 1}"
        synchronize(device)
        start = time.perf_counter()
        losses.append(loss_step(module, optimizer, batch))
        synchronize(device)
        times.append(time.perf_counter() - start)
    record["losses"] = [float(loss) for loss in losses]
    return times, optimizer


class StepTimer(L.Callback):
    """Times every training batch between device synchronisations, resets the peak-memory count when the timed
    batches begin, and keeps what each step logged."""

    def __init__(self, warmup: int, device: torch.device, record: dict):
        self.warmup = warmup
        self.device = device
        self.record = record
        self.times: list[float] = []
        self.start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        timed = batch_idx >= self.warmup
        self.record["phase"] = f"timed step {batch_idx - self.warmup + 1}" if timed else f"warm-up step {batch_idx + 1}"
        synchronize(self.device)
        if batch_idx == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        synchronize(self.device)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)
        metrics = trainer.callback_metrics
        for key, name in (("train/policy_loss", "losses"), ("train/reward", "rewards"),
                          ("train/trained_steps", "trained_units")):  # fmt: skip
            if key in metrics:
                self.record.setdefault(name, []).append(float(metrics[key]))


def run_trainer(args: argparse.Namespace, module: AlignmentModule, batch: dict, device: torch.device,
                record: dict) -> tuple[list[float], torch.optim.Optimizer]:
    """Warm-up and timed steps of GRPO run by a ``lightning.Trainer`` (manual optimization, ``bf16-mixed``) on a
    DataLoader that gives the batch's conditions every step; the step times."""
    conditions = [{"id": batch["id"][i], "num_frames": args.frames,
                   **{k: batch[k][i] for k in ("reference", "audio", "pose") if k in batch}}
                  for i in range(args.batch_size)]  # fmt: skip
    loader = DataLoader(conditions * (args.warmup + args.steps), batch_size=args.batch_size)
    timer = StepTimer(args.warmup, device, record)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|`validation_step`|Tensor Cores).*")
        lightning_log = logging.getLogger("lightning.pytorch")
        level = lightning_log.level
        lightning_log.setLevel(logging.WARNING)  # the accelerator and precision notices
        try:
            trainer = L.Trainer(
                accelerator="gpu" if device.type == "cuda" else "cpu",
                devices=[device.index or 0] if device.type == "cuda" else 1,
                max_steps=args.warmup + args.steps,
                max_epochs=1,
                precision="bf16-mixed",
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                callbacks=[timer],
                default_root_dir=folder,
            )
            trainer.fit(module, train_dataloaders=loader)
        finally:
            lightning_log.setLevel(level)
    if len(timer.times) != args.steps:
        raise RuntimeError(f"the Trainer ran {len(timer.times)} timed GRPO steps, not {args.steps}")
    return timer.times, trainer.optimizers[0]


# --- one variant ----------------------------------------------------------------------------------------------------
def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(args: argparse.Namespace, variant: Variant, device: torch.device, record: dict) -> None:
    """Build, warm up and time one variant into ``record``. Raises ``torch.OutOfMemoryError`` where it does not fit;
    ``record["phase"]`` then says how far it got."""
    module = build(args, variant, device)
    denoiser = module.denoiser
    batch = make_batch(args, denoiser, pairs=variant.algorithm == "dpo")
    trainable = module.trainable_parameters()
    adapters = sum(p.numel() for n, p in denoiser.named_parameters() if p.requires_grad and "lora_" in n)
    base = sum(p.numel() for n, p in denoiser.backbone.named_parameters() if "lora_" not in n)
    outside = [m for name, m in denoiser.new_modules().items() if not name.startswith("backbone.")]
    added = sum(p.numel() for m in outside for p in m.parameters())  # audio attention, motion
    by_dtype: dict[str, int] = {}
    for p in module.parameters():
        key = str(p.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + p.numel()
    config = denoiser.backbone.config
    p_t, p_h, p_w = config.patch_size
    _, _, f, h, w = batch["latents"].shape
    sequence = (f // p_t) * (h // p_h) * (w // p_w)
    samples = {"sft": 1, "dpo": 2, "grpo": args.group_size}[variant.algorithm] * args.batch_size
    record.update(
        parameters=sum(p.numel() for p in module.parameters()),
        trainable=sum(p.numel() for p in trainable),
        trainable_adapters=adapters,
        backbone_parameters=base,
        new_module_parameters=added,
        parameter_dtypes=by_dtype,
        trainable_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in trainable}),
        sequence=sequence,
        width=config.num_attention_heads * config.attention_head_dim,
        blocks=len(denoiser.backbone.blocks),
        samples=samples,
        tokens=samples * sequence,
        latent_shape=list(batch["latents"].shape),
        weights_bytes=tensor_bytes(module.parameters()),
    )
    record["phase"] = "FLOP count"
    record.update(linear_counts(token_linears(module, to_device(batch, device))))
    if variant.algorithm == "grpo":
        record.update(group_size=args.group_size, sampler_steps=args.sampler_steps, micro_batch=args.micro_batch)
        times, optimizer = run_trainer(args, module, batch, device, record)
    else:
        times, optimizer = run_loss_steps(args, module, batch, device, record)
    record["phase"] = "done"
    if device.type == "cuda":
        record["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    record.update(
        status="ok",
        optimizer_state_bytes=tensor_bytes(state),
        step_seconds=times,
        median_seconds=statistics.median(times),
        quartiles_seconds=quartiles(times),
    )
    record["model_flops"] = step_flops(record, variant, args)
    peak = args.peak_tflops
    record["mfu"] = record["model_flops"] / (record["median_seconds"] * peak * 1e12) if peak else None
    if not all(math.isfinite(v) for v in record.get("losses", [])):
        raise FloatingPointError(f"{variant.name}: non-finite loss {record['losses']}")


def measure_or_oom(args: argparse.Namespace, variant: Variant, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        left_over = torch.cuda.memory_allocated(device)
    record = {"variant": variant.name, "key": variant.key, "algorithm": variant.algorithm, "lora": variant.lora,
              "checkpointing": variant.checkpointing, "torch_dtype": variant.torch_dtype, "phase": "build"}  # fmt: skip
    try:
        measure(args, variant, device, record)
    except torch.OutOfMemoryError as error:
        record.update(status="OOM", error=str(error).splitlines()[0])
        if device.type == "cuda":
            record["peak_bytes"] = torch.cuda.max_memory_allocated(device)  # the peak reached before it failed
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        record["allocated_before_bytes"] = left_over  # what earlier variants left (should be ~0)
    return record


def quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


# --- report -------------------------------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    import diffusers
    import peft

    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "lightning": L.__version__,
        "platform": platform.platform(),
        "revision": git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["device_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def size(n: Optional[int]) -> str:
    if n is None:
        return "—"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def count(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def flop_count(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def table(records: list[dict]) -> list[str]:
    lines = [
        "| variant | status | median step (ms) | IQR (ms) | peak memory | weights | AdamW state | trainable parameters "
        "| tokens / step | tokens / s | model FLOPs / step | MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["status"] == "ok":
            q = r["quartiles_seconds"]
            timing = [f"{1e3 * r['median_seconds']:.1f}", f"{1e3 * q[0]:.1f}–{1e3 * q[1]:.1f}"]
            throughput = f"{r['tokens'] / r['median_seconds']:.0f}"
            state = size(r["optimizer_state_bytes"])
            flops = flop_count(r["model_flops"])
            mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        else:
            timing, throughput, state, flops, mfu = [f"— ({r['phase']})", "—"], "—", "—", "—", "—"
        trainable = "—"
        if "trainable" in r:
            trainable = f"{count(r['trainable'])} ({100 * r['trainable'] / r['parameters']:.2f} %)"
        lines.append(
            f"| {r['variant']} | {r['status']} | {' | '.join(timing)} | {size(r.get('peak_bytes'))} "
            f"| {size(r.get('weights_bytes'))} | {state} | {trainable} | {r.get('tokens', '—')} | {throughput} "
            f"| {flops} | {mfu} |"
        )
    return lines


def variant_note(args: argparse.Namespace, r: dict) -> str:
    dtypes = ", ".join(f"{count(n)} {dtype}" for dtype, n in sorted(r["parameter_dtypes"].items()))
    note = (
        f"- {r['variant']}: {count(r['parameters'])} parameters ({dtypes}): the backbone's "
        f"{count(r['backbone_parameters'])}, {count(r['new_module_parameters'])} in the audio attention"
        + (" and motion modulation" if args.pose_keypoints else "")
        + (f", {count(r['trainable_adapters'])} in LoRA adapters" if r["lora"] else "")
        + f"; trains {count(r['trainable'])} in {', '.join(r['trainable_dtypes'])}"
    )
    if "linear_parameters" in r:
        note += (f"; N = {count(r['linear_parameters'])} per-token linear parameters, "
                 f"N_trained = {count(r['trained_linear_parameters'])}")  # fmt: skip
    if r["algorithm"] == "grpo" and r.get("trained_units"):
        note += (f"; {r['samples']} rollouts of {r['sampler_steps']} steps in micro-batches of {r['micro_batch']}, "
                 f"{statistics.median(r['trained_units']):.0f} sampler steps trained")  # fmt: skip
    return note + (f"; {r['error']}" if "error" in r else "")


def report(args: argparse.Namespace, info: dict, records: list[dict]) -> str:
    model = "tiny Wan DiT (2 blocks, 2 heads, 32 wide)" if args.tiny else "Wan2.1-T2V-1.3B transformer config"
    shape = next((r["latent_shape"] for r in records if "latent_shape" in r), None)
    peak = f"{args.peak_tflops:g} TFLOP/s ({args.peak_source})" if args.peak_tflops else f"unknown ({args.peak_source})"
    lines = [
        "# Wan-1.3B-sized training steps on a GPU: SFT, DPO, GRPO",
        "",
        f"Written by `python benchmarks/gpu_wan.py {' '.join(args.argv)}` on {info['date']}.",
        "",
        f"- device: **{info['device_name']}** (`{info['device']}`"
        + (f", {size(info['device_memory_bytes'])}" if "device_memory_bytes" in info else "")
        + f"); torch {info['torch']} (CUDA {info['cuda']}), diffusers {info['diffusers']}, peft {info['peft']}, "
        f"lightning {info['lightning']}, Python {info['python']}; revision {info['revision']}",
        f"- model: {model}, random init, in `WanDenoiser` with `MelAudioEncoder` and per-block audio "
        f"cross-attention ({'pose: ' + str(args.pose_keypoints) + ' keypoints' if args.pose_keypoints else 'no pose'});"
        " `FlowMatching` (logit-normal σ), AdamW (lr 1e-4); base weights bf16, trained tensors float32; the codec "
        "is a pooling stand-in with Wan's ratios (not a VAE)",
        f"- batch: {args.batch_size} × {args.frames} frames at {args.height}×{args.width}"
        + (f" = latents {'×'.join(map(str, shape))}" if shape else "")
        + "; bf16 autocast (as `bf16-mixed`)",
        f"- {args.warmup} warm-up and {args.steps} timed steps per variant, timed between device synchronisations. "
        "SFT / DPO: `algorithm.loss` + backward + gradient clipping (DPO: norm 1) + AdamW step + zero_grad; DPO "
        f"(β {DPO_BETA:g}) runs the policy on winner and loser latents and the reference (adapters off) on both. "
        f"GRPO: one batch of a `lightning.Trainer` (bf16-mixed, manual optimization): {args.group_size} rollouts per "
        f"condition of {args.sampler_steps} Flow-GRPO SDE steps in micro-batches of {args.micro_batch}, decoded and "
        f"scored by `TextureReward`, then the PPO-clip update with KL (β {GRPO_KL_BETA:g}) on half the sampler steps",
        f"- MFU: model FLOPs per step / (median step time × peak dense bf16 {peak})",
        "",
        *table(records),
        "",
        "Peak memory is `torch.cuda.max_memory_allocated()` over the timed steps (reset after warm-up): weights, "
        "AdamW state, gradients, activations and temporaries; not the caching allocator's reserve. For an OOM row it "
        "is the peak reached before the failure, and the step column names the phase that failed. On a CPU it is "
        "not measured (—). Tokens / step: video tokens of the samples a step trains on (DPO: winners and losers; "
        "GRPO: its rollouts).",
        "",
        "MFU is on **model FLOPs**, not hardware FLOPs: with T tokens and S per sequence, linear layers 2·N·T "
        "forward and 2·N·T + 2·N_trained·T backward (N: the linear layers every video token goes through, found by "
        "hooks on one forward, adapters included), self-attention 4·S²·d·L forward and 8·S²·d·L backward per "
        "sequence; DPO adds the reference's forward, GRPO counts its rollout forwards, the trained steps' forward "
        "and backward and the KL reference's forwards. Gradient checkpointing's recomputation (about one more "
        "forward) is not counted, so a checkpointed step's hardware utilisation is higher than its MFU.",
        "",
    ]
    for r in records:
        if "trainable_dtypes" in r:
            lines.append(variant_note(args, r))
        elif "error" in r:
            lines.append(f"- {r['variant']}: {r['error']}")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-block, 32-wide model on a 9×8×8 latent: a smoke test")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--variants", nargs="+", choices=VARIANT_KEYS, default=VARIANT_KEYS,
                        help="which variants to run (default: all)")  # fmt: skip
    parser.add_argument("--frames", type=int, help="video frames (4·n+1; default 33)")
    parser.add_argument("--height", type=int, help="pixels (multiple of 16; default 480, --tiny 64)")
    parser.add_argument("--width", type=int, help="pixels (multiple of 16; default 832, --tiny 64)")
    parser.add_argument("--batch-size", type=int, default=1, help="clips (SFT), pairs (DPO) or conditions (GRPO)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (alpha = rank)")
    parser.add_argument("--pose-keypoints", type=int, help="add the skeleton (motion modulation) with K keypoints")
    parser.add_argument("--group-size", type=int, default=4, help="GRPO rollouts per condition")
    parser.add_argument("--sampler-steps", type=int, default=4, help="GRPO sampler steps per rollout")
    parser.add_argument("--micro-batch", type=int, default=2, help="GRPO rollouts per forward")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak dense bf16 TFLOP/s for MFU (default: from the device name: H100 SXM "
                             "and H200 989, H100 PCIe 756, A100 312; otherwise MFU is not given)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results_gpu.md",
                        help="markdown report; the same numbers with every step time go to the .json beside it")  # fmt: skip
    args = parser.parse_args(argv)
    args.frames = args.frames or 33
    args.height = args.height or (64 if args.tiny else 480)
    args.width = args.width or (64 if args.tiny else 832)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.group_size < 2 or args.sampler_steps < 1 or args.micro_batch < 1:
        parser.error("--group-size must be >= 2, --sampler-steps and --micro-batch >= 1")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error("--peak-tflops must be > 0")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {args.device}: this machine has no CUDA device (use --tiny --device cpu to smoke test)"
        )
    info = machine(device)
    if args.peak_tflops is not None:
        args.peak_source = "--peak-tflops"
    else:
        args.peak_tflops = peak_tflops(info["device_name"]) if device.type == "cuda" else None
        args.peak_source = f"from the name {info['device_name']!r}" if device.type == "cuda" else "a CPU"
    info["peak_tflops"] = args.peak_tflops
    records = []
    for variant in variants(args.rank):
        if variant.key in args.variants:
            print(f"{variant.name} ...", flush=True)
            records.append(measure_or_oom(args, variant, device))
            text, result = write(args, info, records)  # after each variant: a run cut short keeps what it measured
    print(text)
    return result


def write(args: argparse.Namespace, info: dict, records: list[dict]) -> tuple[str, dict]:
    """The markdown report at ``--out`` and the same numbers, with every step time, in the .json beside it."""
    text = report(args, info, records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    result = {"machine": info, "arguments": vars(args) | {"out": str(args.out)}, "variants": records}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return text, result


if __name__ == "__main__":
    main()
