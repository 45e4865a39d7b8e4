"""One SFT training step of a Wan2.1-T2V-1.3B-sized denoiser on a GPU: step time, peak memory, tokens, parameters.

    python benchmarks/gpu_wan.py --device cuda                                   # writes benchmarks/results_gpu.md/.json
    python benchmarks/gpu_wan.py --tiny --device cpu --steps 2 --out /tmp/gpu.md  # smoke test of the harness

A random-init ``WanTransformer3DModel`` with the published Wan2.1-T2V-1.3B transformer config, inside our
``WanDenoiser`` (mel audio cross-attention in every block, optionally the skeleton) and ``AlignmentModule`` with
``FlowMatching`` and ``SFT``, weights in bf16 and the forward under bf16 autocast, as the real recipes run
(``torch_dtype: bfloat16``, ``precision: bf16-mixed``). The latents are fed directly: 33 frames at 480×832 are 9×60×104
latents of 16 channels through Wan's VAE, so no VAE is built (the codec is a stand-in with Wan's ratios). Variants:

- LoRA (rank ``--rank``) with gradient checkpointing: the headline;
- LoRA without gradient checkpointing (may run out of memory: reported as OOM);
- full fine-tuning with gradient checkpointing, bf16 weights (AdamW's state then is bf16 too);
- full fine-tuning with gradient checkpointing, float32 weights (float32 AdamW state, bf16 autocast compute).

A step is forward, loss, backward, ``AdamW.step`` and ``zero_grad``, timed between device synchronisations after
warm-up; peak memory is ``torch.cuda.max_memory_allocated()`` over the timed steps (reset after warm-up).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prefalign.algorithms import SFT  # noqa: E402
from prefalign.algorithms.base import per_sample_mse  # noqa: E402
from prefalign.denoisers import Codec, MelAudioEncoder, WanDenoiser  # noqa: E402
from prefalign.module import AlignmentModule, LoraSettings  # noqa: E402
from prefalign.processes import FlowMatching  # noqa: E402

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


class LatentCodec(Codec):
    """Wan's VAE ratios and channels without the VAE: the benchmark feeds latents, so nothing is encoded or decoded."""

    latent_channels = 16
    temporal_ratio = 4
    spatial_ratio = 8

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("LatentCodec has no VAE: the GPU benchmark feeds latents directly")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("LatentCodec has no VAE: the GPU benchmark feeds latents directly")


@dataclass
class Variant:
    name: str
    lora: bool
    checkpointing: bool
    torch_dtype: str = "bfloat16"


def variants(rank: int) -> list[Variant]:
    return [
        Variant(f"LoRA r{rank}, checkpointing", lora=True, checkpointing=True),
        Variant(f"LoRA r{rank}, no checkpointing", lora=True, checkpointing=False),
        Variant("full FT, checkpointing", lora=False, checkpointing=True),
        Variant("full FT, fp32 weights, checkpointing", lora=False, checkpointing=True, torch_dtype="float32"),
    ]


@dataclass
class Inputs:
    """One batch as the training step sees it after encoding: latents, the reference latent, audio, pose."""

    x0: torch.Tensor
    reference: torch.Tensor
    audio: torch.Tensor
    pose: Optional[torch.Tensor]
    num_frames: int


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
            SFT(),
            lora=lora,
            optimizer=partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.0),
        )
    return module.to(device).train()


def make_inputs(args: argparse.Namespace, denoiser: WanDenoiser, device: torch.device) -> Inputs:
    generator = torch.Generator().manual_seed(0)
    b = args.batch_size
    c, f, h, w = denoiser.latent_shape(args.frames, args.height, args.width)
    samples = round(args.frames * denoiser.audio_encoder.sample_rate / denoiser.fps)
    pose = None
    if args.pose_keypoints is not None:
        pose = torch.rand(b, args.frames, args.pose_keypoints, 2, generator=generator).to(device)
    return Inputs(
        x0=torch.randn(b, c, f, h, w, generator=generator).to(device),
        reference=torch.randn(b, c, 1, h, w, generator=generator).to(device),
        audio=(0.1 * torch.randn(b, samples, generator=generator)).to(device),
        pose=pose,
        num_frames=args.frames,
    )


def train_step(module: AlignmentModule, optimizer: torch.optim.Optimizer, inputs: Inputs) -> torch.Tensor:
    """``SFT.loss`` on latents (what ``denoiser.condition`` gives, with the reference already encoded) under bf16
    autocast as Lightning's ``bf16-mixed`` runs it, then backward, the optimizer step and ``zero_grad``."""
    denoiser, process = module.denoiser, module.process
    x0 = inputs.x0
    with torch.autocast(x0.device.type, dtype=torch.bfloat16):
        cond = {
            "reference": inputs.reference,
            "num_frames": inputs.num_frames,
            "audio": denoiser.audio_encoder(inputs.audio, inputs.num_frames, denoiser.fps),
        }
        if inputs.pose is not None:
            cond["pose"] = inputs.pose
        eps = torch.randn_like(x0)
        t = process.sample_t(x0.shape[0], device=x0.device)
        pred = denoiser(process.noise(x0, eps, t), process.model_time(t), cond)
        loss = per_sample_mse(pred, process.target(x0, eps, t)).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(args: argparse.Namespace, variant: Variant, device: torch.device, record: dict) -> None:
    """Build, warm up and time one variant into ``record``. Raises ``torch.OutOfMemoryError`` where it does not fit;
    ``record["phase"]`` then says how far it got."""
    module = build(args, variant, device)
    denoiser = module.denoiser
    inputs = make_inputs(args, denoiser, device)
    optimizer = module.configure_optimizers()
    trainable = module.trainable_parameters()
    adapters = sum(p.numel() for n, p in denoiser.named_parameters() if p.requires_grad and "lora_" in n)
    base = sum(p.numel() for n, p in denoiser.backbone.named_parameters() if "lora_" not in n)
    outside = [m for name, m in denoiser.new_modules().items() if not name.startswith("backbone.")]
    added = sum(p.numel() for m in outside for p in m.parameters())  # audio attention, motion
    p_t, p_h, p_w = denoiser.backbone.config.patch_size
    _, _, f, h, w = inputs.x0.shape
    record.update(
        parameters=sum(p.numel() for p in module.parameters()),
        trainable=sum(p.numel() for p in trainable),
        trainable_adapters=adapters,
        backbone_parameters=base,
        new_module_parameters=added,
        trainable_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in trainable}),
        tokens=args.batch_size * (f // p_t) * (h // p_h) * (w // p_w),
        latent_shape=list(inputs.x0.shape),
        weights_bytes=tensor_bytes(module.parameters()),
    )
    losses = []
    for i in range(args.warmup):
        record["phase"] = f"warm-up step {i + 1}"
        losses.append(train_step(module, optimizer, inputs))
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.steps):
        record["phase"] = f"timed step {i + 1}"
        synchronize(device)
        start = time.perf_counter()
        losses.append(train_step(module, optimizer, inputs))
        synchronize(device)
        times.append(time.perf_counter() - start)
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
        losses=[float(loss) for loss in losses],
    )
    if not all(torch.isfinite(torch.tensor(record["losses"]))):
        raise FloatingPointError(f"{variant.name}: non-finite loss {record['losses']}")


def measure_or_oom(args: argparse.Namespace, variant: Variant, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        left_over = torch.cuda.memory_allocated(device)
    record = {"variant": variant.name, "lora": variant.lora, "checkpointing": variant.checkpointing,
              "torch_dtype": variant.torch_dtype, "phase": "build"}  # fmt: skip
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


def count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def table(records: list[dict]) -> list[str]:
    lines = [
        "| variant | status | median step (ms) | IQR (ms) | peak memory | weights | AdamW state | trainable parameters "
        "| tokens / step | tokens / s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["status"] == "ok":
            q = r["quartiles_seconds"]
            timing = [f"{1e3 * r['median_seconds']:.1f}", f"{1e3 * q[0]:.1f}–{1e3 * q[1]:.1f}"]
            throughput = f"{r['tokens'] / r['median_seconds']:.0f}"
            state = size(r["optimizer_state_bytes"])
        else:
            timing, throughput, state = [f"— ({r['phase']})", "—"], "—", "—"
        trainable = "—"
        if "trainable" in r:
            trainable = f"{count(r['trainable'])} ({100 * r['trainable'] / r['parameters']:.2f} %)"
        lines.append(
            f"| {r['variant']} | {r['status']} | {' | '.join(timing)} | {size(r.get('peak_bytes'))} "
            f"| {size(r.get('weights_bytes'))} | {state} | {trainable} | {r.get('tokens', '—')} | {throughput} |"
        )
    return lines


def report(args: argparse.Namespace, info: dict, records: list[dict]) -> str:
    model = "tiny Wan DiT (2 blocks, 2 heads, 32 wide)" if args.tiny else "Wan2.1-T2V-1.3B transformer config"
    shape = next((r["latent_shape"] for r in records if "latent_shape" in r), None)
    lines = [
        "# Wan-1.3B-sized training step on a GPU",
        "",
        f"Written by `python benchmarks/gpu_wan.py {' '.join(args.argv)}` on {info['date']}.",
        "",
        f"- device: **{info['device_name']}** (`{info['device']}`"
        + (f", {size(info['device_memory_bytes'])}" if "device_memory_bytes" in info else "")
        + f"); torch {info['torch']} (CUDA {info['cuda']}), diffusers {info['diffusers']}, peft {info['peft']}, "
        f"Python {info['python']}; revision {info['revision']}",
        f"- model: {model}, random init, in `WanDenoiser` with `MelAudioEncoder` and per-block audio "
        f"cross-attention ({'pose: ' + str(args.pose_keypoints) + ' keypoints' if args.pose_keypoints else 'no pose'});"
        " `FlowMatching` (logit-normal σ), `SFT` loss, AdamW (lr 1e-4)",
        f"- batch: {args.batch_size} × {args.frames} frames at {args.height}×{args.width}"
        + (f" = latents {'×'.join(map(str, shape))}" if shape else "")
        + "; bf16 autocast (as `bf16-mixed`)",
        f"- {args.warmup} warm-up and {args.steps} timed steps per variant; a step is forward + loss + backward + "
        "AdamW step + zero_grad, timed between device synchronisations",
        "",
        *table(records),
        "",
        "Peak memory is `torch.cuda.max_memory_allocated()` over the timed steps (reset after warm-up): weights, "
        "AdamW state, gradients, activations and temporaries; not the caching allocator's reserve. For an OOM row it "
        "is the peak reached before the failure, and the step column names the phase that failed. On a CPU it is "
        "not measured (—).",
        "",
    ]
    for r in records:
        if "trainable_dtypes" in r:
            lines.append(
                f"- {r['variant']}: weights {r['torch_dtype']}; {count(r['parameters'])} parameters: the backbone's "
                f"{count(r['backbone_parameters'])}, {count(r['new_module_parameters'])} in the audio attention"
                + (" and motion modulation" if args.pose_keypoints else "")
                + (f", {count(r['trainable_adapters'])} in LoRA adapters" if r["lora"] else "")
                + f"; trains {count(r['trainable'])} in {', '.join(r['trainable_dtypes'])}"
                + (f"; {r['error']}" if "error" in r else "")
            )
        elif "error" in r:
            lines.append(f"- {r['variant']}: {r['error']}")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-block, 32-wide model on a 9×8×8 latent: a smoke test")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--frames", type=int, help="video frames (4·n+1; default 33)")
    parser.add_argument("--height", type=int, help="pixels (multiple of 16; default 480, --tiny 64)")
    parser.add_argument("--width", type=int, help="pixels (multiple of 16; default 832, --tiny 64)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (alpha = rank)")
    parser.add_argument("--pose-keypoints", type=int, help="add the skeleton (motion modulation) with K keypoints")
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
    records = []
    for variant in variants(args.rank):
        print(f"{variant.name} ...", flush=True)
        records.append(measure_or_oom(args, variant, device))
    text = report(args, info, records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    result = {"machine": info, "arguments": vars(args) | {"out": str(args.out)}, "variants": records}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
