"""Checkpoints: adapter-only LoRA files, atomic writes, and resumes that repeat an uninterrupted run exactly."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import fsspec.implementations.local
import lightning as L
import pytest
import torch
import yaml

from prefalign.algorithms import DiffusionDPO
from prefalign.data.datamodule import PortraitDataModule
from prefalign.data.synthetic import TalkingShapesConfig, write_dataset
from prefalign.lora import LoraSettings
from prefalign.module import AlignmentModule
from prefalign.processes import FlowMatching

from conftest import TINY_WAN, TINY_WAN_RECIPE, quiet_trainer, tiny_wan

PREFALIGN = str(Path(sys.executable).with_name("prefalign"))
TESTS = Path(__file__).parent


class KillAt(L.Callback):
    """SIGKILLs its own process when training reaches ``step``: no cleanup, no final checkpoint, like an OOM kill."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def step_losses(trainer) -> str:
    """The step's logged loss, or for GRPO its policy loss and rollout reward, as exact reprs."""
    metrics = trainer.callback_metrics
    return " ".join(repr(metrics[k].item()) for k in ("train/loss", "train/policy_loss", "train/reward") if k in metrics)


class LossLog(L.Callback):
    """Appends ``step loss...`` lines to a file as each step ends (flushed: they survive a SIGKILL); the loss, or for
    GRPO its policy loss and rollout reward."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as handle:
            handle.write(f"{trainer.global_step} {step_losses(trainer)}\n")


def recipe(tmp_path: Path, data: Path, algorithm: dict, lora: bool, max_steps: int, keep_all: bool = False) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "run"),
            "logger": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 3, "save_last": True,
                                  "save_top_k": -1 if keep_all else 0},
                },
            ],
        },
        "model": {
            "denoiser": TINY_WAN_RECIPE,
            "process": {"class_path": "prefalign.processes.FlowMatching"},
            "algorithm": algorithm,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
            "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.LinearLR",
                             "init_args": {"start_factor": 0.1, "total_iters": 5}},
        },
        "data": {"train": str(data), "val_fraction": 0.25, "batch_size": 2, "num_frames": 9},
    }
    if lora:
        config["model"]["lora"] = {"rank": 4}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, losses: Path, *extra: str, log: str = "test_checkpoints.LossLog") -> subprocess.CompletedProcess:
    callbacks = f"[{{class_path: {log}, init_args: {{path: {losses}}}}}]"
    env = dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [PREFALIGN, "fit", "--config", str(config), "--trainer.callbacks+", callbacks, *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def read_losses(path: Path) -> dict[int, str]:
    return {int(step): losses for step, losses in (line.split(maxsplit=1) for line in path.read_text().splitlines())}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    return write_dataset(out, num_clips=8, seed=5, cfg=TalkingShapesConfig(), rejected=("shift", "jitter"))


CASES = {
    # Full fine-tuning SFT: optimizer, LR schedule, RNG (noise, timesteps, dropout) and data position.
    "sft-full": ({"class_path": "prefalign.algorithms.SFT", "init_args": {"cond_dropout": 0.2}}, False),
    # LoRA DPO with a reference refreshed every 4 steps: the lagged snapshot must come back with the checkpoint.
    "dpo-lora-online": ({"class_path": "prefalign.algorithms.DiffusionDPO",
                        "init_args": {"beta": 500.0, "sft_weight": 1.0, "reference_refresh_every": 4}}, True),
    # GRPO (manual optimization): rollout noise from (seed, step, rank), the reward's running statistics.
    "grpo-lora": ({"class_path": "prefalign.algorithms.GRPO",
                  "init_args": {"group_size": 2, "num_steps": 3, "train_fraction": 0.67, "reward": {
                      "class_path": "prefalign.rewards.CompositeReward",
                      "init_args": {"normalize": "running", "terms": [
                          {"class_path": "prefalign.rewards.SyncExpert"},
                          {"class_path": "prefalign.rewards.JitterPenalty"}]}}}}, True),
    # ReFree: its negative generator, self-play cache and lagged reference.
    "refree-lora": ({"class_path": "prefalign.algorithms.ReFree",
                    "init_args": {"beta": 500.0, "refresh_every": 4, "self_play_steps": 2}}, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_and_resume_repeats_the_uninterrupted_losses(case, tmp_path, talkingshapes, pairs):
    algorithm, lora = CASES[case]
    data = pairs if case.startswith("dpo") else talkingshapes
    steps, kill = 11, 8  # 9 training clips, batches of 2: 4 batches an epoch; checkpoints every 3 steps

    whole = tmp_path / "whole"
    whole.mkdir()
    result = fit(recipe(whole, data, algorithm, lora, steps), whole / "losses.txt")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = read_losses(whole / "losses.txt")
    assert sorted(expected) == list(range(1, steps + 1))

    broken = tmp_path / "broken"
    broken.mkdir()
    config = recipe(broken, data, algorithm, lora, steps)
    killer = f"[{{class_path: test_checkpoints.KillAt, init_args: {{step: {kill}}}}}]"
    result = fit(config, broken / "killed.txt", "--trainer.callbacks+", killer)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert sorted(read_losses(broken / "killed.txt")) == list(range(1, kill + 1))
    last = torch.load(broken / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6  # mid-epoch: epoch 1, its second batch done

    result = fit(config, broken / "resumed.txt", "--ckpt_path", str(broken / "ckpt" / "last.ckpt"))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = read_losses(broken / "resumed.txt")
    assert sorted(resumed) == list(range(7, steps + 1))
    assert {step: expected[step] for step in resumed} == resumed  # bit for bit: the losses' reprs are equal


def test_lora_checkpoint_holds_only_what_is_trained(tmp_path, clip_batch):
    def saved(lora):
        module = AlignmentModule(tiny_wan(config=dict(TINY_WAN, num_layers=4, ffn_dim=256)), FlowMatching(),
                                 algorithm=DiffusionDPO(), lora=lora)
        trainer = quiet_trainer(max_steps=1)
        dm = PortraitDataModule(train=str(pairs_path(tmp_path)), val_fraction=0.0, batch_size=2, num_frames=9)
        trainer.fit(module, datamodule=dm)
        path = tmp_path / f"{'lora' if lora else 'full'}.ckpt"
        trainer.save_checkpoint(path)
        return module, path

    full_module, full_path = saved(None)
    lora_module, lora_path = saved(LoraSettings(rank=4))
    ratio = lora_path.stat().st_size / full_path.stat().st_size
    print(f"LoRA / full checkpoint size: {lora_path.stat().st_size} / {full_path.stat().st_size} bytes = {ratio:.3f}")
    assert ratio < 0.3

    state = torch.load(lora_path, weights_only=True)["state_dict"]
    trained = {n for n, p in lora_module.named_parameters() if p.requires_grad}
    assert trained <= set(state)  # every adapter and new-module weight is there...
    base = [k for k in state if k.startswith("denoiser.") and k.removeprefix("denoiser.") not in
            {n.removeprefix("denoiser.") for n in trained}]
    assert not [k for k in base if "base_layer" in k or ".codec." in k]  # ...and no frozen base weight
    assert any(k.startswith("reference_snapshot.") for k in state)

    full = torch.load(full_path, weights_only=True)
    assert not [k for k in full["state_dict"] if k.startswith(("denoiser.codec.", "denoiser.audio_encoder."))]
    assert full["prefalign"]["lora"] is None and full["prefalign"]["algorithm"] == "DiffusionDPO"
    meta = torch.load(lora_path, weights_only=True)["prefalign"]
    assert meta["lora"]["rank"] == 4 and meta["lora"]["target_modules"] and meta["frozen_left_out"] > 0

    # Loading fills the frozen part back in from the model the recipe builds: same predictions.
    fresh = AlignmentModule(tiny_wan(config=dict(TINY_WAN, num_layers=4, ffn_dim=256)), FlowMatching(),
                            algorithm=DiffusionDPO(), lora=LoraSettings(rank=4))
    checkpoint = torch.load(lora_path, weights_only=True)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    for name, value in lora_module.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0, msg=name)


def pairs_path(tmp_path: Path) -> Path:
    out = tmp_path / "pairs"
    if not (out / "manifest.jsonl").exists():
        write_dataset(out, num_clips=4, seed=5, cfg=TalkingShapesConfig(), rejected=("shift",))
    return out / "manifest.jsonl"


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    module = AlignmentModule(tiny_wan(), FlowMatching(), lora=LoraSettings(rank=4))
    trainer = quiet_trainer(max_steps=1)
    dm = PortraitDataModule(train=str(pairs_path(tmp_path)), val_fraction=0.0, batch_size=2, num_frames=9)
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    original = fsspec.implementations.local.LocalFileOpener.write

    def write_half_then_die(self, data):
        original(self, bytes(data)[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "write", write_half_then_die)
    with torch.no_grad():
        next(p for p in module.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt"] == ["last.ckpt"]
