"""The performance harness: each figure times its variants side by side in one run and reports ratios.

    python benchmarks/run.py [--out benchmarks/results.md] [--repeats N] [--quick] [--device cuda] [--bf16]

writes a markdown table (``--out``) and the same numbers as JSON next to it (``results.json``). A figure is a
function of the run's :class:`Bench` that returns a :class:`Figure`; add one by writing it and listing it in
``FIGURES``. benchmarks/README.md says what each figure means and how memory is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import hashlib
import inspect
import itertools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a checkout without installing prefalign

# Below the path setting; the naive DPO baseline subclasses Algorithm (other prefalign imports are deferred).
from prefalign.algorithms import Algorithm  # noqa: E402
from prefalign.algorithms.base import per_sample_mse  # noqa: E402
from prefalign.algorithms.dpo import dpo_loss  # noqa: E402

MIB = 2**20
PROBE_TAG = "MEMORY-PROBE "  # marks the result line a memory-probe subprocess prints

# The demo model and data, as in recipes/demo/sft.yaml and dpo.yaml (`recipe_drift` reports where a recipe has
# moved on).
DEMO_WAN = {
    "patch_size": [1, 1, 1],
    "num_attention_heads": 6,
    "attention_head_dim": 64,
    "text_dim": 32,
    "freq_dim": 64,
    "ffn_dim": 768,
    "num_layers": 2,
    "rope_max_seq_len": 64,
}
DEMO_CODEC = {"temporal_ratio": 4, "spatial_ratio": 4}
DEMO_MEL = {"sample_rate": 16000, "n_mels": 40, "hops_per_frame": 4}
DEMO_AUDIO = {"audio_window": 5, "audio_heads": 4}
DEMO_PROCESS = {"timestep_sampling": "uniform"}
DEMO_ADAMW = {"lr": 0.001, "weight_decay": 0.0}
DEMO_DATA = {"batch_size": 4, "num_frames": 17}
DEMO_SFT = {"mouth_weight": 10.0}
DEMO_RECIPE = ROOT / "recipes" / "demo" / "sft.yaml"
# What recipes/demo/dpo.yaml sets besides the model and data above.
DEMO_DPO = {"beta": 2000.0, "loss_type": "sigmoid", "sft_weight": 0.0}
DEMO_LORA = {"rank": 16, "train_new_modules": True}
DEMO_DPO_ADAMW = {"lr": 0.0002, "weight_decay": 0.0}
DEMO_DPO_RECIPE = ROOT / "recipes" / "demo" / "dpo.yaml"
# The backbone_step figure builds its modules from these recipes as they stand (the DiT and the UNet family).
DEMO_SVD_RECIPE = ROOT / "recipes" / "demo" / "sft_svd.yaml"
BACKBONE_LORA = {"rank": 16}
# The grpo_step and refree_step figures build their modules from these recipes as they stand, LoRA included.
DEMO_GRPO_RECIPE = ROOT / "recipes" / "demo" / "grpo.yaml"
DEMO_REFREE_RECIPE = ROOT / "recipes" / "demo" / "refree.yaml"
DEMO_TRAIN_CLIPS = 64  # clips in the demo's training data (`make demo`: prefalign synth --num_clips 64)
# The judge rows: videos scored per step, requests in flight when batched, and how long the stand-in server takes to
# answer a request (a served MLLM's latency); its answer, and the variable the judge reads its API key from.
JUDGE_VIDEOS = 16
JUDGE_CONCURRENCY = 8
JUDGE_DELAY_S = 0.05
JUDGE_ANSWER = '{"lip_sync": 4, "expressiveness": 3, "motion_quality": 5}'
JUDGE_KEY_ENV = "PREFALIGN_BENCHMARK_JUDGE_KEY"


# --- the harness ------------------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One variant's step, built and ready: ``run()`` does forward, backward and the optimizer step (or, for a
    variant that trains nothing, such as sampling or scoring, the work it times; its ``optimizer`` is None)."""

    run: Callable[[], object]
    optimizer: torch.optim.Optimizer | None
    parameters: list[torch.nn.Parameter]
    reference: list[torch.Tensor] = field(default_factory=list)
    """Tensors kept only for a reference policy (a second copy of the weights), reported apart from ``parameters``."""


@dataclass
class Figure:
    """One table of the results: a row per variant, ratios taken against ``baseline``.

    ``ideal`` gives, per variant, the ratio to the baseline that counting the work alone predicts (the note that
    says why goes in ``notes``); ``targets`` gives, per variant, the ratio to the baseline it should stay at or
    under; ``compare_also`` names further (variant, against) pairs whose step time ratio, paired by round like the
    baseline's, and peak memory growth ratio go to ``ratios``; ``columns`` names further row fields (a figure adds
    them to its rows after ``compare``) to show as columns, field -> header.
    """

    name: str
    title: str
    description: str
    baseline: str
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ideal: dict[str, float] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    compare_also: list[tuple[str, str]] = field(default_factory=list)
    ratios: list[dict] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)


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
    probe: tuple[str, str] | None = None

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
        for name in (
            figure.baseline,
            *figure.ideal,
            *figure.targets,
            *(name for pair in figure.compare_also for name in pair),
        ):
            if name not in builders:
                raise ValueError(f"figure {figure.name}: {name!r} is not one of its variants {list(builders)}")
        if self.probing:
            if self.probe[0] == figure.name:
                print(PROBE_TAG + json.dumps(self._measure_memory(builders[self.probe[1]])), flush=True)
            return figure
        times = self._time_interleaved({name: build() for name, build in builders.items()})
        gc.collect()
        for name in builders:
            memory = self._memory_in_subprocess(figure.name, name)
            figure.rows.append(
                {
                    "variant": name,
                    "median_ms": 1e3 * statistics.median(times[name]),
                    "q1_ms": 1e3 * quantile(times[name], 0.25),
                    "q3_ms": 1e3 * quantile(times[name], 0.75),
                    **paired_ratio(times[name], times[figure.baseline]),
                    **memory,
                    "times_ms": [round(1e3 * t, 3) for t in times[name]],
                }
            )
        growth = {row["variant"]: row["peak_growth_mib"] for row in figure.rows}
        for name, against in figure.compare_also:
            figure.ratios.append(
                {
                    "variant": name,
                    "against": against,
                    **paired_ratio(times[name], times[against]),
                    "memory_ratio": growth[name] / growth[against] if growth[against] > 0 else math.nan,
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
        command += ["--only", figure, "--probe", figure, variant, "--memory-steps", str(self.memory_steps)]
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
            for s in (step.optimizer.state.values() if step.optimizer is not None else ())
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        result = {
            "peak_growth_mib": (peak - before) / MIB,
            "weights_mib": sum(p.numel() * p.element_size() for p in step.parameters) / MIB,
            "optimizer_state_mib": state / MIB,
            "reference_mib": sum(t.numel() * t.element_size() for t in step.reference) / MIB,
            "parameters": sum(p.numel() for p in step.parameters),
            "trainable": sum(p.numel() for p in step.parameters if p.requires_grad),
        }
        if self.device.type != "cuda" and not exact:
            # Without a resettable peak, the process's lifetime peak (building included) stands in: an upper bound.
            result["peak_is_upper_bound"] = True
        return result


def paired_ratio(times: list[float], against: list[float]) -> dict:
    """Median and quartiles over rounds of one variant's step time over another's in the same round."""
    ratios = [a / b for a, b in zip(times, against, strict=True)]
    return {"ratio": statistics.median(ratios), "ratio_q1": quantile(ratios, 0.25), "ratio_q3": quantile(ratios, 0.75)}


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
def demo_batch(device: torch.device, pairs: bool = False) -> dict:
    """A demo-sized batch of TalkingShapes clips made in memory, decoded and collated as the data module does.

    With ``pairs``, each clip also has its ``rejected`` video, made as ``prefalign synth --rejected
    [shift,jitter,freeze]`` makes it: the same clip with its mouth track spoiled, the kinds in turn.
    """
    import numpy as np

    from prefalign.data.datamodule import collate_clips
    from prefalign.data.synthetic import (
        MOUTH_PERTURBATIONS,
        TalkingShapesConfig,
        clip_seed,
        make_clip,
        perturb_mouth,
        render,
        to_uint8,
    )

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
        if pairs:
            kind = MOUTH_PERTURBATIONS[index % len(MOUTH_PERTURBATIONS)]
            mouth = perturb_mouth(clip.mouth, kind, np.random.default_rng(clip_seed(0, index) + 1))
            items[-1]["rejected"] = pixels(render(clip.identity, clip.pose, mouth, cfg)).permute(0, 3, 1, 2)
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


def module_step(bench: Bench, module, batch: dict | Callable[[], dict]) -> Step:
    """Our step: ``AlignmentModule.training_step`` (the algorithm's loss), backward, and the optimizer
    ``configure_optimizers`` builds; what Lightning's automatic optimisation runs. ``batch`` is the batch of every
    step, or a function that gives each step its batch (loading it is then part of the step)."""
    module.to(bench.device).train()
    optimizer = module.configure_optimizers()

    def run() -> torch.Tensor:
        step_batch = batch() if callable(batch) else batch
        with bench.autocast():
            loss = module.training_step(step_batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return Step(run, optimizer, list(module.parameters()))


def prefalign_sft_step(bench: Bench, batch: dict, audio: bool = True) -> Step:
    """Our SFT step on flow matching: encode, condition, noise, predict, loss; backward; AdamW."""
    from prefalign.algorithms import SFT
    from prefalign.module import AlignmentModule
    from prefalign.processes import FlowMatching

    module = AlignmentModule(
        prefalign_denoiser(audio),
        FlowMatching(**DEMO_PROCESS),
        SFT(**DEMO_SFT),
        optimizer=functools.partial(torch.optim.AdamW, **DEMO_ADAMW),
    )
    return module_step(bench, module, batch)


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
        figure.notes += recipe_drift(
            DEMO_RECIPE,
            {
                "Wan config": DEMO_WAN,
                "codec": DEMO_CODEC,
                "audio encoder": DEMO_MEL,
                "audio attention": DEMO_AUDIO,
                "process": DEMO_PROCESS,
                "AdamW": DEMO_ADAMW,
                "data": DEMO_DATA,
            },
        )
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


def recipe_drift(recipe: Path, copied: dict[str, dict]) -> list[str]:
    """Notes naming where a demo recipe no longer matches the parts of it copied above (part name -> values)."""
    try:
        import yaml

        config = yaml.safe_load(recipe.read_text())
        model = config["model"]
        denoiser = model["denoiser"]["init_args"]
        parts = {
            "Wan config": lambda: denoiser["config"],
            "codec": lambda: denoiser["codec"]["init_args"],
            "audio encoder": lambda: denoiser["audio_encoder"]["init_args"],
            "audio attention": lambda: {key: denoiser[key] for key in DEMO_AUDIO},
            "process": lambda: model["process"]["init_args"],
            "algorithm": lambda: model["algorithm"]["init_args"],
            "LoRA": lambda: model["lora"],
            "AdamW": lambda: model["optimizer"]["init_args"],
            "data": lambda: {key: config["data"][key] for key in DEMO_DATA},
        }
        found = {part: parts[part]() for part in copied}
    except (OSError, KeyError, TypeError) as error:
        return [f"Could not compare with {recipe.relative_to(ROOT)} ({error!r})."]
    return [
        f"**{recipe.relative_to(ROOT)} has moved on**: its {part} is {found[part]}, this benchmark used {copied[part]}."
        for part in copied
        if found[part] != copied[part]
    ]


# --- figure 2: the DPO training step ---------------------------------------------------------------------------------
class NaiveDPO(Algorithm):
    """The naive baseline of the ``dpo_step`` figure, written here and used nowhere else: Diffusion-DPO as a
    first implementation writes it. Not prefalign's :class:`~prefalign.algorithms.DiffusionDPO`.

    Winner and loser go through the policy in two forwards, and the reference is a frozen ``copy.deepcopy`` of
    the whole denoiser made before the adapters were added (a second copy of every weight), run in two more
    no-grad forwards. The noise, the timesteps and the loss (``dpo_loss``) are drawn and computed exactly as
    ``DiffusionDPO`` does for pairs without labels, so that both do the same work and give the same loss.

    Args:
        reference (PortraitDenoiser): the copy to run as the reference (frozen here).
        beta, loss_type, sft_weight: as ``DiffusionDPO``.
    """

    required_fields = ("video", "rejected", "audio", "reference")

    def __init__(self, reference, beta: float, loss_type: str = "sigmoid", sft_weight: float = 0.0):
        self.reference = reference.requires_grad_(False).eval()
        self.beta = beta
        self.loss_type = loss_type
        self.sft_weight = sft_weight

    def loss(self, module, batch):
        denoiser, process = module.denoiser, module.process
        win = denoiser.encode_video(batch["video"])
        lose = denoiser.encode_video(batch["rejected"])
        cond = denoiser.condition(batch)
        eps = torch.randn_like(win)  # the same draws, in the same order, as DiffusionDPO's
        t = process.sample_t(win.shape[0], device=win.device)
        model_t = process.model_time(t)
        x_win, x_lose = process.noise(win, eps, t), process.noise(lose, eps, t)
        target_win, target_lose = process.target(win, eps, t), process.target(lose, eps, t)

        e_w = per_sample_mse(denoiser(x_win, model_t, cond), target_win)
        e_l = per_sample_mse(denoiser(x_lose, model_t, cond), target_lose)
        with torch.no_grad():
            r_w = per_sample_mse(self.reference(x_win, model_t, cond), target_win)
            r_l = per_sample_mse(self.reference(x_lose, model_t, cond), target_lose)
        per_pair, _ = dpo_loss(e_w, e_l, r_w, r_l, self.beta, self.loss_type)
        loss = per_pair.mean()
        if self.sft_weight:
            loss = loss + self.sft_weight * e_w.mean()
        logged = {
            "loss": loss.detach(),
            "error_win": e_w.detach().mean(),
            "error_lose": e_l.detach().mean(),
            "reference_error_win": r_w.mean(),
            "reference_error_lose": r_l.mean(),
        }
        return loss, logged


def lora_module(algorithm: Algorithm, denoiser=None):
    """The DPO demo's module (recipes/demo/dpo.yaml: LoRA on the backbone, the audio attention trained in full)
    running ``algorithm``. Seeded, so every variant starts from the same weights and adapters."""
    from prefalign.module import AlignmentModule, LoraSettings
    from prefalign.processes import FlowMatching

    return AlignmentModule(
        denoiser if denoiser is not None else prefalign_denoiser(audio=True),
        FlowMatching(**DEMO_PROCESS),
        algorithm,
        lora=LoraSettings(**DEMO_LORA),
        optimizer=functools.partial(torch.optim.AdamW, **DEMO_DPO_ADAMW),
    )


def dpo_module():
    from prefalign.algorithms import DiffusionDPO

    return lora_module(DiffusionDPO(**DEMO_DPO))


def naive_dpo_module(device: torch.device):
    denoiser = prefalign_denoiser(audio=True)
    reference = copy.deepcopy(denoiser).to(device)  # before the adapters go in: the starting model, in full
    return lora_module(NaiveDPO(reference, **DEMO_DPO), denoiser)


def naive_dpo_step(bench: Bench, batch: dict) -> Step:
    module = naive_dpo_module(bench.device)
    step = module_step(bench, module, batch)
    step.reference = [*module.algorithm.reference.parameters(), *module.algorithm.reference.buffers()]
    return step


def dpo_step_ours(bench: Bench, batch: dict) -> Step:
    module = dpo_module()
    step = module_step(bench, module, batch)
    # Under LoRA the reference is the adapter-disabled backbone; only the audio attention's start is kept apart.
    step.reference = list(module.reference_snapshot.buffers())
    return step


def sft_pairs_batch(batch: dict) -> dict:
    """The pairs as 2B plain clips for SFT: the chosen videos, then the rejected ones, each with its conditions."""
    clips = {key: torch.cat([value, value]) if torch.is_tensor(value) else value for key, value in batch.items()}
    del clips["rejected"]
    clips["video"] = torch.cat([batch["video"], batch["rejected"]])
    clips["id"] = batch["id"] + [f"{clip}_rejected" for clip in batch["id"]]
    clips["size"] = 2 * batch["size"]
    return clips


def lora_sft_step(bench: Bench, batch: dict) -> Step:
    from prefalign.algorithms import SFT

    return module_step(bench, lora_module(SFT()), sft_pairs_batch(batch))


DPO_CHECKED = ("loss", "error_win", "error_lose", "reference_error_win", "reference_error_lose")


def same_dpo_loss_check(bench: Bench, batch: dict) -> dict[str, tuple[float, float]]:
    """prefalign's DPO and the naive one on the same weights, noise and timesteps: (ours, naive) per value.

    Every trainable tensor (adapters, audio attention) is first moved off its start by the same random step in
    both, so that policy and reference differ and the reference's construction is put to the test. In float64:
    β multiplies differences of errors, and would make float32 rounding (which differs between one batched
    forward and two halves on some devices) look like a different loss.
    """
    ours = dpo_module().to(bench.device, torch.float64)
    naive = naive_dpo_module(bench.device).to(bench.device, torch.float64)
    naive.algorithm.reference.to(torch.float64)
    batch = {key: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for key, v in batch.items()}
    names = [[name for name, p in module.named_parameters() if p.requires_grad] for module in (ours, naive)]
    if names[0] != names[1]:
        raise RuntimeError("dpo_step: prefalign's DPO and the naive one do not train the same parameters")
    values = []
    for module in (ours, naive):
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in module.trainable_parameters():
                param.add_(1e-2 * torch.randn(param.shape, generator=generator).to(param.device))
        torch.manual_seed(2)
        with torch.no_grad():
            _, logged = module.algorithm.loss(module, batch)
        values.append(logged)
    return {name: (values[0][name].item(), values[1][name].item()) for name in DPO_CHECKED}


def dpo_step(bench: Bench) -> Figure:
    """Figure 2: one DPO step of ours next to an SFT step on the same clips and next to a naive DPO."""
    pairs = DEMO_DATA["batch_size"]
    figure = Figure(
        name="dpo_step",
        title="DPO training step: prefalign vs. an SFT step on the same pairs and a naive DPO",
        description=(
            f"One training step of the DPO demo (recipes/demo/dpo.yaml: the Wan DiT of the SFT figure with "
            f"MelAudioEncoder and audio attention, LoRA rank {DEMO_LORA['rank']} on the backbone with the audio "
            f"attention trained in full, Flow-DPO with β = {DEMO_DPO['beta']:g}, AdamW) on a batch of B = {pairs} "
            f"TalkingShapes pairs (2B = {2 * pairs} clips of {DEMO_DATA['num_frames']} frames at 32×32; the "
            "rejected clip is the chosen one with its mouth track shifted, jittered or frozen, as `prefalign synth "
            "--rejected` makes it). **prefalign DPO**: `AlignmentModule.training_step` with `DiffusionDPO`: winner "
            "and loser in one policy forward on 2B, the reference (`module.reference()`: the adapters switched "
            "off, no second copy of the weights) in one no-grad forward on 2B; backward; AdamW step. **SFT on the "
            "pairs** (baseline): the same module with `SFT` (no mouth weighting) on the 2B clips, chosen and "
            "rejected concatenated: the policy's forward and backward on 2B without the reference. **naive DPO**: "
            "`NaiveDPO`, written in benchmarks/run.py as the baseline a first implementation would be: winner and "
            "loser in two policy forwards of B, the reference a `copy.deepcopy` of the whole denoiser (a second "
            "copy of every weight) in two no-grad forwards of B; the same noise, timesteps and `dpo_loss`. All "
            "three start from the same weights and adapters."
        ),
        baseline="SFT on the pairs",
        ideal={"SFT on the pairs": 1.0, "prefalign DPO": 4 / 3, "naive DPO": 4 / 3},
        compare_also=[("naive DPO", "prefalign DPO")],
    )
    batch = demo_batch(bench.device, pairs=True)
    if not bench.probing:
        checked = same_dpo_loss_check(bench, batch)
        differing = {name: pair for name, pair in checked.items() if not math.isclose(*pair, rel_tol=1e-4)}
        if differing:
            raise RuntimeError(f"dpo_step: the naive DPO does not compute what DiffusionDPO does: {differing}")
        loss, naive = checked["loss"]
        figure.notes.append(
            "Ideal ≈ 1.33 relative to an SFT step on the same pairs (2B): policy forward + backward on 2B plus a "
            "reference forward on 2B, counting a backward as two forwards (8 units against 6). Under LoRA the "
            "backward computes no gradients for the frozen base weights, so it costs less than two forwards and "
            "the ideal moves towards 1.5 (backward = forward)."
        )
        figure.notes.append(
            f"Same loss: before timing, in float64, with every trainable tensor moved off its start so that policy "
            f"and reference differ, on the same noise and timesteps, prefalign DPO gives {loss:.6g} and the naive DPO "
            f"{naive:.6g} (relative difference {abs(loss - naive) / abs(loss):.1e}); the policy's and the "
            f"reference's errors on winner and loser agree to {max_relative_difference(checked):.1e}."
        )
        figure.notes += recipe_drift(
            DEMO_DPO_RECIPE,
            {
                "Wan config": DEMO_WAN,
                "codec": DEMO_CODEC,
                "audio encoder": DEMO_MEL,
                "audio attention": DEMO_AUDIO,
                "process": DEMO_PROCESS,
                "algorithm": DEMO_DPO,
                "LoRA": DEMO_LORA,
                "AdamW": DEMO_DPO_ADAMW,
                "data": DEMO_DATA,
            },
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: logging is not what is timed
        return bench.compare(
            figure,
            {
                "SFT on the pairs": lambda: lora_sft_step(bench, batch),
                "prefalign DPO": lambda: dpo_step_ours(bench, batch),
                "naive DPO": lambda: naive_dpo_step(bench, batch),
            },
        )


def max_relative_difference(checked: dict[str, tuple[float, float]]) -> float:
    return max(abs(a - b) / max(abs(a), abs(b), 1e-12) for a, b in checked.values())


# --- figure 3: both backbone families, LoRA vs. full fine-tuning -----------------------------------------------
def recipe_model(recipe: Path) -> dict:
    """The ``model`` section of a recipe, less what a training step does not run: the LR scheduler (stepped by
    Lightning, outside the step), ``init_weights`` (seeded random weights time the same) and ``lora`` (set per
    variant)."""
    model = read_recipe(recipe)["model"]
    return {key: value for key, value in model.items() if key not in ("lr_scheduler", "init_weights", "lora")}


def read_recipe(recipe: Path) -> dict:
    import yaml

    return yaml.safe_load(recipe.read_text())


def recipe_module(model: dict, lora: dict | None):
    """The ``AlignmentModule`` a recipe's ``model`` section builds, as ``prefalign fit`` builds it (jsonargparse),
    with ``lora`` as its LoRA settings. Seeded, so that a family's variants start from the same weights."""
    from jsonargparse import ArgumentParser

    from prefalign.module import AlignmentModule

    parser = ArgumentParser()
    parser.add_class_arguments(AlignmentModule, "model")
    config = parser.parse_object({"model": {**model, "lora": lora}})
    torch.manual_seed(0)
    return parser.instantiate(config).model


def parameter_split(module) -> dict[str, int]:
    """Parameter counts of a module: the backbone's own weights, LoRA adapters, and everything else (the
    conditioning modules the denoiser adds), each with how many of them train."""
    split = {f"{part}{kind}": 0 for part in ("backbone", "adapters", "added") for kind in ("", "_trainable")}
    for name, param in module.named_parameters():
        part = "adapters" if "lora_" in name else "backbone" if name.startswith("denoiser.backbone.") else "added"
        split[part] += param.numel()
        split[f"{part}_trainable"] += param.numel() if param.requires_grad else 0
    return split


def backbone_step(bench: Bench) -> Figure:
    """Figure 3: an SFT step of the DiT and the UNet family at their demo sizes, LoRA against full fine-tuning."""
    families = {
        "Wan DiT": (DEMO_RECIPE, recipe_model(DEMO_RECIPE)),
        "SVD UNet": (DEMO_SVD_RECIPE, recipe_model(DEMO_SVD_RECIPE)),
    }
    wan = families["Wan DiT"][1]["denoiser"]["init_args"]["config"]
    unet = families["SVD UNet"][1]["denoiser"]["init_args"]["config"]
    rank = BACKBONE_LORA["rank"]

    def skeleton(family: str) -> str:
        keypoints = families[family][1]["denoiser"]["init_args"].get("pose_keypoints")
        return f", a skeleton of {keypoints} keypoints" if keypoints else ""

    figure = Figure(
        name="backbone_step",
        title="Backbone families: LoRA vs. full fine-tuning, Wan DiT and SVD UNet",
        description=(
            "One SFT training step of each backbone family at its demo size, with the model section of its recipe "
            f"as `prefalign fit` builds it: {DEMO_RECIPE.relative_to(ROOT)} (`WanDenoiser`, a "
            f"`WanTransformer3DModel` of {wan['num_layers']} blocks × "
            f"{wan['num_attention_heads'] * wan['attention_head_dim']} wide{skeleton('Wan DiT')}, `FlowMatching`) and "
            f"{DEMO_SVD_RECIPE.relative_to(ROOT)} (`SVDDenoiser`, a `UNetSpatioTemporalConditionModel` with block "
            f"widths {unet['block_out_channels']} and {unet['layers_per_block']} layer per block, `Diffusion` with "
            f"v-prediction{skeleton('SVD UNet')}); each with its codec, `MelAudioEncoder` and audio attention, "
            f"`SFT` and AdamW, on a batch of {DEMO_DATA['batch_size']} TalkingShapes clips of "
            f"{DEMO_DATA['num_frames']} frames at 32×32 with audio and pose (the batch of `sft_step`). A step: "
            "`AlignmentModule.training_step`, backward, AdamW step. **full FT**: every weight trains. **LoRA**: "
            f"`LoraSettings(rank={rank})`, the family's default targets (self-attention and feed-forwards), base "
            "weights frozen; the conditioning modules the denoiser adds (audio attention, skeleton) train in full, "
            "as `train_new_modules` does by default. A family's two variants start from the same weights."
        ),
        baseline="Wan DiT full FT",
        compare_also=[(f"{family} LoRA", f"{family} full FT") for family in families],
    )
    batch = demo_batch(bench.device)
    split: dict[str, dict[str, int]] = {}

    def build(variant: str, model: dict, lora: dict | None) -> Step:
        module = recipe_module(model, lora)
        split[variant] = parameter_split(module)
        return module_step(bench, module, batch)

    builders = {}
    for family, (recipe, model) in families.items():
        builders[f"{family} full FT"] = functools.partial(build, f"{family} full FT", model, None)
        builders[f"{family} LoRA"] = functools.partial(build, f"{family} LoRA", model, BACKBONE_LORA)
        if not bench.probing:
            figure.notes += recipe_drift(recipe, {"data": DEMO_DATA})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: logging is not what is timed
        bench.compare(figure, builders)
    if bench.probing:
        return figure
    for family in families:
        full, lora = split[f"{family} full FT"], split[f"{family} LoRA"]
        total = lora["backbone"] + lora["adapters"] + lora["added"]
        figure.notes.append(
            f"{family} LoRA trains {lora['adapters']:,} adapter parameters "
            f"({100 * lora['adapters'] / full['backbone']:.1f}% of the backbone's {full['backbone']:,}) and the "
            f"{lora['added_trainable']:,} of the added conditioning "
            f"modules: {100 * (lora['adapters'] + lora['added_trainable']) / total:.1f}% of its {total:,} "
            f"parameters, against {full['backbone'] + full['added']:,} (100%) under full fine-tuning."
        )
    figure.notes.append(
        "The ratio column compares every variant with the Wan DiT's full fine-tuning, across families too; LoRA "
        "against full fine-tuning within a family is the pair of ratios under the table."
    )
    return figure


# --- figure 4: GRPO: rollouts against plain sampling, the policy update, the judge ------------------------------------
def recipe_init_args(section: dict, cls) -> dict:
    """The init arguments of ``cls`` as a recipe's ``{class_path, init_args}`` section gives them, the class's
    defaults filling in what it leaves out (for describing a figure without building its model)."""
    given = section.get("init_args") or {}
    return {
        name: given.get(name, parameter.default)
        for name, parameter in inspect.signature(cls).parameters.items()
        if name in given or parameter.default is not inspect.Parameter.empty
    }


def grpo_parts(bench: Bench, batch: dict) -> tuple:
    """The GRPO demo's module (the model section of recipes/demo/grpo.yaml with its LoRA, seeded so that every
    variant starts from the same weights), the ``N = B·G`` rollout inputs made from the first ``B`` clips of
    ``batch`` (B: the recipe's batch size) as ``GRPO.training_step`` makes them, their frame count, and the prior
    latents ``[N, C, F, h, w]`` (seeded)."""
    recipe = read_recipe(DEMO_GRPO_RECIPE)
    module = recipe_module(recipe_model(DEMO_GRPO_RECIPE), recipe["model"].get("lora")).to(bench.device).train()
    b, g = recipe["data"]["batch_size"], module.algorithm.group_size
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


@torch.no_grad()
def plain_sampling(
    module,
    inputs: dict,
    num_frames: int,
    x: torch.Tensor,
    generator: torch.Generator,
    num_steps: int,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The sampler a GRPO rollout runs, less what the rollout keeps for training: the same conditions, schedule and
    stochastic steps (``process.step`` draws the noise from ``generator``), no stored states, no log-probs."""
    process, denoiser = module.process, module.denoiser
    cond = denoiser.condition(inputs, num_frames)
    schedule = process.timesteps(num_steps, device=x.device)
    for t, t_next in zip(schedule[:-1], schedule[1:]):
        model_t = process.model_time(t.expand(x.shape[0]))
        pred = denoiser(x, model_t, cond)
        if guidance_scale != 1.0:
            drop = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            uncond = denoiser(x, model_t, denoiser.drop_conditions(cond, drop))
            pred = uncond + guidance_scale * (pred - uncond)
        x = process.step(pred, x, t, t_next, stochastic=True, generator=generator).sample.to(x.dtype)
    return x


def grpo_sampling_step(bench: Bench, batch: dict, log_probs: bool) -> Step:
    """Sampling the N rollouts: ``GRPO.rollout`` (states and log-probs kept) or ``plain_sampling``; the same
    prior and the same step noise (a generator seeded afresh every run)."""
    module, inputs, num_frames, x = grpo_parts(bench, batch)
    algorithm = module.algorithm

    def run() -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        with bench.autocast():
            if log_probs:
                return algorithm.rollout(module, inputs, num_frames, x, generator).states[-1]
            return plain_sampling(
                module, inputs, num_frames, x, generator, algorithm.num_steps, algorithm.guidance_scale
            )

    return Step(run, None, list(module.parameters()))


def grpo_update_step(bench: Bench, batch: dict, ppo: bool) -> Step:
    """One trained timestep of the GRPO update on a stored rollout of the N latents, gradients accumulating as
    they do over an update's timesteps (no optimizer step: it comes once per update). With ``ppo``: the policy's
    step distribution with grad, the log-prob of the stored next state, the PPO-clip loss (and the KL when the
    recipe sets ``kl_beta``), backward. Without: the bare denoiser forward on the same latents and conditions, MSE to
    a fixed target, backward. Each run takes the next stochastic sampler step in turn."""
    from prefalign.algorithms.grpo import gaussian_kl, ppo_clip_loss
    from prefalign.rewards import group_advantages

    module, inputs, num_frames, x = grpo_parts(bench, batch)
    algorithm, denoiser, process = module.algorithm, module.denoiser, module.process
    segment = algorithm.rollout(module, inputs, num_frames, x, torch.Generator().manual_seed(1))
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
    segment = algorithm.rollout(module, inputs, num_frames, x, torch.Generator().manual_seed(1))
    plain = plain_sampling(
        module, inputs, num_frames, x, torch.Generator().manual_seed(1), algorithm.num_steps, algorithm.guidance_scale
    )
    stored = sum(t.numel() * t.element_size() for t in (segment.states, segment.log_probs))
    return (segment.states[-1] - plain).abs().max().item(), stored


@contextlib.contextmanager
def judge_server(delay: float, sizes: list | None = None):
    """A stand-in for a served MLLM judge on loopback: an OpenAI-compatible chat-completions endpoint that answers
    every request after ``delay`` seconds with the same valid scores (and appends each request's body size in bytes
    to ``sizes``, when given). Yields its API root (``.../v1``)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer = json.dumps(
        {
            "id": "chatcmpl-benchmark",
            "object": "chat.completion",
            "model": "benchmark-judge",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": JUDGE_ANSWER},
                    "finish_reason": "stop",
                }
            ],
        }
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if sizes is not None:
                sizes.append(len(body))
            time.sleep(delay)  # the judge model at work
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 64  # the default 5 would make a burst of connections wait for SYN retries

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def judge_step(url: str, videos: torch.Tensor, batched: bool, judges: dict) -> Step:
    """Scoring ``videos`` with an ``OpenAIJudge`` at ``url``: one ``score()`` call with up to
    ``JUDGE_CONCURRENCY`` requests in flight, or one ``score()`` call per video with one in flight. A request is
    neither re-sent nor asked again (a failure is counted, not retried into the timing)."""
    from prefalign.rewards import OpenAIJudge

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


def grpo_step(bench: Bench) -> Figure:
    """Figure 4: what GRPO's bookkeeping costs (rollouts that keep states and log-probs, the per-timestep policy
    update) next to the bare work, and what batching the judge's requests gains."""
    from prefalign.algorithms import GRPO

    recipe = read_recipe(DEMO_GRPO_RECIPE)
    grpo = recipe_init_args(recipe["model"]["algorithm"], GRPO)
    b, g, steps = recipe["data"]["batch_size"], grpo["group_size"], grpo["num_steps"]
    if b > DEMO_DATA["batch_size"]:
        raise ValueError(
            f"grpo_step: {DEMO_GRPO_RECIPE.relative_to(ROOT)} asks for batches of {b} conditions; the "
            f"demo batch has {DEMO_DATA['batch_size']}"
        )
    lora = recipe["model"].get("lora") or {}
    plain, rollout = "plain sampling", "rollout with log-probs"
    bare, update = "bare forward + backward", "policy update per trained timestep"
    batched, single = "judge, batched", "judge, one by one"
    figure = Figure(
        name="grpo_step",
        title="GRPO: rollouts with log-probs vs. plain sampling, the policy update, the judge batched",
        description=(
            f"The GRPO demo's module as `prefalign fit` builds it from {DEMO_GRPO_RECIPE.relative_to(ROOT)} (the Wan "
            f"DiT of `sft_step` with MelAudioEncoder and audio attention, LoRA rank {lora.get('rank')}, "
            f"`FlowMatching`, `GRPO` with G = {g} rollouts per condition and {steps} sampler steps), on the first "
            f"B = {b} clips of the demo batch ({DEMO_DATA['num_frames']} frames at 32×32 with audio and pose), each "
            f"repeated G times as `GRPO.training_step` does: N = B·G = {b * g} rollouts. **{plain}** (baseline): "
            f"the {steps} stochastic steps from the same prior, written in benchmarks/run.py: a denoiser forward and "
            f"`process.step(..., stochastic=True, generator=g)` per step under no_grad, nothing stored. **{rollout}**: "
            f"`GRPO.rollout` on the same inputs, prior and step noise: every state and every step's log-prob kept "
            f"(target ≤ 1.05× plain sampling). **{update}**: one sampler step of the update on the N stored latents "
            "(each run the next stochastic step): `GRPO.step_distribution` with grad, `process.log_prob` of the "
            "stored next state, `ppo_clip_loss` with group-standardised advantages of random rewards, backward "
            f"(gradients accumulate as over an update's steps; the optimizer steps once per update, not here). "
            f"**{bare}**: the denoiser forward on the same N latents, timestep and conditions, MSE to a fixed "
            f"target, backward. **{batched}** / **{single}**: `OpenAIJudge` scoring {JUDGE_VIDEOS} demo videos "
            f"against a loopback chat-completions server (`http.server.ThreadingHTTPServer` in a thread) that "
            f"answers every request after {1e3 * JUDGE_DELAY_S:.0f} ms, as a served MLLM would: one `score()` call "
            f"with `max_concurrency={JUDGE_CONCURRENCY}`, against one `score()` call per video with "
            "`max_concurrency=1`; a step scores all the videos."
        ),
        baseline=plain,
        targets={rollout: 1.05},
        compare_also=[(update, bare), (single, batched)],
    )
    batch = demo_batch(bench.device)
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
        if recipe["data"]["num_frames"] != DEMO_DATA["num_frames"]:
            figure.notes.append(
                f"**{DEMO_GRPO_RECIPE.relative_to(ROOT)} has moved on**: it trains on {recipe['data']['num_frames']} "
                f"frames, this benchmark used {DEMO_DATA['num_frames']}."
            )
    videos = batch["video"].repeat(math.ceil(JUDGE_VIDEOS / DEMO_DATA["batch_size"]), 1, 1, 1, 1)[:JUDGE_VIDEOS]
    judges: dict = {}
    # The judge sends this variable's value as its API key: a dummy one, for a server that checks nothing.
    os.environ[JUDGE_KEY_ENV] = "benchmark-dummy-key"
    for name in ("no_proxy", "NO_PROXY"):  # a proxy from the environment must not see loopback requests
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
    with judge_server(JUDGE_DELAY_S) as url:
        bench.compare(
            figure,
            {
                plain: lambda: grpo_sampling_step(bench, batch, log_probs=False),
                rollout: lambda: grpo_sampling_step(bench, batch, log_probs=True),
                bare: lambda: grpo_update_step(bench, batch, ppo=False),
                update: lambda: grpo_update_step(bench, batch, ppo=True),
                batched: lambda: judge_step(url, videos, batched=True, judges=judges),
                single: lambda: judge_step(url, videos, batched=False, judges=judges),
            },
        )
    if bench.probing:
        return figure
    failed = {name: judge.stats for name, judge in judges.items() if judge.stats["failures"]}
    if failed:
        raise RuntimeError(f"grpo_step: the judge got no answer for some videos: {failed}")
    rows = {row["variant"]: row for row in figure.rows}
    speed = {name: JUDGE_VIDEOS / (1e-3 * rows[name]["median_ms"]) for name in (batched, single)}
    waves = math.ceil(JUDGE_VIDEOS / JUDGE_CONCURRENCY)
    figure.notes += [
        f"{update} / {bare}: ideal ≈ 1: the update adds to the forward and backward only the step's mean and "
        "std, a Gaussian log-density and the clipped ratio, all elementwise.",
        f"Judge throughput: {speed[batched]:.1f} videos/s batched, {speed[single]:.1f} videos/s one by one "
        f"(medians); every request was answered ({sum(j.stats['requests'] for j in judges.values())} requests, no "
        f"failure). Ideal speed-up {JUDGE_VIDEOS}/{waves} = {JUDGE_VIDEOS / waves:.0f}×: {waves} waves of "
        f"{JUDGE_CONCURRENCY} concurrent {1e3 * JUDGE_DELAY_S:.0f} ms answers against {JUDGE_VIDEOS} in a row; "
        "sampling the frames and encoding them as PNG stay serial.",
        "The ratio column compares every row with plain sampling; only the rollout's is a comparison of like with "
        "like, the other pairs are under the table.",
    ]
    return figure


# --- figure 5: ReFree: a training step with cached self-play negatives, and their amortised sampling --------------
def refree_module(bench: Bench, algorithm: dict | None = None):
    """The ReFree demo's module (the model section of recipes/demo/refree.yaml with its LoRA, seeded), with
    ``algorithm`` (a ``{class_path, init_args}`` section) in place of the recipe's when given."""
    recipe = read_recipe(DEMO_REFREE_RECIPE)
    model = recipe_model(DEMO_REFREE_RECIPE)
    if algorithm is not None:
        model = {**model, "algorithm": algorithm}
    return recipe_module(model, recipe["model"].get("lora")).to(bench.device).train()


def refree_sft_algorithm() -> dict:
    """The control of the ReFree demo (`make demo-refree`): SFT with ReFree's mouth weighting."""
    from prefalign.algorithms import ReFree

    refree = recipe_init_args(read_recipe(DEMO_REFREE_RECIPE)["model"]["algorithm"], ReFree)
    return {"class_path": "prefalign.algorithms.SFT", "init_args": {"mouth_weight": refree["mouth_weight"]}}


def refree_step_cached(bench: Bench, batch: dict, modules: dict) -> Step:
    """``AlignmentModule.training_step`` with ``ReFree``, backward, AdamW, after ``ReFree.setup`` (the lagged
    snapshot) and with every clip's self-play negative of ``batch`` already in the cache."""
    module = refree_module(bench)
    module.algorithm.setup(module)
    module.algorithm.self_play(module, batch, list(range(len(batch["id"]))))
    modules["cached"] = module
    step = module_step(bench, module, batch)
    step.reference = list(module.reference_snapshot.buffers())
    return step


def self_play_step(bench: Bench, batch: dict) -> Step:
    """Filling the self-play cache for one batch: ``ReFree.self_play`` on every clip of ``batch``, cache emptied
    first (the lagged snapshot sampling all of them)."""
    module = refree_module(bench)
    algorithm = module.algorithm
    algorithm.setup(module)
    rows = list(range(len(batch["id"])))

    def run() -> dict:
        algorithm.cache.clear()
        with bench.autocast():
            return algorithm.self_play(module, batch, rows)

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


def refree_step(bench: Bench) -> Figure:
    """Figure 5: a ReFree training step with its self-play negatives cached, against an SFT step, and what
    sampling those negatives adds once amortised over the refresh period."""
    from prefalign.algorithms import ReFree

    recipe = read_recipe(DEMO_REFREE_RECIPE)
    refree = recipe_init_args(recipe["model"]["algorithm"], ReFree)
    lora = recipe["model"].get("lora") or {}
    settings = ReFree(**refree)  # the recipe's mix of negatives, ReFree's default where it gives none
    mix = dict(zip(settings.kinds, settings.weights.tolist()))
    p = mix.get("self_play", 0.0) / sum(mix.values())
    refresh, b = refree["refresh_every"], recipe["data"]["batch_size"]
    sft, cached, sampling = "SFT step", "ReFree step, negatives cached", "self-play sampling"
    figure = Figure(
        name="refree_step",
        title="ReFree training step: cached self-play negatives vs. an SFT step, and their amortised sampling",
        description=(
            f"The ReFree demo's module as `prefalign fit` builds it from {DEMO_REFREE_RECIPE.relative_to(ROOT)} "
            f"(the Wan DiT of `sft_step` with MelAudioEncoder and audio attention, LoRA rank {lora.get('rank')}, "
            f"`FlowMatching`, `ReFree` with β = {refree['beta']:g}, λ = {refree['fm_weight']:g}, mouth weight "
            f"{refree['mouth_weight']:g}, negatives {', '.join(f'{k} {w:g}' for k, w in mix.items())}, refreshed every {refresh} steps, self-play sampled in "
            f"{refree['self_play_steps']} steps), on the demo batch of {DEMO_DATA['batch_size']} TalkingShapes clips "
            f"of {DEMO_DATA['num_frames']} frames at 32×32 with audio and pose. **{sft}** (baseline): the same module "
            f"with `SFT(mouth_weight={refree['mouth_weight']:g})` in place of ReFree (the control of `make "
            "demo-refree`): `AlignmentModule.training_step`, backward, AdamW step. **"
            f"{cached}**: the same with `ReFree` after `ReFree.setup` (the lagged snapshot), with every clip's "
            "self-play negative of the batch already cached: each step draws each clip's negative source, perturbs "
            "the ground truth for the others, and runs the policy on positive and negative (2B) with grad and the "
            "lagged reference on 2B without. **"
            f"{sampling}**: filling the cache for the batch: `ReFree.self_play` on all its clips with the cache "
            f"emptied ({refree['self_play_steps']} deterministic steps of the lagged snapshot on B clips)."
        ),
        baseline=sft,
        ideal={sft: 1.0, cached: 8 / 3},
    )
    batch = demo_batch(bench.device)
    if not bench.probing and recipe["data"]["batch_size"] != DEMO_DATA["batch_size"]:
        figure.notes += recipe_drift(DEMO_REFREE_RECIPE, {"data": DEMO_DATA})
    modules: dict = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: logging is not what is timed
        bench.compare(
            figure,
            {
                sft: lambda: module_step(bench, refree_module(bench, refree_sft_algorithm()), batch),
                cached: lambda: refree_step_cached(bench, batch, modules),
                sampling: lambda: self_play_step(bench, batch),
            },
        )
    if bench.probing:
        return figure
    algorithm = modules["cached"].algorithm
    if algorithm.self_play_sampled != DEMO_DATA["batch_size"]:
        raise RuntimeError(
            f"refree_step: the cached step sampled {algorithm.self_play_sampled - DEMO_DATA['batch_size']}"
            " self-play negatives while timed: the cache missed"
        )
    share = self_play_per_step(p, refresh, b, DEMO_TRAIN_CLIPS)
    times = {row["variant"]: row["times_ms"] for row in figure.rows}
    with_sampling = [step + share * sample for step, sample in zip(times[cached], times[sampling])]
    figure.ratios.append(
        {"variant": f"{cached} + amortised self-play", "against": sft, **paired_ratio(with_sampling, times[sft])}
    )
    rows = {row["variant"]: row for row in figure.rows}
    visits = refresh * b / DEMO_TRAIN_CLIPS
    latent = next(iter(algorithm.cache.values()))
    figure.notes += [
        "Ideal ≈ 2.67 relative to the SFT step on B clips: policy forward + backward on 2B (positive and negative) "
        "plus a reference forward on 2B, counting a backward as two forwards (8 units against 3). Under LoRA the "
        "backward skips the frozen weights' gradients and the ideal moves towards 3 (backward = forward).",
        f"Amortised self-play per step = sampling time per batch × clips sampled per refresh period / (refresh_every "
        f"× batch_size). With the recipe's numbers ({DEMO_TRAIN_CLIPS} training clips, refresh_every {refresh}, "
        f"batch size {b}, self-play share {p:.3g} of the mix) a period visits each clip {visits:.2f} times and "
        f"samples {DEMO_TRAIN_CLIPS} × (1 − (1 − {p:.3g})^{visits:.2f}) = {share * refresh * b:.1f} clips (a clip "
        f"is sampled at its first self-play draw, then cached), so a step costs {share:.4f} × "
        f"{rows[sampling]['median_ms']:.1f} ms = {share * rows[sampling]['median_ms']:.1f} ms of sampling (medians), "
        f"and the ReFree step with it {rows[cached]['median_ms'] + share * rows[sampling]['median_ms']:.1f} ms. "
        "The ratio with it (under the table) adds that share of each round's sampling time to the round's step.",
        f"The amortisation assumes sampling costs the same per clip whatever the number sampled at once; in "
        f"training the missing clips of each step are sampled together (about {p * b:.1f} per step early in a "
        "period, fewer later), which on a GPU costs more per clip than a full batch. The cache holds "
        f"{latent.numel() * latent.element_size() / MIB:.2f} MiB per clip, "
        f"{DEMO_TRAIN_CLIPS * latent.numel() * latent.element_size() / MIB:.1f} MiB with every clip cached; the "
        "reference copy column is the lagged snapshot of the trained tensors.",
    ]
    return figure


# --- figure 6: training samples per second, from cached latents vs. decoding on the fly --------------------------
DATA_CLIPS = 16  # clips of the data_step dataset: 4 demo batches per pass
DATA_SEED = 0


def talkingshapes_on_disk(num_clips: int, seed: int) -> Path:
    """The manifest of a TalkingShapes dataset (the demo's clips: 17 frames at 32×32 with audio and pose) that
    ``write_dataset`` wrote under the temporary folder, in a folder named after its settings and reused when there:
    the memory probes, in processes of their own, read the same files. Written aside and renamed into place, so that
    a folder found there is whole."""
    from prefalign.data.synthetic import TalkingShapesConfig, write_dataset

    cfg = TalkingShapesConfig()
    settings = json.dumps({"num_clips": num_clips, "seed": seed, **asdict(cfg)}, sort_keys=True)
    key = hashlib.sha1(settings.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"prefalign-benchmark-talkingshapes-{key}"
    if not folder.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
        write_dataset(staging, num_clips, seed, cfg)
        try:
            staging.rename(folder)
        except OSError:  # another process put it there first
            shutil.rmtree(staging)
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise RuntimeError(f"data_step: {folder} holds no manifest.jsonl; delete the folder to have it written again")
    return manifest


def data_module(manifest: Path, latent_cache: Path | None):
    """The demo's training data as the data step figure reads it: every clip decoded afresh (``cache_decoded``
    off), or with ``latent_cache`` read from that cache."""
    from prefalign.data.datamodule import PortraitDataModule

    return PortraitDataModule(
        train=str(manifest),
        val_fraction=0,
        batch_size=DEMO_DATA["batch_size"],
        num_frames=DEMO_DATA["num_frames"],
        num_workers=0,
        cache_decoded=False,
        latent_cache=None if latent_cache is None else str(latent_cache),
    )


def latent_cache_of(manifest: Path, denoiser) -> Path:
    """The latent cache of the dataset at ``manifest``, written next to it by ``preprocess`` with ``denoiser`` (its
    codec and audio encoder encode); reused when its fingerprint matches ``denoiser`` and the data settings, as
    ``AlignmentModule.setup`` checks it, and written again when not."""
    from prefalign.data.cache import LatentCache, preprocess
    from prefalign.data.errors import DataError

    folder = manifest.parent.with_name(f"{manifest.parent.name}-latents")
    datamodule = data_module(manifest, None)
    try:
        LatentCache(folder).check(denoiser, datamodule.fps, datamodule.sample_rate, datamodule.num_frames)
    except DataError:
        preprocess(denoiser, datamodule, folder)
    return folder


def endless_batches(bench: Bench, manifest: Path, latent_cache: Path | None) -> Callable[[], dict]:
    """Each call, the next batch of the data module's training loader, moved to the device; a new pass over the
    loader when one ends (in the same order: outside a Trainer its sampler stays at epoch 0)."""
    loader = data_module(manifest, latent_cache).train_dataloader()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))

    def next_batch() -> dict:
        batch = next(batches)
        return {key: value.to(bench.device) if torch.is_tensor(value) else value for key, value in batch.items()}

    return next_batch


def demo_sft_module():
    """The SFT demo's module, built from the model section of recipes/demo/sft.yaml (seeded)."""
    return recipe_module(recipe_model(DEMO_RECIPE), None)


def same_data_check(bench: Bench, manifest: Path, latent_cache: Path, denoiser) -> float:
    """Largest difference between what the denoiser makes of the first decoded batch (latents and conditions) and
    of the first cached one, which must hold the same clips: shows that both loaders feed the step the same data."""
    decoded = endless_batches(bench, manifest, None)()
    cached = endless_batches(bench, manifest, latent_cache)()
    if decoded["id"] != cached["id"]:
        raise RuntimeError(f"data_step: the loaders give different clips: {decoded['id']} and {cached['id']}")
    denoiser = denoiser.to(bench.device)
    with torch.no_grad():
        made = {"latents": denoiser.latents(decoded), **denoiser.condition(decoded)}
        read = {"latents": denoiser.latents(cached), **denoiser.condition(cached)}
    if made.keys() != read.keys():
        raise RuntimeError(f"data_step: the batches make different conditions: {sorted(made)} and {sorted(read)}")
    return max((made[key] - read[key]).abs().max().item() for key in made if torch.is_tensor(made[key]))


def folder_mib(folder: Path, pattern: str) -> float:
    return sum(path.stat().st_size for path in folder.glob(pattern)) / MIB


def data_step(bench: Bench) -> Figure:
    """Figure 6: training samples per second when the batches come from the latent cache against decoding the
    clips on the fly, with the SFT step and for loading alone."""
    b, frames = DEMO_DATA["batch_size"], DEMO_DATA["num_frames"]
    decode_sft, cache_sft, decode, cache = "decode + SFT step", "cache + SFT step", "decode only", "cache only"
    figure = Figure(
        name="data_step",
        title="Training samples per second: cached latents vs. decoding on the fly",
        description=(
            f"Where a training step's batch comes from, at the demo size. The data: {DATA_CLIPS} TalkingShapes clips "
            f"({frames} frames at 32×32, 25 fps, 16 kHz audio, pose) written once by `write_dataset` (mp4, wav, png "
            "and npy per clip), and their latent cache, written once by `prefalign.data.cache.preprocess` with the "
            f"denoiser of {DEMO_RECIPE.relative_to(ROOT)}: per {frames}-frame window, the PixelCodec latents, the "
            "audio waveform, the MelAudioEncoder's features, the reference image (uint8) and the pose, in "
            "safetensors shards. Every variant takes its batch of "
            f"{b} by `next()` on an endless iterator over `PortraitDataModule(train=..., val_fraction=0, "
            f"batch_size={b}, num_frames={frames}, num_workers=0, cache_decoded=False[, latent_cache=...])"
            ".train_dataloader()` (a new pass when one ends) and moves it to the device. "
            f"**{decode_sft}** (baseline): the loader decodes every clip (PyAV video, wav, png, npy; the "
            f"{frames}-frame crop is the whole clip), then the SFT demo's module as `prefalign fit` builds it from the recipe "
            "(`AlignmentModule.training_step`, backward, AdamW step) encodes the video through the codec and computes "
            f"the mel features. **{cache_sft}**: the loader reads the cache (`CachedClipDataset`: no video is decoded) "
            "and the same module, from the same weights, takes the cached latents and audio features in place of "
            f"encoding. **{decode}** / **{cache}**: the loading alone (no model). On this tiny model the codec is the "
            "PixelCodec, a space-to-depth reshape next to free, so what the cache saves here is almost all decoding "
            "(and the mel features); at real scale the codec is a VAE, whose encoder is what the cache mostly saves "
            "there, and this figure does not measure it."
        ),
        baseline=decode_sft,
        compare_also=[(cache_sft, decode_sft), (cache, decode)],
        columns={"samples_per_s": "samples/s"},
    )
    manifest = talkingshapes_on_disk(DATA_CLIPS, DATA_SEED)
    latent_cache = latent_cache_of(manifest, demo_sft_module().denoiser)
    if not bench.probing:
        difference = same_data_check(bench, manifest, latent_cache, demo_sft_module().denoiser)
        if difference > 1e-5:
            raise RuntimeError(
                f"data_step: cached and decoded batches give different inputs (max difference {difference})"
            )
        figure.notes.append(
            f"Same data: the first batch of both loaders holds the same clips, and the latents and conditions "
            f"(reference latent, audio features) the module makes of the decoded batch match those of the cached "
            f"one (max difference {difference:.1e})."
        )
        figure.notes += recipe_drift(DEMO_RECIPE, {"data": DEMO_DATA})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: logging is not what is timed
        bench.compare(
            figure,
            {
                decode_sft: lambda: module_step(bench, demo_sft_module(), endless_batches(bench, manifest, None)),
                cache_sft: lambda: module_step(
                    bench, demo_sft_module(), endless_batches(bench, manifest, latent_cache)
                ),
                decode: lambda: Step(endless_batches(bench, manifest, None), None, []),
                cache: lambda: Step(endless_batches(bench, manifest, latent_cache), None, []),
            },
        )
    if bench.probing:
        return figure
    rows = {row["variant"]: row for row in figure.rows}
    for row in figure.rows:
        row["samples_per_s"] = b / (1e-3 * row["median_ms"])
    ms = {name: row["median_ms"] for name, row in rows.items()}
    windows = len(json.loads((latent_cache / "manifest.json").read_text())["entries"])
    figure.notes += [
        "Samples per second = batch size / median step time: "
        + ", ".join(f"{name} {rows[name]['samples_per_s']:.1f}" for name in rows)
        + f". The cache gives {rows[cache_sft]['samples_per_s'] / rows[decode_sft]['samples_per_s']:.2f}× the "
        f"samples per second with the step and {rows[cache]['samples_per_s'] / rows[decode]['samples_per_s']:.1f}× "
        "for loading alone (ratios of medians; the paired ratios are under the table).",
        f"Decoding a batch takes {ms[decode]:.1f} ms, {100 * ms[decode] / ms[decode_sft]:.0f}% of the decode + SFT "
        f"step ({ms[decode_sft]:.1f} ms); reading it from the cache {ms[cache]:.2f} ms. With the step the cache saves "
        f"{ms[decode_sft] - ms[cache_sft]:.1f} ms a batch, loading alone {ms[decode] - ms[cache]:.1f} ms (differences "
        "of medians); what the cached step also skips, the codec encode and the mel features, is the difference "
        f"between the two, to be read against the SFT rows' spread (IQR {rows[decode_sft]['q3_ms'] - rows[decode_sft]['q1_ms']:.1f} "
        f"and {rows[cache_sft]['q3_ms'] - rows[cache_sft]['q1_ms']:.1f} ms wide).",
        "Loading here runs in the training process between steps (`num_workers=0`, as the demo recipes). With worker "
        "processes decoding overlaps the step and costs CPU cores rather than step time, as long as the workers keep "
        "up; the loading rows say how many cores that takes (a batch's decode time over the step's).",
        f"{DATA_CLIPS} clips make {DATA_CLIPS // b} batches a pass, so one step in {DATA_CLIPS // b} of every variant "
        "also starts a new pass over its loader. The dataset takes "
        f"{folder_mib(manifest.parent / 'clips', '*'):.2f} MiB on disk, its cache {folder_mib(latent_cache, '*'):.2f} "
        f"MiB for {windows} windows (float32 latents and features: the cache is larger than compressed video).",
        "The ratio column compares every row with decode + SFT step; the loading rows compare like with like "
        "under the table. The loading rows have no model (—).",
    ]
    return figure


# --- figure 7: checkpoint size and save time, LoRA vs. full fine-tuning ------------------------------------------
CHECKPOINT_TRAIN_STEPS = 2  # optimizer steps before saving, so that AdamW's state exists as in a run's checkpoints


def lightning_checkpoint(module, optimizer: torch.optim.Optimizer, whole: bool) -> dict:
    """What ``ModelCheckpoint`` writes for our module in one process, less Lightning's own bookkeeping (epoch,
    loops, callbacks: a few KiB): the model part as ``on_save_checkpoint`` leaves it (``checkpoints.model_part``:
    the trained tensors only; ``on_save_checkpoint`` itself gathers random states through a Trainer), or with
    ``whole`` the unfiltered ``state_dict()``; then the optimizer's state, the algorithm's and the random state."""
    from prefalign import checkpoints

    checkpoint = checkpoints.model_part(module.state_dict(), module, keep_frozen=whole)
    checkpoint["optimizer_states"] = [optimizer.state_dict()]
    checkpoint["algorithm_states"] = [module.algorithm.state_dict()]
    checkpoint["rng_states"] = [checkpoints.rng_state()]
    return checkpoint


def tensor_mib(value) -> float:
    """The bytes of every tensor in a nested checkpoint structure, in MiB."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size() / MIB
    if isinstance(value, dict):
        return sum(tensor_mib(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_mib(v) for v in value)
    return 0.0


def dpo_recipe_module(lora: dict | None):
    """The DPO demo's module from the model section of recipes/demo/dpo.yaml (seeded), with ``lora``."""
    return recipe_module(recipe_model(DEMO_DPO_RECIPE), lora)


def checkpoint_save_step(bench: Bench, batch: dict, lora: dict | None, whole: bool, path: Path, saved: dict) -> Step:
    """Saving the DPO demo's module (with ``lora``, or fully fine-tuned) to ``path`` after
    ``CHECKPOINT_TRAIN_STEPS`` training steps on ``batch``, as Lightning saves: ``_atomic_save`` serialises into
    memory, then writes through an fsspec transaction (a temporary file moved over the target)."""
    from lightning.fabric.utilities.cloud_io import _atomic_save

    module = dpo_recipe_module(lora).to(bench.device)
    module.setup("fit")  # as Lightning before training: the algorithm's setup, the full fine-tuning reference copy
    train = module_step(bench, module, batch)
    for _ in range(CHECKPOINT_TRAIN_STEPS):
        train.run()
    saved[path] = module, train.optimizer

    def run() -> None:
        _atomic_save(lightning_checkpoint(module, train.optimizer, whole), path)

    if module._reference is not None:
        reference = list(module._reference.parameters())
    else:
        reference = list(getattr(module, "reference_snapshot", torch.nn.Module()).buffers())
    copies = {id(t) for t in reference}
    parameters = [p for p in module.parameters() if id(p) not in copies]
    return Step(run, train.optimizer, parameters, reference)


def restored_difference(path: Path, trained, lora: dict | None) -> float:
    """Load the checkpoint at ``path`` into a freshly built module, as ``prefalign`` loads one (the frozen tensors
    it left out come from the model the recipe builds), and return the largest difference from ``trained``'s
    tensors (its full fine-tuning reference copy aside: it is for resuming, not in a loaded model)."""
    from prefalign import checkpoints

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    fresh = dpo_recipe_module(lora)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    expected = {k: v for k, v in trained.state_dict().items() if not k.startswith(checkpoints.REFERENCE)}
    got = fresh.state_dict()
    if got.keys() != expected.keys():
        raise RuntimeError(
            f"checkpoint_save: {path.name} restores other tensors: {sorted(got.keys() ^ expected.keys())}"
        )
    return max((got[k].float() - expected[k].float().cpu()).abs().max().item() for k in expected)


def mount_of(path: Path) -> str:
    """The filesystem ``path`` is on, as '<mount point> (<type>)', from /proc/mounts (Linux); '' elsewhere."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    resolved = str(path.resolve())
    inside = [
        (point, kind) for point, kind in mounts if resolved == point or resolved.startswith(point.rstrip("/") + "/")
    ]
    point, kind = max(inside, key=lambda mount: len(mount[0]), default=("?", "?"))
    return f"{point} ({kind})"


def checkpoint_save(bench: Bench) -> Figure:
    """Figure 7: the checkpoint a LoRA run writes (its frozen base left out) against full fine-tuning's and
    against the whole state dict of the same LoRA model: file size and save time."""
    lora = read_recipe(DEMO_DPO_RECIPE)["model"].get("lora")
    if not lora:
        raise ValueError(f"checkpoint_save: {DEMO_DPO_RECIPE.relative_to(ROOT)} no longer trains LoRA")
    full, adapters, whole = "full fine-tuning", f"LoRA r{lora['rank']}", "LoRA, whole state dict"
    figure = Figure(
        name="checkpoint_save",
        title="Checkpoint size and save time: LoRA vs. full fine-tuning",
        description=(
            f"Saving a checkpoint of the DPO demo's module, built from the model section of "
            f"{DEMO_DPO_RECIPE.relative_to(ROOT)} as `prefalign fit` builds it (the Wan DiT of `sft_step` with "
            'MelAudioEncoder and audio attention, `FlowMatching`, `DiffusionDPO`, AdamW), after `module.setup("fit")` '
            f"and {CHECKPOINT_TRAIN_STEPS} training steps on the demo batch of {DEMO_DATA['batch_size']} pairs, so that "
            "AdamW's state exists. A step builds the checkpoint `ModelCheckpoint` writes for our module in one process "
            "(`checkpoints.model_part(module.state_dict(), module)`, what `on_save_checkpoint` keeps: the trained tensors and the run's "
            "metadata, with `optimizer_states`, `algorithm_states` and the random state added; Lightning's own "
            "bookkeeping of a few KiB left out) and writes it with Lightning's `_atomic_save` (`torch.save` into "
            "memory, then an fsspec transaction: a temporary file moved over the target), over the same file every "
            f"step. **{full}** (baseline): `lora: null`; every denoiser weight trains, and the checkpoint holds them "
            "with the frozen reference copy that DPO resumes from. "
            f"**{adapters}**: the recipe's `lora` ({', '.join(f'{k}: {json.dumps(v)}' for k, v in lora.items())}): adapters on "
            "the backbone's self-attention and feed-forwards, the audio attention trained in full, its starting "
            f"values kept as the reference; the checkpoint leaves out the frozen base. **{whole}**: the same LoRA "
            "module saved with its unfiltered `module.state_dict()`, base included: what a LoRA run writes without "
            "dropping the frozen base. The *checkpoint file* column is the file's size on disk."
        ),
        baseline=full,
        compare_also=[(whole, adapters)],
        columns={"file_mib": "checkpoint file (MiB)"},
    )
    batch = demo_batch(bench.device, pairs=True)
    saved: dict = {}
    with tempfile.TemporaryDirectory(prefix="prefalign-benchmark-checkpoints-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: logging is not what is timed
        folder = Path(tmp)
        paths = {name: folder / f"{slug}.ckpt" for name, slug in ((full, "full"), (adapters, "lora"), (whole, "whole"))}
        settings = {full: (None, False), adapters: (lora, False), whole: (lora, True)}
        bench.compare(
            figure,
            {
                name: functools.partial(checkpoint_save_step, bench, batch, *settings[name], paths[name], saved)
                for name in (full, adapters, whole)
            },
        )
        if bench.probing:
            return figure
        sizes = {name: path.stat().st_size / MIB for name, path in paths.items()}
        parts = {}
        for name, path in paths.items():
            module, optimizer = saved[path]
            checkpoint = lightning_checkpoint(module, optimizer, settings[name][1])
            parts[name] = (
                len(checkpoint["state_dict"]),
                tensor_mib(checkpoint["state_dict"]),
                tensor_mib(checkpoint["optimizer_states"]),
            )
        restored = {
            name: restored_difference(paths[name], saved[paths[name]][0], settings[name][0])
            for name in (full, adapters)
        }
        filesystem = mount_of(folder)
        split = parameter_split(saved[paths[adapters]][0])
    if max(restored.values()) > 0:
        raise RuntimeError(f"checkpoint_save: a saved checkpoint does not restore its model exactly: {restored}")
    for row in figure.rows:
        row["file_mib"] = sizes[row["variant"]]
    figure.notes += [
        f"File size ratios: {adapters} / {full} = {sizes[adapters] / sizes[full]:.3f} "
        f"({sizes[adapters]:.2f} against {sizes[full]:.2f} MiB); {whole} / {adapters} = "
        f"{sizes[whole] / sizes[adapters]:.2f} ({sizes[whole]:.2f} against {sizes[adapters]:.2f} MiB).",
        "What the files hold (tensor bytes): "
        + "; ".join(
            f"{name}: {count} model tensors, {model:.2f} MiB, and {optimizer:.2f} MiB of AdamW state"
            for name, (count, model, optimizer) in parts.items()
        )
        + ". Full fine-tuning's model tensors are the trained denoiser and its frozen reference copy for DPO "
        "(the *reference copy* column); LoRA's are the adapters, the audio attention and its starting values.",
        f"Restores exactly: each of the {full} and {adapters} files, loaded into a freshly built module "
        "(`on_load_checkpoint` then `load_state_dict`, strict; LoRA's frozen base from the recipe's seeded weights), "
        "gives every tensor of the trained module (max difference 0; the full fine-tuning reference copy aside, which "
        "only a resumed run needs).",
        f"Save time: building the checkpoint dict, `torch.save` into memory and the write to "
        f"{filesystem or 'the temporary folder'} (no fsync, so the page cache takes the write, as in training). The "
        "peak memory growth is the serialised copy in memory and what writing it takes; on CPU the memory the "
        "training steps freed before the baseline stays resident and the serialising reuses it, so the growth "
        "shows only what goes beyond that: the file column is the measure of size here.",
        f"What {adapters} trains at the demo size: {split['adapters']:,} adapter parameters and the "
        f"{split['added_trainable']:,} of the audio attention, against {split['backbone']:,} frozen backbone "
        "weights; so the audio attention (trained in full, and kept twice: trained values and starting values) is "
        "most of its file, and the file ratio to full fine-tuning is far above the adapters' share of the weights.",
    ]
    return figure


# --- figure 8: what a judge request costs with the speech and the video in it ---------------------------------------
REAL_GRPO_RECIPE = ROOT / "recipes" / "grpo_flowportrait.yaml"
#: The real-scale clip a request carries: 49 frames of 480x832 at 25 fps, with its 1.96 s of 16 kHz speech.
JUDGE_CLIP = {"frames": 49, "height": 480, "width": 832, "fps": 25.0, "sample_rate": 16000}


def real_scale_clips(n: int) -> tuple[torch.Tensor, dict]:
    """``n`` synthetic clips at the real recipes' size, smooth and moving (what a codec sees in a portrait), with
    speech-like audio and a reference photo."""
    c = JUDGE_CLIP
    g = torch.Generator().manual_seed(0)
    y = torch.linspace(0, 1, c["height"]).view(1, 1, 1, -1, 1)
    x = torch.linspace(0, 1, c["width"]).view(1, 1, 1, 1, -1)
    t = torch.arange(c["frames"]).view(1, -1, 1, 1, 1) / c["fps"]
    phase = torch.rand(n, 1, 3, 1, 1, generator=g) * 6
    videos = 0.5 + 0.4 * torch.sin(9 * x + 5 * y + 3 * t + phase)
    samples = round(c["frames"] / c["fps"] * c["sample_rate"])
    audio = 0.2 * torch.sin(torch.arange(samples) * 0.07).expand(n, -1) * torch.rand(n, 1, generator=g)
    return videos, {"audio": audio, "reference": videos[:, 0]}


def judge_request_step(url: str, videos: torch.Tensor, cond: dict, options: dict, judges: dict, name: str) -> Step:
    """One GRPO step's judge calls for ``videos``: ``OpenAIJudge.score`` with ``options``; nothing re-sent."""
    from prefalign.rewards import OpenAIJudge

    judge = OpenAIJudge(
        model="benchmark-judge", base_url=url, api_key_env=JUDGE_KEY_ENV, timeout=60.0, http_retries=0,
        max_retries=0, max_concurrency=JUDGE_CONCURRENCY, video_fps=JUDGE_CLIP["fps"],
        sample_rate=JUDGE_CLIP["sample_rate"], **options,
    )  # fmt: skip
    judges[name] = judge
    return Step(lambda: judge.score(videos, cond), None, [])


def judge_request(bench: Bench) -> Figure:
    """Figure 8: the cost of a judge that hears: requests with the reference, the video (an mp4 at the clip's rate)
    and the speech, against the image-only judge's 8 stills, over the loopback API."""
    grpo = read_recipe(ROOT / "recipes" / "algorithms" / "grpo.yaml")["init_args"]
    recipe = read_recipe(REAL_GRPO_RECIPE)
    judge_args = grpo["reward"]["init_args"]["terms"][0]["init_args"]
    gpus = recipe["trainer"]["devices"] * recipe["trainer"].get("num_nodes", 1)
    per_step = grpo["group_size"] * recipe["data"]["batch_size"] * gpus
    stills, heard = "image-only: 8 stills", "audio-visual: reference + video + speech"
    n = JUDGE_CONCURRENCY
    figure = Figure(
        name="judge_request",
        title="The judge that hears: request size and throughput, audio-visual vs. image-only",
        description=(
            f"`OpenAIJudge.score` on {n} synthetic clips at the real recipes' size ({JUDGE_CLIP['frames']} frames of "
            f"{JUDGE_CLIP['height']}×{JUDGE_CLIP['width']} at {JUDGE_CLIP['fps']:g} fps, smooth moving patterns, "
            f"{JUDGE_CLIP['frames'] / JUDGE_CLIP['fps']:.2f} s of 16 kHz speech-like audio, the first frame as the "
            f"reference), `max_concurrency={JUDGE_CONCURRENCY}`, against the loopback chat-completions server of "
            f"`grpo_step` answering after {1e3 * JUDGE_DELAY_S:.0f} ms. **{stills}** (baseline): `inputs: [video]`, "
            f"`num_frames: 8`, PNG `image_url` parts (the image-only overlay). **{heard}**: the settings of "
            f"recipes/algorithms/grpo.yaml (`inputs: {judge_args.get('inputs')}`, `max_frames: "
            f"{judge_args.get('max_frames', 32)}`, `video_as: {judge_args.get('video_as')}`, `audio_as: "
            f"{judge_args.get('audio_as')}`): the reference as PNG, the video as an mp4 `video_url` (x264 CRF 18, "
            "veryfast), the speech as a base64 wav `input_audio`. A step scores the clips; the time is the client's "
            "side (sampling, encoding, HTTP) plus the server's fixed delay, not a real judge model's."
        ),
        baseline=stills,
        columns={"request_kib": "request (KiB)", "requests_per_s": "requests/s"},
    )
    videos, cond = real_scale_clips(n)
    sizes: dict[str, list] = {stills: [], heard: []}
    judges: dict = {}
    os.environ[JUDGE_KEY_ENV] = "benchmark-dummy-key"
    for name in ("no_proxy", "NO_PROXY"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
    options = {
        stills: {"inputs": ["video"], "num_frames": 8},
        heard: {k: judge_args[k] for k in ("inputs", "max_frames", "video_as", "audio_as") if k in judge_args},
    }
    with judge_server(JUDGE_DELAY_S, sizes[stills]) as url_stills, judge_server(JUDGE_DELAY_S, sizes[heard]) as url_heard:
        urls = {stills: url_stills, heard: url_heard}
        bench.compare(figure, {name: (lambda name=name: judge_request_step(urls[name], videos, cond, options[name],
                                                                            judges, name)) for name in (stills, heard)})
    if bench.probing:
        return figure
    failed = {name: judge.stats for name, judge in judges.items() if judge.stats["failures"]}
    if failed:
        raise RuntimeError(f"judge_request: the judge got no answer for some videos: {failed}")
    for row in figure.rows:
        name = row["variant"]
        row["request_kib"] = statistics.mean(sizes[name]) / 1024
        row["requests_per_s"] = n / (1e-3 * row["median_ms"])
    rows = {row["variant"]: row for row in figure.rows}
    for name in (stills, heard):
        seconds = per_step / rows[name]["requests_per_s"]
        mib = per_step * rows[name]["request_kib"] / 1024
        figure.notes.append(
            f"{name}: at the recipe's GRPO step ({grpo['group_size']} rollouts × batch {recipe['data']['batch_size']} × "
            f"{gpus} GPUs = {per_step} judged videos) this is {mib:.0f} MiB of requests and {seconds:.1f} s of "
            f"client time per step at these rates (spread over the {gpus} ranks: {seconds / gpus:.1f} s each), "
            "before the judge model's own time."
        )
    return figure


# --- figure 9: what the papers' metrics add to the evaluation of a clip ----------------------------------------------
def paper_metric_nets(folder: Path) -> dict[str, str]:
    """Random weights files in the published layouts (He-normal convolutions, unit BN variances), as a user's
    downloads would sit: the timing does not depend on the values."""
    from prefalign.i3d import InceptionI3D
    from prefalign.inception import FIDInception
    from prefalign.syncnet import SyncNet

    torch.manual_seed(0)
    files = {}
    for option, net in (("syncnet", SyncNet()), ("inception", FIDInception()), ("i3d", InceptionI3D())):
        state = {}
        for key, value in net.state_dict().items():
            if value.dim() > 1:
                value = torch.randn_like(value) * (2 / value[0].numel()) ** 0.5
            elif key.endswith("running_var"):
                value = torch.ones_like(value)
            state[key] = value
        files[option] = str(folder / f"{option}.pt")
        torch.save(state, files[option])
    return files


def paper_metric_step(bench: Bench, batch: dict, metric: str | None, files: dict) -> Step:
    """Scoring the demo batch's clips against their ground truth: the TalkingShapes metrics (``metric`` None), or
    one of the papers' metrics (SyncNet per clip; FID / FVD: the features of the generated and the real clips)."""
    from prefalign import evaluation
    from prefalign.paper_metrics import EvaluationSettings, PaperMetrics

    video = batch["video"].flip(1)  # stands in for generated clips: the ground truth played backwards
    if metric is None:
        return Step(lambda: evaluation.clip_scores(video, batch, 25.0, DEMO_MEL["sample_rate"]), None, [])
    settings = EvaluationSettings(metrics=[metric], **files)
    paper = PaperMetrics(settings, [metric], 25.0, DEMO_MEL["sample_rate"]).to(bench.device)

    def run():
        paper.reset()
        return paper.clip_scores(video, batch)

    nets = [m.network for m in (paper.fid, paper.fvd) if m is not None and hasattr(m, "network")]
    return Step(run, None, [p for net in nets for p in net.parameters()])


def paper_metrics(bench: Bench) -> Figure:
    """Figure 9: the time the papers' metrics add to the evaluation of a clip, next to the TalkingShapes metrics."""
    base, sync, fid, fvd = "TalkingShapes metrics", "Sync-C / Sync-D (SyncNet)", "FID (Inception)", "FVD (I3D)"
    b = DEMO_DATA["batch_size"]
    figure = Figure(
        name="paper_metrics",
        title="The papers' metrics: time per evaluated clip",
        description=(
            f"Scoring the demo batch ({b} TalkingShapes clips of {DEMO_DATA['num_frames']} frames at 32×32 with audio "
            f"and pose; the ground truth played backwards stands in for generated clips) on {bench.device}. "
            f"**{base}** (baseline): `evaluation.clip_scores` (sync, identity, texture, jitter, head offset, SSIM, "
            f"PSNR). **{sync}**: `syncnet_v2` on 224×224 crops from the pose track, 5-frame windows against 0.2 s of "
            f"MFCC, offsets ±15. **{fid}**: FID's InceptionV3 on every frame of the generated and the real clip "
            f"(299×299). **{fvd}**: the Kinetics-400 I3D on the generated and the real clip (224×224). Random "
            "weights in the published layouts (the time does not depend on them); each network at its input size, "
            "so the clips' 32×32 size does not make them cheaper."
        ),
        baseline=base,
        columns={"ms_per_clip": "ms per clip"},
    )
    batch = demo_batch(bench.device)
    folder = Path(tempfile.mkdtemp(prefix="prefalign-bench-metrics-"))
    try:
        files = paper_metric_nets(folder)
        bench.compare(figure, {name: (lambda metric=metric: paper_metric_step(bench, batch, metric, files))
                               for name, metric in ((base, None), (sync, "sync_c"), (fid, "fid"), (fvd, "fvd"))})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for row in figure.rows:
        row["ms_per_clip"] = row["median_ms"] / b
    figure.notes.append("ms per clip: the step's median over the batch's clips; FID and FVD count the generated and "
                        "the real clip of each pair.")
    return figure


FIGURES: list[Callable[[Bench], Figure]] = [
    sft_step,
    dpo_step,
    backbone_step,
    grpo_step,
    refree_step,
    data_step,
    checkpoint_save,
    judge_request,
    paper_metrics,
]


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
        (
            f"- Machine: {m['cpu']}; {m['cpus_usable']} of {m['cpu_count']} CPUs usable, "
            f"torch threads: {m['torch_threads']}; {m['platform']}."
        ),
        f"- Software: Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}.",
        f"- Device: {m['device']}"
        + (f" ({m['gpu']}, CUDA {m['cuda']})" if "gpu" in m else "")
        + f", {m['precision']}.",
        (
            f"- Load average (1 min) at start {s['load_start']:.2f}, at end {s['load_end']:.2f}; "
            f"{s['warmup']} warm-up and {s['repeats']} timed steps per variant, interleaved."
        ),
    ]
    if s["quick"]:
        lines.append("- **A `--quick` run**: too few steps to be a figure; it checks that the harness runs.")
    for fig in report["figures"]:
        lines += ["", f"## {fig['title']}", ""]
        if "run" in fig:
            lines += [earlier_run(fig["run"]), ""]
        lines += [fig["description"], ""]
        ideal = fig.get("ideal") or {}
        targets = fig.get("targets") or {}
        columns = fig.get("columns") or {}
        reference = any(row.get("reference_mib") for row in fig["rows"])
        header = ["variant", "median step (ms)", "IQR (ms)", f"ratio to {fig['baseline']} (IQR)"]
        header += ["ideal ratio"] if ideal else []
        header += ["target ratio"] if targets else []
        header += list(columns.values())
        header += ["peak memory growth (MiB)", "weights + AdamW state (MiB)"]
        header += ["reference copy (MiB)"] if reference else []
        header += ["parameters (trainable, share)"]
        lines += ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        for row in fig["rows"]:
            bound = " (upper bound)" if row.get("peak_is_upper_bound") else ""
            cells = [
                row["variant"],
                f"{row['median_ms']:.1f}",
                f"{row['q1_ms']:.1f}–{row['q3_ms']:.1f}",
                f"{row['ratio']:.2f} ({row['ratio_q1']:.2f}–{row['ratio_q3']:.2f})",
            ]
            cells += [f"{ideal[row['variant']]:.2f}" if row["variant"] in ideal else ""] if ideal else []
            cells += [f"≤ {targets[row['variant']]:.2f}" if row["variant"] in targets else ""] if targets else []
            cells += [f"{row[key]:.2f}" if key in row else "" for key in columns]
            cells += [
                f"{row['peak_growth_mib']:.1f}{bound}",
                f"{row['weights_mib'] + row['optimizer_state_mib']:.1f}",
            ]
            cells += [f"{row.get('reference_mib', 0.0):.1f}"] if reference else []
            cells += [
                f"{row['parameters']:,} ({row['trainable']:,}, {100 * row['trainable'] / row['parameters']:.1f}%)"
                if row["parameters"]
                else "—"  # a variant without a model (the judge's client)
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += [
            f"- **{r['variant']} / {r['against']}**: step time {r['ratio']:.2f} ({r['ratio_q1']:.2f}–"
            f"{r['ratio_q3']:.2f}), the median over rounds of the one's step time over the other's in the same round "
            "(and its IQR)" + (f"; peak memory growth {r['memory_ratio']:.2f}." if "memory_ratio" in r else ".")
            for r in fig.get("ratios", [])
        ]
        lines += [
            f"- **{name}** {'meets' if row['ratio'] <= target else 'misses'} its target: ratio {row['ratio']:.2f} "
            f"to {fig['baseline']}, target ≤ {target:.2f}."
            for row in fig["rows"]
            for name, target in targets.items()
            if row["variant"] == name
        ]
        lines += [
            "- Ratio: the median over rounds of the variant's step time over the baseline's in the same round.",
            f"- Peak memory growth: {fig['memory_method']}.",
        ]
        if reference:
            lines.append(
                "- Reference copy: the bytes of the tensors kept only for the reference policy, on top of the "
                "weights (not part of the growth, since they exist before the first step)."
            )
        lines += [f"- {note}" for note in fig["notes"]]
    return "\n".join(lines) + "\n"


def earlier_run(run: dict) -> str:
    """One line naming the earlier run a figure was kept from (when ``--only`` redid other figures)."""
    m, s = run["machine"], run["settings"]
    return (
        f"*Kept from an earlier run:* `{s['command']}` — {run['date']}, revision {m['revision']}; {m['cpu']}, "
        f"torch threads: {m['torch_threads']}; {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f", {m['precision']}; load average {s['load_start']:.2f} at start, {s['load_end']:.2f} at end; "
        f"{s['warmup']} warm-up and {s['repeats']} timed steps"
        + (" (**`--quick`**: not a figure)" if s["quick"] else "")
        + "."
    )


def keep_earlier_figures(path: Path, fresh: list[dict]) -> list[dict]:
    """The figures of this run, and those of the earlier report at ``path`` that this run did not redo, each kept
    with the run (date, machine, settings) that made it; in the order of ``FIGURES``."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return fresh
    done = {fig["name"] for fig in fresh}
    kept = [
        {**fig, "run": fig.get("run") or {key: earlier[key] for key in ("date", "machine", "settings")}}
        for fig in earlier.get("figures", [])
        if fig["name"] not in done
    ]
    for fig in kept:
        print(f"kept {fig['name']} from the earlier run in {path}", file=sys.stderr)
    order = [f.__name__ for f in FIGURES]
    return sorted(fresh + kept, key=lambda fig: order.index(fig["name"]) if fig["name"] in order else len(order))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
        "--only",
        nargs="+",
        metavar="FIGURE",
        help=f"figures to run, of {[f.__name__ for f in FIGURES]}; the other figures of an earlier report at "
        "--out are kept, each with the run that made it",
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


def main(argv: list[str] | None = None) -> dict:
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
    if args.only:
        report["figures"] = keep_earlier_figures(args.out.with_suffix(".json"), report["figures"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(report)
    args.out.write_text(markdown)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
