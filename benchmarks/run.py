"""The performance harness: each figure times its variants side by side in one run and reports ratios.

    python benchmarks/run.py [--out benchmarks/results.md] [--repeats N] [--quick] [--device cuda] [--bf16]

writes a markdown table (``--out``) and the same numbers as JSON next to it (``results.json``). A figure is a
function of the run's :class:`Bench` that returns a :class:`Figure`; add one by writing it and listing it in
``FIGURES``. benchmarks/README.md says what each figure means and how memory is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a checkout without installing prefalign

MIB = 2**20
PROBE_TAG = "MEMORY-PROBE "  # marks the result line a memory-probe subprocess prints

# The demo model and data, as in recipes/demo/sft.yaml (`recipe_drift` reports where the recipe has moved on).
DEMO_WAN = dict(
    patch_size=[1, 1, 1],
    num_attention_heads=6,
    attention_head_dim=64,
    text_dim=32,
    freq_dim=64,
    ffn_dim=768,
    num_layers=2,
    rope_max_seq_len=64,
)
DEMO_CODEC = dict(temporal_ratio=4, spatial_ratio=4)
DEMO_MEL = dict(sample_rate=16000, n_mels=40, hops_per_frame=4)
DEMO_AUDIO = dict(audio_window=5, audio_heads=4)
DEMO_PROCESS = dict(timestep_sampling="uniform")
DEMO_ADAMW = dict(lr=0.001, weight_decay=0.0)
DEMO_DATA = dict(batch_size=4, num_frames=17)
DEMO_SFT = dict(mouth_weight=10.0)
DEMO_RECIPE = ROOT / "recipes" / "demo" / "sft.yaml"


# --- the harness ------------------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One variant's training step, built and ready: ``run()`` does forward, backward and the optimizer step."""

    run: Callable[[], torch.Tensor]
    optimizer: torch.optim.Optimizer
    parameters: list[torch.nn.Parameter]


@dataclass
class Figure:
    """One table of the results: a row per variant, ratios taken against ``baseline``."""

    name: str
    title: str
    description: str
    baseline: str
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Bench:
    """What every figure shares: the device, the precision, how many steps to time, and the comparison itself.

    Args:
        device (torch.device): where the variants run.
        bf16 (bool): run forward and loss under bf16 autocast (weights and optimizer stay float32).
        warmup (int): untimed steps of every variant before timing.
        repeats (int): timed steps of every variant.
        memory_steps (int): steps a memory probe runs in its fresh process.
        probe (tuple[str, str] | None): set in a memory-probe subprocess: the (figure, variant) to measure.
    """

    device: torch.device
    bf16: bool = False
    warmup: int = 3
    repeats: int = 20
    memory_steps: int = 3
    probe: Optional[tuple[str, str]] = None

    @property
    def probing(self) -> bool:
        return self.probe is not None

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def memory_method(self) -> str:
        if self.device.type == "cuda":
            return (
                f"`torch.cuda.max_memory_allocated` over {self.memory_steps} steps in a fresh process per variant, "
                "minus what was allocated once model, batch and optimizer were built: gradients, AdamW state, "
                "activations and temporaries (tensors only; the caching allocator's reserve is not counted)"
            )
        return (
            f"peak RSS (Linux `VmHWM`, reset once model, batch and optimizer were built) over {self.memory_steps} "
            "steps in a fresh process per variant, minus the RSS at that reset: gradients, AdamW state, activations, "
            "temporaries and whatever the allocator keeps (CPU memory is not tracked per tensor)"
        )

    def compare(self, figure: Figure, builders: dict[str, Callable[[], Step]]) -> Figure:
        """Time the variants interleaved and measure each one's peak memory in a fresh process; fill ``figure.rows``.

        In a memory-probe subprocess, measure only the probed variant (if it belongs to this figure) instead.
        """
        if figure.baseline not in builders:
            raise ValueError(f"figure {figure.name}: baseline {figure.baseline!r} is not one of {list(builders)}")
        if self.probing:
            if self.probe[0] == figure.name:
                print(PROBE_TAG + json.dumps(self._measure_memory(builders[self.probe[1]])), flush=True)
            return figure
        times = self._time_interleaved({name: build() for name, build in builders.items()})
        gc.collect()
        base = times[figure.baseline]
        for name in builders:
            ratios = [a / b for a, b in zip(times[name], base, strict=True)]
            memory = self._memory_in_subprocess(figure.name, name)
            figure.rows.append(
                {
                    "variant": name,
                    "median_ms": 1e3 * statistics.median(times[name]),
                    "q1_ms": 1e3 * quantile(times[name], 0.25),
                    "q3_ms": 1e3 * quantile(times[name], 0.75),
                    "ratio": statistics.median(ratios),
                    "ratio_q1": quantile(ratios, 0.25),
                    "ratio_q3": quantile(ratios, 0.75),
                    **memory,
                    "times_ms": [round(1e3 * t, 3) for t in times[name]],
                }
            )
        return figure

    def _time_interleaved(self, steps: dict[str, Step]) -> dict[str, list[float]]:
        # Round r runs every variant once, in reverse order on odd rounds (A B, B A, ...), so that load changes and
        # whatever one variant leaves in caches for the next weigh on all of them alike.
        names = list(steps)
        for round_ in range(self.warmup + self.repeats):
            if round_ == self.warmup:
                times: dict[str, list[float]] = {name: [] for name in names}
                gc.collect()
            for name in names if round_ % 2 == 0 else reversed(names):
                self.sync()
                start = time.perf_counter()
                steps[name].run()
                self.sync()
                if round_ >= self.warmup:
                    times[name].append(time.perf_counter() - start)
        return times

    def _memory_in_subprocess(self, figure: str, variant: str) -> dict:
        command = [sys.executable, str(Path(__file__).resolve()), "--device", str(self.device)]
        command += ["--threads", str(torch.get_num_threads())]
        command += ["--probe", figure, variant, "--memory-steps", str(self.memory_steps)]
        command += ["--bf16"] if self.bf16 else []
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith(PROBE_TAG)]
        if done.returncode != 0 or not lines:
            raise RuntimeError(
                f"the memory probe of {figure} / {variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
            )
        return json.loads(lines[-1][len(PROBE_TAG) :])

    def _measure_memory(self, build: Callable[[], Step]) -> dict:
        step = build()
        gc.collect()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        else:
            exact = reset_peak_rss()
            before = current_rss()
        for _ in range(self.memory_steps):
            step.run()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else peak_rss()
        state = sum(
            t.numel() * t.element_size()
            for s in step.optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        result = {
            "peak_growth_mib": (peak - before) / MIB,
            "weights_mib": sum(p.numel() * p.element_size() for p in step.parameters) / MIB,
            "optimizer_state_mib": state / MIB,
            "parameters": sum(p.numel() for p in step.parameters),
            "trainable": sum(p.numel() for p in step.parameters if p.requires_grad),
        }
        if self.device.type != "cuda" and not exact:
            # Without a resettable peak, the process's lifetime peak (building included) stands in: an upper bound.
            result["peak_is_upper_bound"] = True
        return result


def quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(100 * q) - 1]


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux; elsewhere the lifetime peak stands in)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def reset_peak_rss() -> bool:
    """Make the peak RSS restart from the current RSS (Linux >= 4.0); False where that is not possible.

    ``getrusage``'s max RSS cannot be reset, and on Linux a child started by a larger process inherits the parent's
    peak across exec, which would hide the child's own peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size of this process (since the last ``reset_peak_rss``), in bytes."""
    with contextlib.suppress(OSError), open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


# --- figure 1: the SFT training step -------------------------------------------------------------------------------
def demo_batch(device: torch.device) -> dict:
    """A demo-sized batch of TalkingShapes clips made in memory, decoded and collated as the data module does."""
    from prefalign.data.datamodule import collate_clips
    from prefalign.data.synthetic import TalkingShapesConfig, clip_seed, make_clip, to_uint8

    def pixels(array) -> torch.Tensor:  # what decoding the written mp4 / png gives: 8-bit frames scaled to [0, 1]
        return torch.from_numpy(to_uint8(array)).float() / 255

    cfg = TalkingShapesConfig(num_frames=DEMO_DATA["num_frames"])
    items = []
    for index in range(DEMO_DATA["batch_size"]):
        clip = make_clip(clip_seed(0, index), cfg)
        items.append(
            {
                "id": f"clip_{index:05d}",
                "video": pixels(clip.video).permute(0, 3, 1, 2),
                "audio": torch.from_numpy(clip.audio),
                "reference": pixels(clip.reference).permute(2, 0, 1),
                "pose": torch.from_numpy(clip.pose),
            }
        )
    batch = collate_clips(items)
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def bare_wan(codec) -> torch.nn.Module:
    """The demo ``WanTransformer3DModel``, seeded as the prefalign variants seed theirs (the same initial weights)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    channels = codec.latent_channels
    return WanTransformer3DModel(**DEMO_WAN, in_channels=2 * channels, out_channels=channels)


def prefalign_denoiser(audio: bool):
    from prefalign.denoisers import MelAudioEncoder, PixelCodec, WanDenoiser

    torch.manual_seed(0)
    encoder = MelAudioEncoder(**DEMO_MEL) if audio else None
    return WanDenoiser(codec=PixelCodec(**DEMO_CODEC), audio_encoder=encoder, config=dict(DEMO_WAN), **DEMO_AUDIO)


def bare_inputs(batch: dict) -> dict:
    """What the bare step feeds diffusers: the noisy latents with the reference latent concatenated on channels, the
    model timestep, an all-zero one-token text context, and the velocity target."""
    from prefalign.denoisers import PixelCodec
    from prefalign.processes import FlowMatching

    codec, process = PixelCodec(**DEMO_CODEC), FlowMatching(**DEMO_PROCESS)
    x0 = codec.encode(batch["video"])
    reference = codec.encode(batch["reference"][:, None]).expand(-1, -1, x0.shape[2], -1, -1)
    generator = torch.Generator(device=x0.device).manual_seed(0)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = process.sample_t(x0.shape[0], device=x0.device, generator=generator)
    return {
        "hidden_states": torch.cat([process.noise(x0, eps, t), reference], dim=1),
        "timestep": process.model_time(t).to(x0.device),
        "encoder_hidden_states": torch.zeros(x0.shape[0], 1, DEMO_WAN["text_dim"], device=x0.device),
        "target": process.target(x0, eps, t),
    }


def bare_diffusers_step(bench: Bench, batch: dict) -> Step:
    """diffusers alone: forward, MSE to the velocity, backward, AdamW; inputs made once, outside the step."""
    from prefalign.denoisers import PixelCodec

    model = bare_wan(PixelCodec(**DEMO_CODEC)).to(bench.device).train()
    inputs = bare_inputs(batch)
    target = inputs.pop("target")
    optimizer = torch.optim.AdamW(model.parameters(), **DEMO_ADAMW)

    def run() -> torch.Tensor:
        with bench.autocast():
            pred = model(**inputs, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return Step(run, optimizer, list(model.parameters()))


def prefalign_sft_step(bench: Bench, batch: dict, audio: bool = True) -> Step:
    """Our step: ``AlignmentModule.training_step`` (SFT on flow matching: encode, condition, noise, predict, loss),
    backward, and the optimizer ``configure_optimizers`` builds; what Lightning's automatic optimisation runs."""
    from prefalign.algorithms import SFT
    from prefalign.module import AlignmentModule
    from prefalign.processes import FlowMatching

    module = AlignmentModule(
        prefalign_denoiser(audio),
        FlowMatching(**DEMO_PROCESS),
        SFT(**DEMO_SFT),
        optimizer=functools.partial(torch.optim.AdamW, **DEMO_ADAMW),
    )
    module.to(bench.device).train()
    optimizer = module.configure_optimizers()

    def run() -> torch.Tensor:
        with bench.autocast():
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return Step(run, optimizer, list(module.parameters()))


def same_backbone_check(bench: Bench, batch: dict) -> float:
    """Largest difference between the prefalign denoiser's and bare diffusers' predictions on the same input, before
    training (its audio attention starts at zero output): shows that both variants run the same network."""
    ours = prefalign_denoiser(audio=True).to(bench.device)
    inputs = bare_inputs(batch)
    bare = bare_wan(ours.codec).to(bench.device)
    with torch.no_grad():
        expected = bare(**{k: v for k, v in inputs.items() if k != "target"}, return_dict=False)[0]
        channels = ours.codec.latent_channels
        noisy, timestep = inputs["hidden_states"][:, :channels], inputs["timestep"]
        got = ours(noisy, timestep, ours.condition(batch))
    return (got - expected).abs().max().item()


def sft_step(bench: Bench) -> Figure:
    """Figure 1: what one SFT training step of our module costs next to the bare diffusers model it wraps."""
    figure = Figure(
        name="sft_step",
        title="SFT training step: prefalign vs. bare diffusers",
        description=(
            f"One training step at the demo size (recipes/demo/sft.yaml: Wan DiT {DEMO_WAN['num_layers']} blocks × "
            f"{DEMO_WAN['num_attention_heads'] * DEMO_WAN['attention_head_dim']} wide, PixelCodec, batch of "
            f"{DEMO_DATA['batch_size']} TalkingShapes clips of {DEMO_DATA['num_frames']} frames at 32×32, AdamW). "
            "**prefalign SFT**: `AlignmentModule.training_step` with `SFT` + `FlowMatching` + `WanDenoiser` "
            "(MelAudioEncoder, per-block audio cross-attention), backward, AdamW step; it encodes the clips, builds "
            "the conditions and draws noise and timesteps every step. **prefalign SFT, no audio**: the same without "
            "the audio encoder and attention, which separates the framework's overhead from the conditioning's cost. "
            "**bare diffusers**: the same `WanTransformer3DModel` (same initial weights) on the same latents, "
            "reference channels concatenated, same timestep, zero text context, MSE to the same velocity target, "
            "AdamW step; its inputs are made once, outside the step."
        ),
        baseline="bare diffusers",
    )
    batch = demo_batch(bench.device)
    if not bench.probing:
        difference = same_backbone_check(bench, batch)
        if difference > 1e-4:
            raise RuntimeError(f"sft_step: the two variants do not run the same network (max difference {difference})")
        figure.notes.append(
            f"Same network: before training both predict the same output (max difference {difference:.1e})."
        )
        figure.notes += recipe_drift()
    with warnings.catch_warnings():
        # training_step logs through self.log, which only warns without a Trainer: logging is not what is timed.
        warnings.filterwarnings("ignore", message=".*self.log.*")
        return bench.compare(
            figure,
            {
                "bare diffusers": lambda: bare_diffusers_step(bench, batch),
                "prefalign SFT, no audio": lambda: prefalign_sft_step(bench, batch, audio=False),
                "prefalign SFT": lambda: prefalign_sft_step(bench, batch, audio=True),
            },
        )


def recipe_drift() -> list[str]:
    """Notes naming where recipes/demo/sft.yaml no longer matches the sizes copied above."""
    try:
        import yaml

        recipe = yaml.safe_load(DEMO_RECIPE.read_text())
        denoiser = recipe["model"]["denoiser"]["init_args"]
        found = {
            "Wan config": denoiser["config"],
            "codec": denoiser["codec"]["init_args"],
            "audio encoder": denoiser["audio_encoder"]["init_args"],
            "audio attention": {key: denoiser[key] for key in DEMO_AUDIO},
            "process": recipe["model"]["process"]["init_args"],
            "AdamW": recipe["model"]["optimizer"]["init_args"],
            "data": {key: recipe["data"][key] for key in DEMO_DATA},
        }
    except (OSError, KeyError, TypeError) as error:
        return [f"Could not compare with {DEMO_RECIPE.relative_to(ROOT)} ({error!r})."]
    copied = {
        "Wan config": DEMO_WAN,
        "codec": DEMO_CODEC,
        "audio encoder": DEMO_MEL,
        "audio attention": DEMO_AUDIO,
        "process": DEMO_PROCESS,
        "AdamW": DEMO_ADAMW,
        "data": DEMO_DATA,
    }
    return [
        f"**{DEMO_RECIPE.relative_to(ROOT)} has moved on**: its {part} is {found[part]}, "
        f"this benchmark used {copied[part]}."
        for part in copied
        if found[part] != copied[part]
    ]


FIGURES: list[Callable[[Bench], Figure]] = [sft_step]


# --- reporting ---------------------------------------------------------------------------------------------------
def machine(bench: Bench) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    import diffusers

    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(bench.device),
        "precision": "bf16 autocast" if bench.bf16 else "float32",
        "revision": git_revision(),
    }
    if bench.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(bench.device)
        info["cuda"] = torch.version.cuda
    return info


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT, check=False)
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "no commit"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def to_markdown(report: dict) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        "# prefalign benchmarks",
        "",
        f"`{s['command']}` — {report['date']}, revision {m['revision']}.",
        "",
        f"- Machine: {m['cpu']}; {m['cpus_usable']} of {m['cpu_count']} CPUs usable, "
        f"torch threads: {m['torch_threads']}; {m['platform']}.",
        f"- Software: Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}.",
        f"- Device: {m['device']}"
        + (f" ({m['gpu']}, CUDA {m['cuda']})" if "gpu" in m else "")
        + f", {m['precision']}.",
        f"- Load average (1 min) at start {s['load_start']:.2f}, at end {s['load_end']:.2f}; "
        f"{s['warmup']} warm-up and {s['repeats']} timed steps per variant, interleaved.",
    ]
    for fig in report["figures"]:
        lines += ["", f"## {fig['title']}", "", fig["description"], ""]
        lines += [
            f"| variant | median step (ms) | IQR (ms) | ratio to {fig['baseline']} (IQR) "
            "| peak memory growth (MiB) | weights + AdamW state (MiB) | parameters (trainable) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in fig["rows"]:
            bound = " (upper bound)" if row.get("peak_is_upper_bound") else ""
            lines.append(
                f"| {row['variant']} | {row['median_ms']:.1f} | {row['q1_ms']:.1f}–{row['q3_ms']:.1f} "
                f"| {row['ratio']:.2f} ({row['ratio_q1']:.2f}–{row['ratio_q3']:.2f}) "
                f"| {row['peak_growth_mib']:.1f}{bound} | {row['weights_mib'] + row['optimizer_state_mib']:.1f} "
                f"| {row['parameters']:,} ({row['trainable']:,}) |"
            )
        lines += [
            "",
            "- Ratio: the median over rounds of the variant's step time over the baseline's in the same round.",
            f"- Peak memory growth: {fig['memory_method']}.",
        ]
        lines += [f"- {note}" for note in fig["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results.md",
        help="markdown results; the JSON goes next to it with a .json suffix",
    )
    parser.add_argument("--repeats", type=int, help="timed steps per variant (default 20, 5 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant first (default 3, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="few repeats: checks that the harness runs, not a figure")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and loss")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice); on a shared "
        "machine use the free cores, as busy cores make OpenMP threads wait on each other",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="FIGURE", help=f"figures to run, of {[f.__name__ for f in FIGURES]}"
    )
    parser.add_argument("--memory-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe", nargs=2, metavar=("FIGURE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("repeats", "warmup", "memory_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "warmup" else 0):
            parser.error(f"--{name.replace('_', '-')} must be at least {1 if name != 'warmup' else 0}, got {value}")
    known = {f.__name__ for f in FIGURES}
    if args.only and not set(args.only) <= known:
        parser.error(f"unknown figure(s) {sorted(set(args.only) - known)}; known: {sorted(known)}")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available to this torch ({torch.__version__})")
    if args.bf16 and device.type == "cpu":
        print("note: bf16 autocast on CPU is usually slower than float32", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    bench = Bench(
        device=device,
        bf16=args.bf16,
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3),
        repeats=args.repeats or (5 if quick else 20),
        memory_steps=args.memory_steps or (2 if quick else 3),
        probe=tuple(args.probe) if args.probe else None,
    )
    figures = [f for f in FIGURES if not args.only or f.__name__ in args.only]
    if bench.probing:
        for figure in figures:
            figure(bench)
        return {}

    load_start = os.getloadavg()[0]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device.type == "cpu" and load_start + torch.get_num_threads() > cpus + 0.5:
        print(
            f"warning: load average {load_start:.1f} with {torch.get_num_threads()} threads on {cpus} CPUs: other work "
            "is running, so absolute times will be inflated (ratios suffer less); consider --threads",
            file=sys.stderr,
        )
    results = []
    for figure in figures:
        print(f"{figure.__name__} ...", file=sys.stderr, flush=True)
        results.append(figure(bench))
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(bench),
        "settings": {
            "command": " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
            "warmup": bench.warmup,
            "repeats": bench.repeats,
            "memory_steps": bench.memory_steps,
            "quick": quick,
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
        },
        "figures": [{**asdict(f), "memory_method": bench.memory_method} for f in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(report)
    args.out.write_text(markdown)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
