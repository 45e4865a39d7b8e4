"""The benchmark harness: times a figure's variants in interleaved rounds, measures each one's peak memory in a fresh
process, and writes the report (markdown and JSON). The figures are in ``benchmarks/figures/``, the command line in
``benchmarks/run.py``; benchmarks/README.md says how variants are timed and memory is measured.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ENTRY = Path(__file__).resolve().with_name("run.py")  # what a memory probe runs, in a fresh process
MIB = 2**20
PROBE_TAG = "MEMORY-PROBE "  # marks the result line a memory-probe subprocess prints


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
        command = [sys.executable, str(ENTRY), "--device", str(self.device)]
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


# --- statistics and memory ------------------------------------------------------------------------------------------
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


# --- the report ---------------------------------------------------------------------------------------------------
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
        lines += figure_table(fig)
        lines.append("")
        lines += figure_notes(fig)
    return "\n".join(lines) + "\n"


def figure_table(fig: dict) -> list[str]:
    """The markdown table of a figure: a row per variant."""
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
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
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
    return lines


def figure_notes(fig: dict) -> list[str]:
    """The notes under a figure's table: the paired ratios, the targets, how to read the columns, its own notes."""
    targets = fig.get("targets") or {}
    lines = [
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
    if any(row.get("reference_mib") for row in fig["rows"]):
        lines.append(
            "- Reference copy: the bytes of the tensors kept only for the reference policy, on top of the "
            "weights (not part of the growth, since they exist before the first step)."
        )
    return lines + [f"- {note}" for note in fig["notes"]]


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


def keep_earlier_figures(path: Path, fresh: list[dict], order: list[str]) -> list[dict]:
    """The figures of this run, and those of the earlier report at ``path`` that this run did not redo, each kept
    with the run (date, machine, settings) that made it; in the report's ``order`` of figure names."""
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
    return sorted(fresh + kept, key=lambda fig: order.index(fig["name"]) if fig["name"] in order else len(order))


def write_report(report: dict, out: Path) -> None:
    """The report as markdown at ``out`` (also printed) and as JSON next to it, with every step time."""
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(report)
    out.write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)


def run_figures(bench: Bench, figures: dict[str, Callable[[Bench], Figure]], command: str, quick: bool) -> dict:
    """Run ``figures`` (name -> figure function) in turn; the report: date, machine, settings and the figures."""
    load_start = os.getloadavg()[0]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if bench.device.type == "cpu" and load_start + torch.get_num_threads() > cpus + 0.5:
        print(
            f"warning: load average {load_start:.1f} with {torch.get_num_threads()} threads on {cpus} CPUs: other work "
            "is running, so absolute times will be inflated (ratios suffer less); consider --threads",
            file=sys.stderr,
        )
    results = []
    for name, figure in figures.items():
        print(f"{name} ...", file=sys.stderr, flush=True)
        results.append(figure(bench))
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(bench),
        "settings": {
            "command": command,
            "warmup": bench.warmup,
            "repeats": bench.repeats,
            "memory_steps": bench.memory_steps,
            "quick": quick,
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
        },
        "figures": [{**asdict(f), "memory_method": bench.memory_method} for f in results],
    }
