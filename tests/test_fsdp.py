"""Two-process FSDP on CPU (gloo), through ``tests/cpu_fsdp.py``: Lightning's FSDPStrategy with the model wrapped
for the CPU, the Wan blocks as units as in recipes/cluster/fsdp.yaml.

Each rank trains on its own clips; the lagged LoRA reference (online DPO, ReFree) and ReFree's self-play work on
sharded weights; checkpoints hold only the trained tensors although FSDP loads them itself; a resumed run repeats
every rank's losses exactly; and GRPO, which FSDP cannot run under Lightning, stops with a clear error.
"""

import pytest
import torch

from test_checkpoints import CASES, fit, pairs, recipe, step_losses  # noqa: F401 (pairs: a fixture)
from test_distributed import RankLog, read

pytestmark = pytest.mark.slow  # multi-process or end-to-end runs: make test-slow (CI runs it)

WAN_BLOCK = "diffusers.models.transformers.transformer_wan.WanTransformerBlock"
FSDP = ["--trainer.strategy",
        f"{{class_path: cpu_fsdp.CPUFSDP, init_args: {{process_group_backend: gloo, auto_wrap_policy: [{WAN_BLOCK}]}}}}",
        "--trainer.devices", "2"]
CLIP = ["--trainer.gradient_clip_val", "1.0"]  # by norm, as the FSDP recipes clip
LOG = "test_fsdp.MarginLog"


class MarginLog(RankLog):
    """RankLog, plus DPO's reward margin: 0 exactly when the policy equals its reference."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        margin = trainer.callback_metrics.get("train/reward_margin")
        self.write(trainer, {"step": trainer.global_step, "loss": step_losses(trainer), "ids": batch["id"],
                             "margin": None if margin is None else margin.item()})


@pytest.mark.parametrize("case", ["sft-full", "dpo-lora-online", "dpo-full-online", "refree-lora"])
def test_two_process_fsdp_fit_and_resume(case, tmp_path, talkingshapes, request):
    algorithm, lora = CASES[case.replace("full-online", "lora-online")]
    lora = lora and "full" not in case
    data = request.getfixturevalue("pairs") if case.startswith("dpo") else talkingshapes
    steps = 7
    config = recipe(tmp_path, data, algorithm, lora, steps, keep_all=True)
    result = fit(config, tmp_path / "whole", *FSDP, *CLIP, log=LOG)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [read(tmp_path / f"whole.rank{r}") for r in range(2)]
    for steps_of_rank, _ in ranks:
        assert sorted(steps_of_rank) == list(range(1, steps + 1))
        assert all(torch.isfinite(torch.tensor([float(v) for v in s["loss"].split()])).all() for s in steps_of_rank.values())
    for step in range(1, steps + 1):
        assert not set(ranks[0][0][step]["ids"]) & set(ranks[1][0][step]["ids"])
    if case.startswith("dpo"):  # the reference is the policy at the start and right after its refresh at step 4
        margins = {step: abs(record["margin"]) for step, record in ranks[0][0].items()}
        assert margins[1] < 1e-6 and margins[5] < 1e-6, margins
        assert min(margins[s] for s in (2, 3, 4, 6, 7)) > 1e-5, margins

    checkpoint = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    saved = torch.load(checkpoint, weights_only=True)
    state, record = saved["state_dict"], saved["prefalign"]
    assert sorted(state) == record["keys"]
    if lora:  # the base stays out: only adapters, new modules and the reference snapshot
        assert record["frozen_left_out"] > 0
        assert all("lora_" in k for k in state if k.startswith("denoiser.backbone."))
    assert len(saved["rng_states"]) == 2 and len(saved["algorithm_states"]) == 2

    result = fit(config, tmp_path / "resumed", *FSDP, *CLIP, "--ckpt_path", str(checkpoint), log=LOG)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        resumed, weights = read(tmp_path / f"resumed.rank{rank}")
        assert sorted(resumed) == list(range(4, steps + 1))
        assert {s: resumed[s]["loss"] for s in resumed} == {s: ranks[rank][0][s]["loss"] for s in resumed}
        assert weights == ranks[rank][1]  # this rank's shard of the trained weights


def test_grpo_under_fsdp_stops_with_a_clear_error(tmp_path, talkingshapes):
    algorithm, lora = CASES["grpo-lora"]
    result = fit(recipe(tmp_path, talkingshapes, algorithm, lora, 2), tmp_path / "losses", *FSDP)
    assert result.returncode != 0
    assert "GRPO under FSDP" in result.stderr and "recipes/cluster/ddp.yaml" in result.stderr
