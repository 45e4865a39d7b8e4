"""Evaluation building blocks: SSIM and PSNR against formulas, per-clip scores of real batches with real rewards,
the evaluation table's files read back, the sample grid's layout, and the training-curve plot and callback."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import socket
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from prefalign import evaluation, metrics, plots
from prefalign.callbacks import TrainingCurves
from prefalign.data import media
from prefalign.data.synthetic import TalkingShapesConfig
from prefalign.evaluation import EvaluationTable, clip_scores, sample_grid
from prefalign.rewards import CompositeReward, JitterPenalty, OpenAIJudge, SyncExpert, TextureReward

CFG = TalkingShapesConfig()
C1 = 0.01**2  # SSIM's (k1 · data range)²


# --- SSIM and PSNR --------------------------------------------------------------------------------------------------
def test_psnr_of_a_constant_offset_is_the_formula_and_infinite_for_a_copy() -> None:
    target = torch.rand(3, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    offsets = torch.tensor([0.1, 0.02, 0.3])
    video = target + offsets.view(3, 1, 1, 1, 1)
    expected = -20 * torch.log10(offsets)  # 10·log10(1 / d²)
    torch.testing.assert_close(metrics.psnr(video, target), expected, rtol=0, atol=1e-4)
    assert metrics.psnr(target, target).isinf().all()


def test_psnr_is_the_clips_mse_not_the_mean_of_frame_psnrs() -> None:
    target = torch.full((1, 2, 3, 8, 8), 0.5)
    video = target.clone()
    video[:, 1] += 0.1  # frame 0 exact, frame 1 off by 0.1: MSE 0.005 over the clip
    torch.testing.assert_close(metrics.psnr(video, target), torch.tensor([10 * math.log10(1 / 0.005)]), rtol=0,
                               atol=1e-4)


def test_ssim_of_constant_frames_is_the_luminance_formula_averaged_over_frames() -> None:
    # Flat frames have no variance, so SSIM reduces to (2ab + C1) / (a² + b² + C1).
    target = torch.full((2, 4, 3, 16, 16), 0.4)
    video = target.clone()
    video[0] = 0.6
    video[1, :2] = 0.6  # half the frames match exactly
    pair = (2 * 0.4 * 0.6 + C1) / (0.4**2 + 0.6**2 + C1)
    torch.testing.assert_close(metrics.ssim(video, target), torch.tensor([pair, (pair + 1) / 2]), rtol=0, atol=1e-5)


def test_ssim_is_one_for_a_copy_and_falls_with_noise(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 5, 3, 24, 24, generator=generator)
    torch.testing.assert_close(metrics.ssim(target, target), torch.ones(2), rtol=0, atol=1e-5)
    noise = torch.randn(target.shape, generator=generator)
    scores = [metrics.ssim((target + sigma * noise).clamp(0, 1), target) for sigma in (0.01, 0.05, 0.2, 0.5)]
    for less, more in zip(scores, scores[1:]):
        assert (more < less).all()
    assert (scores[0] < 1).all()
    # Frames go through torchmetrics in chunks; the chunk size must not change the result.
    monkeypatch.setattr(metrics, "SSIM_CHUNK", 3)
    torch.testing.assert_close(metrics.ssim((target + 0.05 * noise).clamp(0, 1), target), scores[1])


def test_ssim_and_psnr_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differs"):
        metrics.ssim(torch.rand(1, 2, 3, 8, 8), torch.rand(1, 3, 3, 8, 8))
    with pytest.raises(ValueError, match="expected video"):
        metrics.psnr(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))


# --- clip_scores ----------------------------------------------------------------------------------------------------
BASE = {"sync", "identity", "texture"}
WITH_TRUTH = {"jitter", "head_offset", "sync_ground_truth", "ssim", "psnr"}


def _noisy(video: torch.Tensor, sigma: float = 0.05) -> torch.Tensor:
    noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(1))
    return (video + sigma * noise).clamp(0, 1)


def _two_clips(batch: dict) -> dict:
    """The batch's first two clips: SSIM runs in float64, slow on a CPU."""
    return {key: value[:2] for key, value in batch.items() if key in ("id", "video", "audio", "reference", "pose")}


def _score(video, batch, rewards=None):
    return clip_scores(video, batch, fps=CFG.fps, sample_rate=CFG.sample_rate, rewards=rewards)


def test_clip_scores_keys_follow_the_batch(clip_batch) -> None:
    clip_batch = _two_clips(clip_batch)
    video = _noisy(clip_batch["video"])
    full = _score(video, clip_batch)
    assert set(full) == BASE | WITH_TRUTH | {"sync_pose_box", "jitter_outside_mouth"}
    for value in full.values():
        assert value.shape == (2,) and torch.isfinite(value).all()
    without_pose = {key: value for key, value in clip_batch.items() if key != "pose"}
    assert set(_score(video, without_pose)) == BASE | WITH_TRUTH
    without_truth = {key: value for key, value in clip_batch.items() if key != "video"}
    assert set(_score(video, without_truth)) == BASE | {"sync_pose_box"}
    # The ground truth itself: a perfect copy, as sharp as it is.
    truth = _score(clip_batch["video"], clip_batch)
    torch.testing.assert_close(truth["ssim"], torch.ones(2), rtol=0, atol=1e-12)
    assert truth["psnr"].isinf().all() and (truth["jitter"] == 0).all() and (truth["head_offset"] == 0).all()
    assert (truth["jitter_outside_mouth"] == 0).all() and (full["jitter_outside_mouth"] > 0).all()
    assert torch.equal(truth["sync"], truth["sync_ground_truth"])
    assert (full["ssim"] < 1).all() and torch.isfinite(full["psnr"]).all()


def test_clip_scores_add_every_reward_term(clip_batch) -> None:
    clip_batch = _two_clips(clip_batch)
    video = _noisy(clip_batch["video"])
    sync = SyncExpert(sample_rate=CFG.sample_rate, fps=CFG.fps)
    rewards = [sync, CompositeReward([TextureReward(), JitterPenalty()])]
    scores = _score(video, clip_batch, rewards)
    assert set(scores) == BASE | WITH_TRUTH | {"sync_pose_box", "jitter_outside_mouth", "reward/sync", "reward/texture",
                                               "reward/jitter"}
    assert torch.equal(scores["reward/sync"], scores["sync"])  # the same expert, without the pose box
    assert torch.equal(scores["reward/texture"], scores["texture"])
    assert (scores["reward/jitter"] < 0).all()  # noise adds jitter over the ground truth's
    with pytest.raises(ValueError, match="two rewards give the term 'sync'"):
        _score(video, clip_batch, [SyncExpert(), SyncExpert(use_pose=True)])
    with pytest.raises(TypeError, match="Reward instances"):
        _score(video, clip_batch, [lambda video, batch: {}])


def test_clip_scores_keep_a_dropped_judge_sample_as_nan(clip_batch) -> None:
    clip_batch = _two_clips(clip_batch)
    with socket.socket() as probe:  # a port nothing listens on: every request is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = OpenAIJudge(model="judge", base_url=f"http://127.0.0.1:{port}/v1", api_key_env="PREFALIGN_TEST_NO_KEY",
                        timeout=0.5, http_retries=0, max_retries=0, max_concurrency=1, num_frames=2, on_failure="drop")
    scores = _score(_noisy(clip_batch["video"]), clip_batch, [judge])
    assert scores["reward/judge_valid"].tolist() == [0.0, 0.0]
    for term in judge.aspect_terms:
        assert scores[f"reward/{term}"].isnan().all()
    assert torch.isfinite(scores["sync"]).all()


# --- EvaluationTable ------------------------------------------------------------------------------------------------
def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    return header, rows


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_evaluation_table_writes_exact_values_and_drops_padded_repeats(tmp_path) -> None:
    first = {"sync": torch.tensor([0.1, 0.7, float("nan")]), "psnr": torch.tensor([21.123456789, 30.5, float("inf")])}
    second = {"sync": torch.tensor([-0.3, 0.25]), "psnr": torch.tensor([18.0, 99.0])}
    table = EvaluationTable()
    table.add(["a", "b", "c"], first)
    table.add(["d", "a"], second)  # "a" again: DistributedSampler's padding
    table.add(["e"], {"reward/judge/sync": torch.tensor([0.75])})
    assert len(table) == 5 and table.repeated_ids == 1
    expected = {
        "a": {"psnr": first["psnr"][0].item(), "sync": first["sync"][0].item()},
        "b": {"psnr": 30.5, "sync": first["sync"][1].item()},
        "c": {"psnr": math.inf, "sync": math.nan},
        "d": {"psnr": 18.0, "sync": second["sync"][0].item()},
        "e": {"reward/judge/sync": 0.75},
    }
    table.write(tmp_path / "eval")

    header, rows = _read_csv(tmp_path / "eval" / "metrics.csv")
    assert header == ["id", "psnr", "reward/judge/sync", "sync"]
    assert [row[0] for row in rows] == ["a", "b", "c", "d", "e"]
    for row in rows:
        for column, cell in zip(header[1:], row[1:]):
            if column not in expected[row[0]]:
                assert cell == ""
            else:
                assert _same(float(cell), expected[row[0]][column]), (row[0], column, cell)

    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [clip["id"] for clip in written["clips"]] == ["a", "b", "c", "d", "e"]
    for clip in written["clips"]:
        values = {key: value for key, value in clip.items() if key != "id"}
        assert values.keys() == expected[clip["id"]].keys()
        assert all(_same(values[key], expected[clip["id"]][key]) for key in values)

    syncs = [expected[k]["sync"] for k in "abd"]  # c's NaN is left out
    mean = sum(syncs) / 3
    summary = written["metrics"]
    assert summary["sync"]["count"] == 3
    assert summary["sync"]["mean"] == pytest.approx(mean, rel=1e-15)
    assert summary["sync"]["std"] == pytest.approx(math.sqrt(sum((s - mean) ** 2 for s in syncs) / 3), rel=1e-12)
    assert summary["psnr"]["count"] == 4 and summary["psnr"]["mean"] == math.inf
    assert summary["reward/judge/sync"] == {"mean": 0.75, "std": 0.0, "count": 1}
    assert table.summary()["sync"] == summary["sync"]

    header, rows = _read_csv(tmp_path / "eval" / "summary.csv")
    assert header == ["metric", "mean", "std", "count"]
    assert [row[0] for row in rows] == ["psnr", "reward/judge/sync", "sync"]
    sync_row = rows[2]
    assert float(sync_row[1]) == summary["sync"]["mean"] and float(sync_row[2]) == summary["sync"]["std"]
    assert int(sync_row[3]) == 3
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["metrics.csv", "metrics.json", "summary.csv"]


def test_evaluation_table_all_nan_metric_and_bad_input() -> None:
    table = EvaluationTable()
    table.add(["a", "b"], {"judge": torch.tensor([float("nan")] * 2)})
    stats = table.summary()["judge"]
    assert stats["count"] == 0 and math.isnan(stats["mean"]) and math.isnan(stats["std"])
    with pytest.raises(ValueError, match="one per id"):
        table.add(["c", "d"], {"sync": torch.zeros(3)})
    with pytest.raises(ValueError, match="'id'"):
        table.add(["c"], {"id": torch.zeros(1)})


def test_tables_of_several_ranks_merge_in_rank_order_keeping_first_rows() -> None:
    rank0, rank1 = EvaluationTable(), EvaluationTable()
    rank0.add(["a", "c"], {"sync": torch.tensor([0.5, 0.25])})
    rank1.add(["b", "a"], {"sync": torch.tensor([0.75, -1.0])})  # "a" padded in, scored in another batch
    merged = EvaluationTable.from_gathered([rank0, rank1])
    assert merged.rows() == [{"id": "a", "sync": 0.5}, {"id": "c", "sync": 0.25}, {"id": "b", "sync": 0.75}]
    assert merged.repeated_ids == 1
    assert rank0.gather() is rank0  # not distributed: the table itself
    assert len(rank0) == 2  # merging copied, it did not change the inputs


# --- sample_grid ----------------------------------------------------------------------------------------------------
def _levels(shape, start: int) -> torch.Tensor:
    """Values on the uint8 grid (k / 255), so that the picture holds them exactly."""
    count = int(np.prod(shape))
    return (torch.arange(start, start + count) % 256).float().div(255).view(shape)


def _uint8(image: torch.Tensor) -> np.ndarray:
    return (image * 255).round().byte().permute(1, 2, 0).numpy()


def test_sample_grid_places_reference_frames_and_ground_truth(tmp_path) -> None:
    height, width, sep = 8, 10, evaluation.SEPARATOR
    videos = _levels((2, 5, 3, height, width), 0)
    references = torch.stack([torch.full((3, height, width), 0.2), torch.full((3, height, width), 0.8)])
    targets = _levels((2, 5, 3, height, width), 100)
    grid = sample_grid(videos, tmp_path / "grid.png", frames=3, references=references, targets=targets)

    assert grid.dtype == np.uint8 and grid.shape == (2 * height + sep, width + sep + 3 * width + sep + 3 * width, 3)
    np.testing.assert_array_equal(media.read_image(tmp_path / "grid.png"), grid)
    for row in range(2):
        top = row * (height + sep)
        cell = grid[top : top + height]
        np.testing.assert_array_equal(cell[:, :width], _uint8(references[row]))
        for column, frame in enumerate((0, 2, 4)):  # evenly spaced, first and last included
            left = width + sep + column * width
            np.testing.assert_array_equal(cell[:, left : left + width], _uint8(videos[row, frame]))
            left += 3 * width + sep
            np.testing.assert_array_equal(cell[:, left : left + width], _uint8(targets[row, frame]))
    assert (grid[height : height + sep] == 255).all()  # between the rows
    assert (grid[:, width : width + sep] == 255).all()  # between the reference and the samples


def test_sample_grid_takes_lists_labels_and_rejects_bad_input() -> None:
    videos = [_levels((4, 3, 8, 8), 0), _levels((6, 3, 8, 8), 50)]  # clips may differ in length
    plain = sample_grid(videos, frames=2)
    assert plain.shape == (8 + 8 + evaluation.SEPARATOR, 16, 3)
    np.testing.assert_array_equal(plain[:8, 8:], _uint8(videos[0][3]))
    labelled = sample_grid(videos, frames=2, labels=["clip_a", "clip_b"])
    band = labelled.shape[1] - plain.shape[1]
    assert band > 0 and (labelled[:8, :band] < 128).any()  # the text
    np.testing.assert_array_equal(labelled[:, band:], plain)
    with pytest.raises(ValueError, match="frames must be between 1"):
        sample_grid(videos, frames=5)
    with pytest.raises(ValueError, match="target"):
        sample_grid(videos, frames=2, targets=[videos[0], videos[0]])
    with pytest.raises(ValueError, match="references"):
        sample_grid(videos, frames=2, references=torch.rand(2, 3, 4, 4))


# --- training curves ------------------------------------------------------------------------------------------------
def _write_metrics(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = sorted({column for row in rows for column in row})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


DPO_ROWS = [
    {"epoch": 0, "step": 0, "train/loss": 0.7, "train/implicit_accuracy": 0.5},
    {"epoch": 0, "step": 1, "train/loss": 0.6, "train/implicit_accuracy": 0.6},
    {"epoch": 0, "step": 1, "val/loss": 0.65, "val/sync": 0.4, "val/sync_ground_truth": 0.98, "val/ssim": 0.8},
]


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_plot_training_curves_from_a_folder_or_a_file(tmp_path) -> None:
    metrics_csv = _write_metrics(tmp_path / "run" / "csv" / "version_0" / "metrics.csv", DPO_ROWS)
    out = plots.plot_training_curves(tmp_path / "run")
    assert out == tmp_path / "run" / "curves.png" and min(_png_size(out)) > 100
    beside = plots.plot_training_curves(metrics_csv)
    assert beside == metrics_csv.parent / "curves.png" and beside.is_file()
    titles = [panel[0] for panel in plots.panels_for(plots.read_rows(metrics_csv))]
    assert "DPO implicit accuracy" in titles and "SSIM vs. ground truth (higher is better)" in titles
    assert "GRPO rollout rewards (train)" not in titles and "DPO reward margin" not in titles

    empty = _write_metrics(tmp_path / "empty" / "metrics.csv", [{"epoch": 0}])
    assert plots.plot_training_curves(empty) is None and not (empty.parent / "curves.png").exists()
    with pytest.raises(NotADirectoryError):
        plots.plot_training_curves(tmp_path / "missing")
    (tmp_path / "no_logs").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        plots.plot_training_curves(tmp_path / "no_logs")


def test_plot_run_script_still_plots_and_summarises(tmp_path, capsys) -> None:
    path = Path(__file__).parents[1] / "benchmarks" / "plot_run.py"
    spec = importlib.util.spec_from_file_location("plot_run", path)
    plot_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_run)
    _write_metrics(tmp_path / "run" / "csv" / "version_0" / "metrics.csv", DPO_ROWS)
    out = plot_run.main([str(tmp_path / "run"), "--out", str(tmp_path / "figure.png")])
    assert out == tmp_path / "figure.png" and out.is_file()
    printed = capsys.readouterr().out
    assert "(3 rows)" in printed and "last train/loss (step 1): 0.6000" in printed
    assert "val/sync 0.4000" in printed and f"wrote {out}" in printed
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="error: no metrics.csv"):
        plot_run.main([str(tmp_path / "empty")])


class TinyRegression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(self.layer(inputs), targets)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(12, 4, generator=generator)
        data = torch.utils.data.TensorDataset(inputs, inputs.sum(dim=1, keepdim=True))
        return torch.utils.data.DataLoader(data, batch_size=4)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(max_steps=3, accelerator="cpu", devices=1, log_every_n_steps=1, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_training_curves_callback_draws_the_csv_loggers_curves(tmp_path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    _trainer(logger=logger, callbacks=[TrainingCurves()]).fit(TinyRegression())
    log_dir = Path(logger.log_dir)
    assert len(plots.series(plots.read_rows(log_dir / "metrics.csv"), "train/loss")[0]) == 3
    assert min(_png_size(log_dir / "curves.png")) > 100


def test_training_curves_callback_warns_once_without_a_csv_logger(tmp_path) -> None:
    callback = TrainingCurves()
    trainer = _trainer(logger=False, callbacks=[callback], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="no CSVLogger"):
        trainer.fit(TinyRegression())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_fit_end(trainer, trainer.lightning_module)
    assert not list(tmp_path.rglob("curves.png"))
