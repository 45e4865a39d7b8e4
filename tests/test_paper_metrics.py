"""The papers' metrics inside ``prefalign test`` and validation: settings, missing weights, and a whole run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prefalign.data.synthetic import TalkingShapesConfig, write_dataset
from prefalign.evaluation import EvaluationTable
from prefalign.paper_metrics import EvaluationSettings, PaperMetrics

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "recipes" / "demo" / "sft.yaml"


def random_weights(tmp_path: Path) -> dict[str, str]:
    """Random weights files in the published layouts of SyncNet, FID's Inception and I3D (never downloaded)."""
    from prefalign.i3d import InceptionI3D
    from prefalign.inception import FIDInception
    from prefalign.syncnet import SyncNet

    torch.manual_seed(0)
    files = {}
    for option, net in (("syncnet", SyncNet()), ("inception", FIDInception()), ("i3d", InceptionI3D())):
        state = {}
        for key, value in net.state_dict().items():  # He-normal convolutions: features that vary with the input
            if value.dim() > 1:
                fan_in = value[0].numel()
                value = torch.randn_like(value) * (2 / fan_in) ** 0.5
            elif key.endswith("running_var"):
                value = torch.ones_like(value)
            state[key] = value
        path = tmp_path / f"{option}.pt"
        torch.save(state, path)
        files[option] = str(path)
    return files


def test_unknown_metrics_and_bad_settings_are_refused_with_the_allowed_names():
    with pytest.raises(ValueError, match=r"unknown metrics \['lse'\]; allowed: \['fid', 'fvd', 'sync_c', 'sync_d'\]"):
        EvaluationSettings(metrics=["lse"])
    with pytest.raises(ValueError, match="val_metrics must be a list"):
        EvaluationSettings(val_metrics="fid")
    with pytest.raises(ValueError, match="batch_size"):
        EvaluationSettings(batch_size=0)


@pytest.mark.parametrize("metric,option", [("sync_c", "syncnet"), ("fid", "inception"), ("fvd", "i3d")])
def test_a_metric_without_its_weights_fails_at_setup_naming_the_option(metric, option, tmp_path):
    with pytest.raises(ValueError, match=f"model.evaluation.{option} is not set"):
        PaperMetrics(EvaluationSettings(metrics=[metric]), [metric], 25.0, 16000)
    settings = EvaluationSettings(metrics=[metric], **{option: str(tmp_path / "missing.pt")})
    with pytest.raises(FileNotFoundError, match=f"model.evaluation.{option}"):
        PaperMetrics(settings, [metric], 25.0, 16000)


def test_set_metrics_join_the_summary_without_a_per_clip_column():
    table = EvaluationTable()
    table.add(["a", "b"], {"sync": torch.tensor([0.5, 0.7])})
    table.add_set_scores({"fid": (12.5, 2)})
    summary = table.summary()
    assert summary["fid"]["mean"] == 12.5 and summary["fid"]["count"] == 2 and math.isnan(summary["fid"]["std"])
    assert "fid" not in table.columns


@pytest.mark.slow
def test_prefalign_test_on_the_demo_writes_the_papers_metrics(tmp_path, monkeypatch):
    """`prefalign test` on the demo model with Sync-C, Sync-D, FID and FVD (random weights in the published layouts:
    the values mean nothing, the run and the table do)."""
    from prefalign.cli import main

    monkeypatch.chdir(tmp_path)
    data = write_dataset(tmp_path / "data", num_clips=3, seed=0, cfg=TalkingShapesConfig())
    weights = random_weights(tmp_path)
    out = tmp_path / "evaluation"
    main(["test", "--config", str(DEMO), "--data.test", str(data), "--data.eval_batch_size", "3",
          "--model.sampling.num_steps", "1", "--model.evaluation_dir", str(out),
          "--model.evaluation.metrics", "[sync_c, sync_d, fid, fvd]",
          *(arg for option, path in weights.items() for arg in (f"--model.evaluation.{option}", path))])
    table = json.loads((out / "metrics.json").read_text())
    for name in ("sync_c", "sync_d"):
        values = [clip[name] for clip in table["clips"]]
        assert len(values) == 3 and all(math.isfinite(v) for v in values)
        assert table["metrics"][name]["count"] == 3
    assert table["metrics"]["sync_c"]["mean"] >= 0  # the median minus the minimum
    for name in ("fid", "fvd"):
        assert table["metrics"][name]["count"] == 3 and math.isfinite(table["metrics"][name]["mean"])
        assert table["metrics"][name]["mean"] > 1e-3  # an untrained model's clips are not the ground truth
    summary = (out / "summary.csv").read_text()
    assert "\nfid," in summary and "\nfvd," in summary and "\nsync_c," in summary


def tiny_clips(n: int, frames: int = 9, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    truth = torch.rand(n, frames, 3, 32, 32, generator=g)
    return truth.flip(1), {"video": truth, "audio": torch.randn(n, frames * 640, generator=g) * 0.1,
                           "id": [f"clip{i}" for i in range(n)]}


def test_fvd_counts_each_clip_once_and_is_nan_with_one_clip(tmp_path):
    weights = random_weights(tmp_path)
    paper = PaperMetrics(EvaluationSettings(metrics=["fvd"], i3d=weights["i3d"]), ["fvd"], 25.0, 16000)
    video, batch = tiny_clips(1)
    paper.clip_scores(video, batch)
    value, count = paper.set_scores()["fvd"]
    assert math.isnan(value) and count == 1  # one clip: no covariance, no error
    video, batch = tiny_clips(3)
    paper.clip_scores(video, batch)  # clip0 again (as DistributedSampler's padding repeats clips), then two more
    value, count = paper.set_scores()["fvd"]
    assert count == 3 and math.isfinite(value)
    once = PaperMetrics(EvaluationSettings(metrics=["fvd"], i3d=weights["i3d"]), ["fvd"], 25.0, 16000)
    once.clip_scores(video, batch)
    assert once.set_scores()["fvd"][0] == pytest.approx(value)  # the repeated clip changed nothing


def test_sync_scores_crop_the_frame_for_a_pose_layout_without_face_points(tmp_path):
    weights = random_weights(tmp_path)
    paper = PaperMetrics(EvaluationSettings(metrics=["sync_c"], syncnet=weights["syncnet"]), ["sync_c"], 25.0, 16000)
    video, batch = tiny_clips(1, frames=9)
    batch["pose"] = torch.rand(1, 9, 18, 2)  # OpenPose body: no face points SyncNet knows
    scores = paper.clip_scores(video, batch)
    assert scores["sync_c"].shape == (1,) and paper.crop_source == "frame"
