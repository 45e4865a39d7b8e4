"""Figure ``paper_metrics``: the time the papers' metrics (Sync-C / Sync-D, FID, FVD) add to the evaluation of a
clip, next to the TalkingShapes metrics."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.figures.common import SFT_RECIPE, demo_batch, from_recipe
from benchmarks.harness import Bench, Figure, Step
from prefalign import evaluation
from prefalign.data.datamodule import PortraitDataModule
from prefalign.i3d import InceptionI3D
from prefalign.inception import FIDInception
from prefalign.paper_metrics import EvaluationSettings, PaperMetrics
from prefalign.syncnet import SyncNet

BASE, SYNC, FID, FVD = "TalkingShapes metrics", "Sync-C / Sync-D (SyncNet)", "FID (Inception)", "FVD (I3D)"


def paper_metric_nets(folder: Path) -> dict[str, str]:
    """Random weights files in the published layouts (He-normal convolutions, unit BN variances), as a user's
    downloads would sit: the timing does not depend on the values."""
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


def paper_metric_step(bench: Bench, batch: dict, data: PortraitDataModule, metric: str | None, files: dict) -> Step:
    """Scoring the demo batch's clips against their ground truth: the TalkingShapes metrics (``metric`` None), or
    one of the papers' metrics (SyncNet per clip; FID / FVD: the features of the generated and the real clips)."""
    video = batch["video"].flip(1)  # stands in for generated clips: the ground truth played backwards
    if metric is None:
        return Step(lambda: evaluation.clip_scores(video, batch, data.fps, data.sample_rate), None, [])
    settings = EvaluationSettings(metrics=[metric], **files)
    paper = PaperMetrics(settings, [metric], data.fps, data.sample_rate).to(bench.device)

    def run():
        paper.reset()
        return paper.clip_scores(video, batch)

    nets = [m.network for m in (paper.fid, paper.fvd) if m is not None and hasattr(m, "network")]
    return Step(run, None, [p for net in nets for p in net.parameters()])


def figure(bench: Bench) -> Figure:
    """The time the papers' metrics add to the evaluation of a clip, next to the TalkingShapes metrics."""
    data = from_recipe(SFT_RECIPE)[1]  # the demo batch's size, clip length, frame and sample rates
    b = data.batch_size
    figure = Figure(
        name="paper_metrics",
        title="The papers' metrics: time per evaluated clip",
        description=(
            f"Scoring the demo batch ({b} TalkingShapes clips of {data.num_frames} frames at 32×32 with audio "
            f"and pose; the ground truth played backwards stands in for generated clips) on {bench.device}. "
            f"**{BASE}** (baseline): `evaluation.clip_scores` (sync, identity, texture, jitter, head offset, SSIM, "
            f"PSNR). **{SYNC}**: `syncnet_v2` on 224×224 crops from the pose track, 5-frame windows against 0.2 s of "
            f"MFCC, offsets ±15. **{FID}**: FID's InceptionV3 on every frame of the generated and the real clip "
            f"(299×299). **{FVD}**: the Kinetics-400 I3D on the generated and the real clip (224×224). Random "
            "weights in the published layouts (the time does not depend on them); each network at its input size, "
            "so the clips' 32×32 size does not make them cheaper."
        ),
        baseline=BASE,
        columns={"ms_per_clip": "ms per clip"},
    )
    batch = demo_batch(bench.device, data)
    folder = Path(tempfile.mkdtemp(prefix="prefalign-bench-metrics-"))
    try:
        files = paper_metric_nets(folder)
        bench.compare(figure, {name: (lambda metric=metric: paper_metric_step(bench, batch, data, metric, files))
                               for name, metric in ((BASE, None), (SYNC, "sync_c"), (FID, "fid"), (FVD, "fvd"))})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for row in figure.rows:
        row["ms_per_clip"] = row["median_ms"] / b
    figure.notes.append("ms per clip: the step's median over the batch's clips; FID and FVD count the generated and "
                        "the real clip of each pair.")
    return figure
