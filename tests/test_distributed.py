"""Two-process DDP on CPU (gloo), launched the way a user launches it: ``prefalign fit --trainer.strategy ddp``.

Each rank trains on its own clips, the ranks end with the same weights, the LoRA reference works on every rank,
and a run resumed from a checkpoint repeats every rank's losses exactly.
"""

import hashlib
import json
import os
import subprocess

import lightning as L
import pytest
import torch

from test_checkpoints import CASES, PREFALIGN, TESTS, fit, pairs, recipe, step_losses  # noqa: F401 (pairs: a fixture)

pytestmark = pytest.mark.slow  # multi-process or end-to-end runs: make test-slow (CI runs it)

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]


class RankLog(L.Callback):
    """Per rank, a jsonl line per step (its loss and clip ids) and at the end a digest of the trained weights."""

    def __init__(self, path: str):
        self.path = path

    def write(self, trainer, record: dict) -> None:
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.write(trainer, {"step": trainer.global_step, "loss": step_losses(trainer), "ids": batch["id"]})

    def on_fit_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for name, param in sorted(pl_module.named_parameters()):
            if param.requires_grad:
                digest.update(name.encode() + param.detach().cpu().numpy().tobytes())
        self.write(trainer, {"weights": digest.hexdigest()})


def read(path) -> tuple[dict[int, dict], str]:
    lines = [json.loads(line) for line in open(path)]
    return {line["step"]: line for line in lines if "step" in line}, lines[-1].get("weights")


@pytest.mark.parametrize("case", ["sft-full", "dpo-lora-online", "refree-lora", "grpo-lora"])
def test_two_process_ddp_fit_and_resume(case, tmp_path, talkingshapes, request):
    algorithm, lora = CASES[case]
    data = request.getfixturevalue("pairs") if case.startswith("dpo") else talkingshapes
    steps = 7
    config = recipe(tmp_path, data, algorithm, lora, steps, keep_all=True)
    log = "test_distributed.RankLog"
    result = fit(config, tmp_path / "whole", *DDP, log=log)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [read(tmp_path / f"whole.rank{r}") for r in range(2)]
    for steps_of_rank, _ in ranks:
        assert sorted(steps_of_rank) == list(range(1, steps + 1))
        assert all(torch.isfinite(torch.tensor([float(v) for v in s["loss"].split()])).all() for s in steps_of_rank.values())
    for step in range(1, steps + 1):  # DistributedSampler's shards: the ranks see different clips
        assert not set(ranks[0][0][step]["ids"]) & set(ranks[1][0][step]["ids"])
    assert ranks[0][1] == ranks[1][1]  # gradients were averaged: identical weights on both ranks

    checkpoint = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    saved = torch.load(checkpoint, weights_only=True)
    assert len(saved["rng_states"]) == 2 and len(saved["algorithm_states"]) == 2
    assert not torch.equal(saved["rng_states"][0]["torch"], saved["rng_states"][1]["torch"])  # own noise per rank

    result = fit(config, tmp_path / "resumed", *DDP, "--ckpt_path", str(checkpoint), log=log)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        resumed, weights = read(tmp_path / f"resumed.rank{rank}")
        assert sorted(resumed) == list(range(4, steps + 1))
        assert {s: resumed[s]["loss"] for s in resumed} == {s: ranks[rank][0][s]["loss"] for s in resumed}
        assert weights == ranks[rank][1]


def test_two_process_ddp_evaluation_gathers_every_clip_once(tmp_path, talkingshapes):
    """`prefalign test` on 2 ranks: each scores its share, rank 0 writes one table with every test clip once."""
    algorithm, lora = CASES["sft-full"]
    config = recipe(tmp_path, talkingshapes, algorithm, lora, max_steps=1)
    result = fit(config, tmp_path / "losses")
    assert result.returncode == 0, result.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [PREFALIGN, "test", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
               "--data.test", str(talkingshapes), "--data.num_frames", "9", "--data.eval_batch_size", "4",
               "--model.sampling.num_steps", "2", "--model.evaluation_dir", str(tmp_path / "eval"), *DDP]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    ids = [clip["id"] for clip in table["clips"]]
    expected = [json.loads(line)["id"] for line in talkingshapes.read_text().splitlines()]
    assert sorted(ids) == sorted(expected)  # 12 clips, 6 a rank: each scored once, none lost
    assert table["metrics"]["sync"]["count"] == len(expected)
