"""Every real-scale recipe × every algorithm file, as written, for 2 steps on tiny checkpoints in the real layouts.

Only what a user would change is overridden: paths (weights, data, the judge's endpoint), the device (CPU) and sizes
(frames, keypoints, heads, steps, group sizes). The recipes keep their precision (bf16-mixed), their bf16 weights,
LoRA settings, optimizer, schedule and the algorithm file's learning rate and clipping. Each run must end with a
finite loss and every trained tensor moved. The algorithm is swapped the way README shows: one value,
``--model.algorithm recipes/algorithms/<name>.yaml``. Then the same on two processes, under DDP and under FSDP (the
CPU shim of tests/cpu_fsdp.py: Lightning's FSDPStrategy, the model wrapped for the CPU).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from test_judge import JudgeServer

pytestmark = pytest.mark.slow  # multi-process or end-to-end runs: make test-slow (CI runs it)

REPO = Path(__file__).parent.parent
TESTS = Path(__file__).parent
PREFALIGN = str(Path(sys.executable).with_name("prefalign"))
RECIPES = ["sft_wan_i2v", "dpo_hallo4", "grpo_flowportrait", "refree_s2v", "sft_svd"]
ALGORITHMS = ["sft", "dpo", "grpo", "refree"]
#: The recipe's own algorithm file (the others are swapped in on the command line).
OWN = {"sft_wan_i2v": "sft", "dpo_hallo4": "dpo", "grpo_flowportrait": "grpo", "refree_s2v": "refree", "sft_svd": "sft"}
#: Sizes of each algorithm, tiny (the recipes' values are for 8 GPUs).
SIZES = {
    "sft": [],
    "dpo": ["--model.algorithm.init_args.group_size", "2", "--model.algorithm.init_args.sample_steps", "2"],
    "grpo": ["--model.algorithm.init_args.group_size", "2", "--model.algorithm.init_args.num_steps", "2"],
    "refree": ["--model.algorithm.init_args.self_play_steps", "2"],
}


class Probe(L.Callback):
    """Writes, as JSON, each step's logged losses and, at the end, which trained tensors moved (and their dtypes)."""

    def __init__(self, path: str):
        self.path = path
        self.start: dict[str, torch.Tensor] = {}
        self.losses: list[dict[str, float]] = []

    def on_train_start(self, trainer, pl_module):
        self.start = {n: p.detach().float().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        self.first_gradients: list[str] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.first_gradients is None:  # the tensors the first step has a gradient for
            self.first_gradients = sorted(n for n, p in pl_module.named_parameters()
                                          if p.requires_grad and p.grad is not None and bool(p.grad.abs().max() > 0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.losses.append({k: metrics[k].item() for k in ("train/loss", "train/policy_loss") if k in metrics})

    def on_train_end(self, trainer, pl_module):
        params = dict(pl_module.named_parameters())
        record = {
            "rank": trainer.global_rank,
            "steps": trainer.global_step,
            "losses": self.losses,
            "lr": trainer.optimizers[0].param_groups[0]["initial_lr"],
            "still": sorted(n for n, before in self.start.items()
                            if params[n].numel() and torch.equal(params[n].detach().float().cpu(), before)),
            "trained": len(self.start),
            "first_gradients": self.first_gradients or [],
            "trained_dtypes": sorted({str(params[n].dtype) for n in self.start}),
            "frozen_dtypes": sorted({str(p.dtype) for n, p in params.items() if not p.requires_grad
                                     and n.startswith("denoiser.backbone.")}),
        }
        with open(f"{self.path}.rank{trainer.global_rank}", "w") as handle:
            json.dump(record, handle)


@pytest.fixture(scope="module")
def judge():
    with JudgeServer() as server:  # answers every request with scores read from the video
        yield server


@pytest.fixture(scope="module")
def recipes(tmp_path_factory, judge) -> Path:
    """The recipes folder as a user's copy: the judge endpoint pointed at the loopback judge (a path)."""
    out = tmp_path_factory.mktemp("recipes") / "recipes"
    shutil.copytree(REPO / "recipes", out)
    for path in (out / "algorithms").glob("*.yaml"):
        path.write_text(path.read_text().replace("http://judge:8000/v1", judge.url))
    return out


def arguments(recipe: str, algorithm: str, recipes: Path, data: Path, wan: str, svd: str, wav2vec2: str,
              hallo4: str | None = None, overlay: bool = False) -> list[str]:
    """``hallo4``: the converted tiny Hallo4 (the recipes that start from it: dpo_hallo4, or any with ``overlay``,
    which adds ``--config recipes/overlays/hallo4.yaml``)."""
    on_hallo4 = recipe == "dpo_hallo4" or overlay
    weights = svd if recipe == "sft_svd" else wan
    args = ["--config", str(recipes / f"{recipe}.yaml")]
    if overlay:
        args += ["--config", str(recipes / "overlays" / "hallo4.yaml")]
    if algorithm != OWN[recipe]:
        args += ["--model.algorithm", str(recipes / "algorithms" / f"{algorithm}.yaml")]
    args += SIZES[algorithm]
    args += [
        # paths
        "--model.denoiser.init_args.pretrained", hallo4 if on_hallo4 else weights,
        "--model.denoiser.init_args.codec.init_args.pretrained", weights,
        "--model.denoiser.init_args.audio_encoder.init_args.pretrained", wav2vec2,
        "--data.train", str(data), "--data.val", str(data),
        # device
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        # sizes
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--data.num_frames", "9", "--data.num_workers", "0",
        "--model.denoiser.init_args.pose_keypoints", "8",
    ]
    if on_hallo4:  # the tiny wav2vec2 has 2 layers (the real 12); Hallo4 has its own speech attention's heads
        args += ["--model.denoiser.init_args.audio_encoder.init_args.layers", "[1, 2]"]
    else:
        args += ["--model.denoiser.init_args.audio_heads", "2"]
    return args


def check(record: dict, algorithm: str) -> None:
    assert record["steps"] == 2, record
    losses = [value for step in record["losses"] for value in step.values()]
    assert losses and all(math.isfinite(v) for v in losses), record["losses"]
    # Every tensor the first step gives a gradient moves. (The others sit behind a zero-initialised output — LoRA's
    # lora_A behind lora_B = 0, the audio attention behind its zero to_out — and get a gradient only as that output
    # moves: at GRPO's 3e-6 in its first warm-up steps, one too small for Adam to move them yet.)
    assert record["first_gradients"], "no trained tensor had a gradient"
    still = sorted(set(record["still"]) & set(record["first_gradients"]))
    assert still == [], f"trained tensors with a gradient that did not move: {still[:8]}"
    assert record["trained_dtypes"] == ["torch.float32"]  # over a bf16 base
    assert "torch.bfloat16" in record["frozen_dtypes"]


def run(args: list[str], probe: Path, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    callbacks = f"[{{class_path: test_recipes_matrix.Probe, init_args: {{path: {probe}}}}}]"
    env = dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", JUDGE_API_KEY="test-key",
               **(env_extra or {}))
    command = [PREFALIGN, "fit", *args, "--trainer.callbacks+", callbacks]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_every_algorithm(recipe, algorithm, recipes, talkingshapes, wan_i2v_14b_dir, svd_xt_dir,
                                     wav2vec2_base_960h_dir, hallo4_dir, tmp_path, monkeypatch):
    from prefalign.cli import main

    monkeypatch.chdir(tmp_path)  # the recipes write runs/<name>/ relative to where they run
    monkeypatch.setenv("JUDGE_API_KEY", "test-key")
    args = arguments(recipe, algorithm, recipes, talkingshapes, wan_i2v_14b_dir, svd_xt_dir, wav2vec2_base_960h_dir,
                     hallo4_dir)
    probe = tmp_path / "probe"
    main(["fit", *args, "--trainer.callbacks+",
          f"[{{class_path: test_recipes_matrix.Probe, init_args: {{path: {probe}}}}}]"])
    record = json.loads((tmp_path / "probe.rank0").read_text())
    check(record, algorithm)
    own_lr = {"sft": 1e-4, "dpo": 1e-5, "grpo": 3e-6, "refree": 2e-5}[algorithm]
    assert record["lr"] == pytest.approx(own_lr)  # the algorithm file's rate travels with it


@pytest.mark.parametrize("recipe", ["grpo_flowportrait", "refree_s2v"])
def test_the_hallo4_overlay_starts_a_recipe_from_hallo4(recipe, recipes, talkingshapes, wan_i2v_14b_dir, svd_xt_dir,
                                                        wav2vec2_base_960h_dir, hallo4_dir, tmp_path, monkeypatch):
    """One --config more (recipes/overlays/hallo4.yaml) and the recipe's own algorithm trains the released model."""
    from prefalign.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JUDGE_API_KEY", "test-key")
    args = arguments(recipe, OWN[recipe], recipes, talkingshapes, wan_i2v_14b_dir, svd_xt_dir, wav2vec2_base_960h_dir,
                     hallo4_dir, overlay=True)
    probe = tmp_path / "probe"
    main(["fit", *args, "--trainer.callbacks+",
          f"[{{class_path: test_recipes_matrix.Probe, init_args: {{path: {probe}}}}}]"])
    record = json.loads((tmp_path / "probe.rank0").read_text())
    check(record, OWN[recipe])
    assert any("audio_cross_attn" in name for name in record["first_gradients"])  # Hallo4's own speech attention


WAN_BLOCK = "diffusers.models.transformers.transformer_wan.WanTransformerBlock"


@pytest.mark.parametrize("recipe,algorithm,strategy", [
    ("grpo_flowportrait", "dpo", "ddp"),  # online DPO swapped in, on two ranks
    ("sft_wan_i2v", "refree", "fsdp"),  # the bf16 base with fp32 tables and fp32 adapters: one dtype per FSDP unit
])
def test_two_process_runs(recipe, algorithm, strategy, recipes, talkingshapes, wan_i2v_14b_dir, svd_xt_dir,
                          wav2vec2_base_960h_dir, tmp_path):
    args = arguments(recipe, algorithm, recipes, talkingshapes, wan_i2v_14b_dir, svd_xt_dir, wav2vec2_base_960h_dir)
    args[args.index("--trainer.devices") + 1] = "2"
    if strategy == "ddp":
        args[args.index("--trainer.strategy") + 1] = "ddp"
    else:
        args[args.index("--trainer.strategy") + 1] = (
            f"{{class_path: cpu_fsdp.CPUFSDP, init_args: {{process_group_backend: gloo, "
            f"auto_wrap_policy: [{WAN_BLOCK}]}}}}")
    result = run(args, tmp_path / "probe", tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        check(json.loads((tmp_path / f"probe.rank{rank}").read_text()), algorithm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("algorithm", ["sft", "dpo", "refree"])
def test_real_fsdp_strategy_on_one_gpu(algorithm, recipes, talkingshapes, wan_i2v_14b_dir, svd_xt_dir,
                                       wav2vec2_base_960h_dir, tmp_path):
    """Lightning's own FSDPStrategy (no CPU shim) with the recipe's FSDP overlay, on one GPU."""
    args = arguments("sft_wan_i2v", algorithm, recipes, talkingshapes, wan_i2v_14b_dir, svd_xt_dir,
                     wav2vec2_base_960h_dir)
    args += ["--config", str(recipes / "cluster" / "fsdp.yaml"), "--trainer.devices", "1",
             "--trainer.accelerator", "gpu"]
    args.remove("--trainer.strategy")
    args.remove("auto")
    result = run(args, tmp_path / "probe", tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    check(json.loads((tmp_path / "probe.rank0").read_text()), algorithm)
