"""GRPO: rollouts with log-probs, the exact first-pass ratio, group advantages, the KL to the reference, training."""

import copy
import json
from datetime import timedelta
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from prefalign.algorithms.base import repeat_conditions
from prefalign.algorithms.grpo import GRPO, gaussian_kl, group_spread, guard_log_ratio, ppo_clip_loss
from prefalign.data.datamodule import PortraitDataModule
from prefalign.lora import LoraSettings
from prefalign.module import AlignmentModule
from prefalign.processes import Diffusion, FlowMatching
from prefalign.rewards import SyncExpert
from prefalign.rewards.base import Reward
from prefalign.rewards.composite import CompositeReward

from conftest import quiet_trainer, tiny_wan


class Recorder(L.Callback):
    """Keeps every logged training metric of every step."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def fitted(module, talkingshapes, steps=1, batch_size=2, **trainer_args):
    """The trainer after ``steps`` training steps on TalkingShapes, and the metrics logged at every step."""
    recorder = Recorder()
    trainer = quiet_trainer(max_steps=steps, callbacks=[recorder, *trainer_args.pop("callbacks", [])], **trainer_args)
    data = PortraitDataModule(train=str(talkingshapes), batch_size=batch_size, num_frames=17, val_fraction=0.0)
    trainer.fit(module, datamodule=data)
    return trainer, recorder.rows


def fit(module, talkingshapes, steps=1, batch_size=2, **trainer_args):
    return fitted(module, talkingshapes, steps, batch_size, **trainer_args)[1]


def grouped_batch(talkingshapes, conditions: int, group_size: int) -> dict:
    """A training batch of ``conditions`` clips, each repeated ``group_size`` times as ``GRPO.training_step`` does."""
    dm = PortraitDataModule(train=str(talkingshapes), batch_size=conditions, num_frames=17, val_fraction=0.0)
    return repeat_conditions(next(iter(dm.train_dataloader())), group_size)


@pytest.mark.parametrize("process", [FlowMatching(), Diffusion(prediction="v", eta=1.0)], ids=["flow-sde", "ddim-eta"])
@pytest.mark.parametrize("micro_batch", [None, 3])
def test_first_pass_ratio_is_exactly_one(talkingshapes, process, micro_batch):
    """One batch, one inner epoch: the update recomputes exactly the rollout's log-probs (ratio 1, nothing clipped)."""
    torch.manual_seed(0)
    grpo = GRPO(SyncExpert(), group_size=3, num_steps=4, train_fraction=1.0, micro_batch=micro_batch)
    rows = fit(AlignmentModule(tiny_wan(), process, algorithm=grpo), talkingshapes)
    assert rows[0]["train/ratio"] == 1.0
    assert rows[0]["train/clip_fraction"] == 0.0
    assert rows[0]["train/approx_kl"] == 0.0
    assert rows[0]["train/trained_steps"] == (4 if isinstance(process, FlowMatching) else 3)  # DDIM's last is exact
    assert abs(rows[0]["train/advantage_mean"]) < 1e-6


def test_later_inner_epochs_move_the_ratio(talkingshapes):
    torch.manual_seed(0)
    grpo = GRPO(SyncExpert(), group_size=2, num_steps=3, train_fraction=1.0, inner_epochs=3, clip_range=1e-4)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    rows = fit(module, talkingshapes)
    assert rows[0]["train/ratio"] != 1.0  # averaged over the three epochs: the 2nd and 3rd see a moved policy
    assert rows[0]["train/clip_fraction"] > 0


def test_kl_to_the_reference_is_zero_while_the_policy_is_the_reference(talkingshapes):
    torch.manual_seed(0)
    grpo = GRPO(SyncExpert(), group_size=2, num_steps=3, kl_beta=0.1, train_fraction=1.0)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo, lora=LoraSettings(rank=4))
    rows = fit(module, talkingshapes, steps=2)
    assert rows[0]["train/kl"] == 0.0  # LoRA's B starts at zero: policy = reference on the first update
    assert rows[1]["train/kl"] > 0.0  # after one optimizer step they differ
    mean = torch.randn(3, 4, 5)
    assert torch.equal(gaussian_kl(mean, mean, torch.ones(3, 1, 1)), torch.zeros(3))
    torch.testing.assert_close(gaussian_kl(mean, mean + 2, torch.full((3, 1, 1), 2.0)), torch.full((3,), 0.5))


def test_ppo_clip_loss_matches_the_formula():
    lp_old = torch.zeros(4)
    lp = torch.log(torch.tensor([0.5, 1.0, 1.5, 3.0]))
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    loss, ratio = ppo_clip_loss(lp, lp_old, adv, clip_range=0.2)
    torch.testing.assert_close(ratio, torch.tensor([0.5, 1.0, 1.5, 3.0]))
    # max(-A·ρ, -A·clip(ρ)): [max(-0.5, -0.8), max(1, 1), max(-3, -2.4), max(6, 2.4)]
    torch.testing.assert_close(loss, torch.tensor([-0.5, 1.0, -2.4, 6.0]))


class ByIndex(Reward):
    """A reward that is the rollout's index: known advantages, and NaN (a dropped judge answer) where asked."""

    def __init__(self, drop=()):
        self.drop = drop

    def score(self, videos, cond):
        r = torch.arange(videos.shape[0], dtype=torch.float32)
        for i in self.drop:
            r[i] = float("nan")
        return {"index": r}

    def total(self, videos, cond):
        terms = self.score(videos, cond)
        return terms["index"], terms


def test_group_advantages_have_zero_mean_and_dropped_samples_are_left_out():
    grpo = GRPO(ByIndex(drop=(5,)), group_size=3)
    groups = torch.arange(2).repeat_interleave(3)
    total, terms = grpo.reward.total(torch.zeros(6, 1, 3, 2, 2), {})
    adv = grpo.advantages(total, terms, groups)
    assert torch.isnan(adv[5]) and torch.isfinite(adv[:5]).all()
    assert abs(adv[:3].sum()) < 1e-6 and abs(adv[3:5].sum()) < 1e-6
    torch.testing.assert_close(adv[:3], torch.tensor([-1.0, 0.0, 1.0]) / (torch.tensor(2 / 3).sqrt() + 1e-4))


def test_ranks_and_steps_never_share_rollout_noise():
    grpo = GRPO(SyncExpert())

    class Where:
        def __init__(self, step, rank):
            self.global_step, self.global_rank = step, rank

    draws = [torch.randn(4, generator=grpo.generator(Where(step, rank))) for step in (0, 1) for rank in (0, 1)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(draws[i], draws[j])
    assert torch.equal(draws[0], torch.randn(4, generator=grpo.generator(Where(0, 0))))


def test_same_noise_per_group_starts_a_group_together(talkingshapes):
    torch.manual_seed(0)
    module = AlignmentModule(tiny_wan(), FlowMatching())
    grpo = GRPO(SyncExpert(), group_size=3, num_steps=2, same_noise_per_group=True)
    expanded = grouped_batch(talkingshapes, conditions=2, group_size=3)
    segments, videos = grpo.rollouts(module.policy, expanded, 17, torch.Generator().manual_seed(0))
    start = segments[0].states[0]
    assert torch.equal(start[0], start[2]) and not torch.equal(start[0], start[3])
    assert not torch.equal(segments[0].states[-1][0], segments[0].states[-1][1])  # the SDE still spreads them
    assert videos.shape == (6, 17, 3, 32, 32)


def test_chunked_rollouts_join_and_train(talkingshapes):
    """Long clips roll out chunk by chunk; each chunk starts from the previous one's last frames."""
    torch.manual_seed(0)
    module = AlignmentModule(tiny_wan(), FlowMatching())
    grpo = GRPO(SyncExpert(), group_size=2, num_steps=2, chunk_frames=9, motion_frames=5)
    expanded = grouped_batch(talkingshapes, conditions=1, group_size=2)
    segments, video = grpo.rollouts(module.policy, expanded, 17, torch.Generator().manual_seed(0))
    assert len(segments) == 3 and video.shape == (2, 17, 3, 32, 32)  # 9 + 4 + 4 frames
    assert all(s.free_from == 2 for s in segments[1:])  # 5 given frames = 2 latent frames
    first = module.denoiser.decode(segments[0].states[-1])
    second = module.denoiser.decode(segments[1].states[-1])
    torch.testing.assert_close(second[:, :5], first[:, -5:], rtol=0, atol=1e-6)
    rows = fit(AlignmentModule(tiny_wan(), FlowMatching(), algorithm=GRPO(
        SyncExpert(), group_size=2, num_steps=2, chunk_frames=9, train_fraction=1.0)), talkingshapes, batch_size=1)
    assert rows[0]["train/trained_steps"] == 6 and rows[0]["train/ratio"] == 1.0


def test_grpo_raises_the_reward_it_is_given(talkingshapes):
    """A reward for bright videos: a few GRPO steps make the samples brighter."""

    class Brightness(Reward):
        def score(self, videos, cond):
            return {"brightness": videos.mean(dim=(1, 2, 3, 4))}

    torch.manual_seed(0)
    grpo = GRPO(Brightness(), group_size=4, num_steps=3, train_fraction=1.0, clip_range=0.2, max_grad_norm=None)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    rows = fit(module, talkingshapes, steps=12)
    first = sum(r["train/reward"] for r in rows[:3]) / 3
    last = sum(r["train/reward"] for r in rows[-3:]) / 3
    assert last > first + 0.01


class FailingJudge(Reward):
    """Brightness as a judge under ``on_failure: drop`` would give it: NaN (dropped) for every sample of the calls
    in ``failing_calls`` (None: every call) on the process ``rank`` (None: every process) and for the samples in
    ``drop``; counts its failures as judges do."""

    on_failure = "drop"

    def __init__(self, failing_calls=None, drop=(), rank=None):
        self.failing_calls, self.drop, self.rank, self.calls = failing_calls, drop, rank, 0
        self.stats = {"requests": 0, "failures": 0}

    def score(self, videos, cond):
        r = videos.float().mean(dim=(1, 2, 3, 4))
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if (self.failing_calls is None or self.calls in self.failing_calls) and self.rank in (None, rank):
            r = torch.full_like(r, float("nan"))
        for i in self.drop:
            r[i] = float("nan")
        self.calls += 1
        self.stats["requests"] += len(r)
        self.stats["failures"] += int(torch.isnan(r).sum())
        return {"judge/brightness": r}

    def total(self, videos, cond):
        terms = self.score(videos, cond)
        return terms["judge/brightness"], terms


def weights(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_identical(a, b):
    """Bit-identical nested dicts/lists of tensors and numbers."""
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert a == b


def test_a_batch_without_usable_reward_is_a_step_that_changes_no_weight(talkingshapes):
    """A dead judge (every reward NaN) used to leave global_step at 0 forever: each batch is now a counted step.
    (``max_epochs=1`` bounds a regression to the 12 batches of one epoch instead of an endless run.)"""
    torch.manual_seed(0)
    grpo = GRPO(FailingJudge(), group_size=2, num_steps=2, train_fraction=1.0)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
                             lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    before = weights(module)
    trainer, rows = fitted(module, talkingshapes, steps=3, batch_size=1, max_epochs=1)
    assert trainer.global_step == 3
    assert_identical(weights(module), before)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3  # stepped as for any step
    assert [r["train/dropped_fraction"] for r in rows] == [1.0, 1.0, 1.0]
    assert [r["train/empty_batches"] for r in rows] == [1.0, 2.0, 3.0]


class Snapshot(L.Callback):
    """The weights and the optimizer's state after the first step."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.weights = weights(module)
            self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())


def test_an_empty_step_leaves_the_weights_and_the_optimizer_state_bit_identical(talkingshapes):
    torch.manual_seed(0)
    grpo = GRPO(FailingJudge(failing_calls=range(1, 100)), group_size=2, num_steps=2, train_fraction=1.0)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    before, snapshot = weights(module), Snapshot()
    trainer, rows = fitted(module, talkingshapes, steps=3, batch_size=1, max_epochs=1, callbacks=[snapshot])
    assert trainer.global_step == 3
    assert any(not torch.equal(before[k], v) for k, v in snapshot.weights.items())  # the first step trained
    assert snapshot.optimizer["state"]  # ... and filled AdamW's moments
    assert_identical(weights(module), snapshot.weights)
    assert_identical(trainer.optimizers[0].state_dict(), snapshot.optimizer)
    assert [r["train/empty_batches"] for r in rows] == [0.0, 1.0, 2.0]


def test_consecutive_empty_batches_stop_with_a_clear_error(talkingshapes):
    """Batches 1, 3 and 4 get no usable reward: the usable 2nd resets the count, the 4th is the 2nd in a row."""
    torch.manual_seed(0)
    judge = FailingJudge(failing_calls={0, 2, 3})
    grpo = GRPO(judge, group_size=2, num_steps=2, max_empty_batches=2)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo)
    trainer = quiet_trainer(max_steps=5, max_epochs=1)
    data = PortraitDataModule(train=str(talkingshapes), batch_size=1, num_frames=17, val_fraction=0.0)
    with pytest.raises(RuntimeError, match="2 consecutive batches had no usable reward") as error:
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3 and judge.calls == 4
    message = str(error.value)
    assert "FailingJudge (on_failure='drop'): requests 8, failures 6" in message
    assert "judge endpoint" in message and "on_failure" in message


def test_the_empty_batch_count_survives_a_resume():
    reward = CompositeReward([FailingJudge()], normalize="running")
    reward.running_stats = {"judge/brightness": {"count": 4, "mean": 0.5, "m2": 0.1}}
    grpo = GRPO(reward)
    grpo.empty_batches = 7
    resumed = GRPO(CompositeReward([FailingJudge()], normalize="running"))
    resumed.load_state_dict(copy.deepcopy(grpo.state_dict()))
    assert resumed.empty_batches == 7
    assert resumed.reward.running_stats == reward.running_stats
    with pytest.raises(ValueError, match="max_empty_batches"):
        GRPO(reward, max_empty_batches=0)


def test_a_reward_dropped_for_some_samples_still_trains(talkingshapes):
    """One of three rollouts dropped: the others train, and the drop rate is logged. With micro_batch=1 the
    dropped rollout's part still goes through backward (under DDP every rank makes the same backward calls)."""
    torch.manual_seed(0)
    grpo = GRPO(FailingJudge(failing_calls=(), drop=(1,)), group_size=3, num_steps=2, train_fraction=1.0,
                micro_batch=1)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    before = weights(module)
    backwards = []
    original = module.manual_backward
    module.manual_backward = lambda loss, *a, **k: backwards.append(loss.item()) or original(loss, *a, **k)
    trainer, rows = fitted(module, talkingshapes, steps=1, batch_size=1)
    assert trainer.global_step == 1
    assert any(not torch.equal(before[k], v) for k, v in weights(module).items())
    assert rows[0]["train/dropped_fraction"] == pytest.approx(1 / 3)
    assert rows[0]["train/dropped_samples"] == 1.0 and rows[0]["train/empty_batches"] == 0.0
    assert len(backwards) == 2 * 3  # every sampler step x every part, the dropped one's included
    assert backwards[1] == 0.0 and backwards[4] == 0.0


class RankRecorder(L.Callback):
    """Writes each rank's last rollouts to a file: ddp_spawn children cannot hand objects back."""

    def __init__(self, folder):
        self.folder = str(folder)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        rollouts = module.algorithm.last_rollouts
        torch.save({**rollouts, "ids": list(batch["id"])},
                   f"{self.folder}/rank{trainer.global_rank}_step{trainer.global_step}.pt")


@pytest.mark.slow
def test_two_process_ddp_keeps_groups_whole_and_noise_apart(talkingshapes, tmp_path):
    """2-process DDP on CPU: every rank rolls out whole groups for its own conditions (group advantages have zero
    mean on each rank) and no two ranks start from the same noise."""
    torch.manual_seed(0)
    grpo = GRPO(SyncExpert(), group_size=3, num_steps=2, train_fraction=1.0)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[RankRecorder(tmp_path)],
    )  # fmt: skip
    data = PortraitDataModule(train=str(talkingshapes), batch_size=2, num_frames=17, val_fraction=0.0)
    trainer.fit(module, datamodule=data)
    for step in (1, 2):
        ranks = [torch.load(tmp_path / f"rank{r}_step{step}.pt") for r in (0, 1)]
        assert set(ranks[0]["ids"]).isdisjoint(ranks[1]["ids"])  # each rank its own conditions
        for rank in ranks:
            groups, adv = rank["group_ids"], rank["advantages"]
            assert groups.tolist() == [0, 0, 0, 1, 1, 1]
            for g in (0, 1):
                assert abs(adv[groups == g].sum()) < 1e-5
        noise = torch.cat([r["start_noise"] for r in ranks])
        assert len({tuple(row.tolist()) for row in noise}) == 12  # 2 ranks x 6 rollouts, all different


class LockstepRecorder(L.Callback):
    """Writes each rank's backward calls, step, drop rate and weights after every batch to a file."""

    def __init__(self, folder):
        self.folder, self.backwards = str(folder), 0

    def on_after_backward(self, trainer, module):
        self.backwards += 1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        torch.save({"backwards": self.backwards, "step": trainer.global_step, "weights": weights(module),
                    "dropped_fraction": float(trainer.callback_metrics.get("train/dropped_fraction", float("nan")))},
                   f"{self.folder}/rank{trainer.global_rank}_batch{batch_idx}.pt")
        self.backwards = 0


@pytest.mark.slow
def test_two_process_ddp_trains_in_lockstep_when_one_rank_loses_its_reward(talkingshapes, tmp_path):
    """Rank 1's judge fails its first batch: it still makes every backward call rank 0 makes (zero-weighted), so
    the gradient all-reduces pair up and both ranks take the same step on the same batch."""
    torch.manual_seed(0)
    grpo = GRPO(FailingJudge(failing_calls={0}, rank=1), group_size=2, num_steps=2, train_fraction=1.0,
                micro_batch=1)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo,
                             optimizer=partial(torch.optim.AdamW, lr=1e-2))  # picklable for ddp_spawn
    before = weights(module)
    # A collective timeout: a rank left waiting for a backward its peer never makes fails instead of hanging.
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120))
    trainer = quiet_trainer(max_steps=1, max_epochs=1, devices=2, strategy=strategy,
                            callbacks=[LockstepRecorder(tmp_path)])
    data = PortraitDataModule(train=str(talkingshapes), batch_size=1, num_frames=17, val_fraction=0.0)
    trainer.fit(module, datamodule=data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0_batch0.pt", "rank1_batch0.pt"]
    ranks = [torch.load(tmp_path / f"rank{r}_batch0.pt") for r in (0, 1)]
    assert [r["dropped_fraction"] for r in ranks] == [0.0, 1.0]
    assert [r["backwards"] for r in ranks] == [4, 4]  # 2 sampler steps x 2 parts, on both ranks
    assert [r["step"] for r in ranks] == [1, 1]
    assert_identical(ranks[0]["weights"], ranks[1]["weights"])
    assert any(not torch.equal(before[k], v) for k, v in ranks[0]["weights"].items())


def test_per_term_advantages_take_global_std_and_the_advantage_clip():
    """With a CompositeReward aggregated per term, GRPO's ``global_std`` and ``advantage_clip`` reach every term's
    advantage (they were ignored: each term was standardised per group and clipped at 5)."""
    from prefalign.rewards import JitterPenalty

    reward = CompositeReward(terms=[SyncExpert(), JitterPenalty()], weights={"sync": 1.0, "jitter": 0.5},
                             aggregate="advantage")
    grpo = GRPO(reward, group_size=4, global_std=True, advantage_clip=1.5)
    groups = torch.arange(2).repeat_interleave(4)
    sync = torch.tensor([0.0, 0.1, 0.2, 9.0, 0.5, 0.5, 0.6, 0.4])
    jitter = torch.tensor([-1.0, 0.0, -2.0, 0.0, 0.0, -0.5, 0.0, -0.5])
    terms = {"sync": sync, "jitter": jitter}

    def written_out(r):  # (r - group mean) / (std over the whole batch + 1e-4), clipped to ±1.5
        centred = r - r.view(2, 4).mean(dim=1).repeat_interleave(4)
        return (centred / (r.std(unbiased=False) + 1e-4)).clamp(-1.5, 1.5)

    expected = (written_out(sync) + 0.5 * written_out(jitter)).clamp(-1.5, 1.5)
    torch.testing.assert_close(grpo.advantages(torch.zeros(8), terms, groups), expected)
    per_group = GRPO(reward, group_size=4, advantage_clip=1.5).advantages(torch.zeros(8), terms, groups)
    assert not torch.allclose(per_group, expected)


# --- GRPO-Guard's ratio normalisation, MixGRPO's SDE window, the diagnostics -------------------------------------
def test_guard_log_ratio_is_the_unbiased_noise_projection():
    """RatioNorm: ``(lp − lp_old)·σ + mean(Δμ²)/(2σ) = mean(ε·Δμ)`` for the rollout's noise ε, whatever σ."""
    torch.manual_seed(0)
    process = FlowMatching()
    old_mean = torch.randn(3, 4, 2, 5, 5)
    noise = torch.randn_like(old_mean)
    for sigma in (0.05, 0.7):
        std = torch.full((3, 1, 1, 1, 1), sigma)
        sample = old_mean + std * noise
        mean = old_mean + 0.01 * torch.randn_like(old_mean)
        lp, lp_old = process.log_prob(sample, mean, std), process.log_prob(sample, old_mean, std)
        normalised = guard_log_ratio(lp, lp_old, mean, old_mean, std)
        torch.testing.assert_close(normalised, (noise * (mean - old_mean)).flatten(1).mean(1), rtol=1e-3, atol=1e-6)
        # The plain log-ratio is biased below 0 by mean(Δμ²)/(2σ²), more the smaller σ; the normalised one is not.
        bias = (mean - old_mean).pow(2).flatten(1).mean(1) / (2 * sigma**2)
        torch.testing.assert_close(lp - lp_old, normalised / sigma - bias, rtol=1e-3, atol=1e-6)
    same = guard_log_ratio(lp_old, lp_old, old_mean, old_mean, std)
    assert torch.equal(same, torch.zeros(3))


def test_group_spread_counts_groups_without_signal():
    values = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, float("nan")])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    spread, zero = group_spread(values, groups)
    torch.testing.assert_close(spread, torch.tensor(0.5))  # group 0: std 0; group 1: std of [0, 2] = 1
    assert float(zero) == 0.5


def test_the_sde_window_slides_from_high_noise_to_low():
    grpo = GRPO(SyncExpert(), num_steps=6, sde_window=2, window_shift_every=10, window_stride=1)
    assert [grpo.stochastic_steps(step) for step in (0, 9, 10, 35, 1000)] == [
        range(0, 2), range(0, 2), range(1, 3), range(3, 5), range(4, 6)]
    assert GRPO(SyncExpert(), num_steps=6, sde_window=2, window_start=3).stochastic_steps(500) == range(3, 5)
    assert GRPO(SyncExpert(), num_steps=6).stochastic_steps(7) == range(6)
    with pytest.raises(ValueError, match="sde_window must be in"):
        GRPO(SyncExpert(), num_steps=6, sde_window=7)
    with pytest.raises(ValueError, match="window_start must be in"):
        GRPO(SyncExpert(), num_steps=6, sde_window=2, window_start=5)
    with pytest.raises(ValueError, match="window_shift_every needs sde_window"):
        GRPO(SyncExpert(), num_steps=6, window_shift_every=10)


def test_only_the_window_is_stochastic_and_a_group_shares_its_path_until_it(talkingshapes):
    torch.manual_seed(0)
    module = AlignmentModule(tiny_wan(), FlowMatching())
    grpo = GRPO(SyncExpert(), group_size=3, num_steps=4, sde_window=2, window_start=1, same_noise_per_group=True)
    expanded = grouped_batch(talkingshapes, conditions=2, group_size=3)
    (segment,), _ = grpo.rollouts(module.policy, expanded, 17, torch.Generator().manual_seed(0))
    finite = torch.isfinite(segment.log_probs).all(dim=1)
    assert finite.tolist() == [False, True, True, False]  # the ODE steps have no density
    states = segment.states
    assert torch.equal(states[1][0], states[1][2])  # step 0 is an ODE step from the group's shared noise
    assert not torch.equal(states[2][0], states[2][1])  # the window's noise spreads the group
    # The last step is deterministic: its output is the ODE step of its input.
    t = module.process.timesteps(4)
    with torch.no_grad():
        mean, std = grpo.step_distribution(module.denoiser, module.process, states[3], t[3], t[4], segment.cond,
                                           module.denoiser.drop_conditions, stochastic=False)
    assert float(std.abs().max()) == 0.0
    torch.testing.assert_close(states[4], mean.to(states[4].dtype))


def test_ratio_norm_and_the_window_train_on_policy_with_diagnostics(talkingshapes):
    """The first pass of a normalised-ratio update is exactly on policy; the window's steps are the trained ones,
    each with its logged gradient norm; the update size and the groups' spread are logged."""
    torch.manual_seed(0)
    grpo = GRPO(SyncExpert(), group_size=3, num_steps=4, sde_window=2, window_start=1, train_fraction=1.0,
                ratio_norm=True, grad_diagnostics=True, inner_epochs=2, clip_range=0.2)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo, lora=LoraSettings(rank=4),
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    rows = fit(module, talkingshapes, steps=2)
    row = rows[0]
    assert row["train/trained_steps"] == 2 and row["train/sde_window_start"] == 1
    assert sorted(k for k in row if k.startswith("train/grad_norm/")) == [
        "train/grad_norm/step_1", "train/grad_norm/step_2"]
    assert all(row[f"train/grad_norm/step_{j}"] > 0 for j in (1, 2))
    assert row["train/update_size"] > 0
    assert row["train/ratio_drift"] > 0  # the second inner epoch sees the moved policy
    assert row["train/reward_group_std"] > 0 and 0 <= row["train/zero_spread_groups"] <= 1
    assert row["train/reward/sync_group_std"] > 0


def test_ratio_norm_reweights_the_steps_by_their_std(talkingshapes):
    """On policy, RatioNorm multiplies each step's policy gradient by that step's σ: the gradient of step j's
    normalised loss equals σ_j times the gradient of its plain loss."""
    torch.manual_seed(0)
    module = AlignmentModule(tiny_wan(), FlowMatching())
    grpo = GRPO(SyncExpert(), group_size=2, num_steps=3, ratio_norm=True)
    expanded = grouped_batch(talkingshapes, conditions=1, group_size=2)
    (segment,), _ = grpo.rollouts(module.policy, expanded, 17, torch.Generator().manual_seed(0))
    process, denoiser = module.process, module.denoiser
    t = process.timesteps(3)
    adv = torch.tensor([1.0, -1.0])
    weights = [p for p in denoiser.parameters() if p.requires_grad]
    grads = {}
    for norm in (False, True):
        mean, std = grpo.step_distribution(denoiser, process, segment.states[1], t[1], t[2], segment.cond,
                                           denoiser.drop_conditions)
        lp = process.log_prob(segment.states[2], mean, std)
        old = segment.log_probs[1]
        if norm:
            lp = old + guard_log_ratio(lp, old, mean, segment.means[1], std)
        loss, _ = ppo_clip_loss(lp, old, adv, clip_range=1.0)
        grads[norm] = torch.cat([g.flatten() for g in torch.autograd.grad(loss.sum(), weights, allow_unused=True)
                                 if g is not None])
    sigma = float(std.flatten()[0])
    assert 0.1 < sigma < 0.7 and float(grads[False].norm()) > 0
    scale = float(grads[False].abs().max())  # float32 sums: compare at the gradient's own scale
    torch.testing.assert_close(grads[True], sigma * grads[False], rtol=1e-4, atol=1e-5 * scale)


def test_mouth_exploration_draws_noise_on_the_mouth_box_alone_and_trains_on_policy(talkingshapes):
    """explore: mouth. A stochastic step moves only the mouth box's latents off the step's mean, its log-prob is the
    density of those latents, and the first pass of the update (RatioNorm, KL) is exactly on policy."""
    from prefalign.algorithms.base import mouth_mask

    torch.manual_seed(0)
    module = AlignmentModule(tiny_wan(), FlowMatching())
    grpo = GRPO(SyncExpert(), group_size=2, num_steps=3, sde_window=1, explore="mouth", ratio_norm=True)
    assert "pose" in grpo.required_fields and "pose" not in GRPO(SyncExpert()).required_fields
    expanded = grouped_batch(talkingshapes, conditions=1, group_size=2)
    (segment,), _ = grpo.rollouts(module.policy, expanded, 17, torch.Generator().manual_seed(0))
    region = mouth_mask(module.denoiser, expanded)
    assert torch.equal(segment.region, region)
    inside = region.expand_as(segment.states[1]).bool()
    assert 0 < float(inside.float().mean()) < 0.5  # a box, not the frame
    process, denoiser = module.process, module.denoiser
    t = process.timesteps(3)
    with torch.no_grad():
        mean, std = grpo.step_distribution(denoiser, process, segment.states[0], t[0], t[1], segment.cond,
                                           denoiser.drop_conditions)
    moved = segment.states[1] - mean
    assert float(moved[~inside].abs().max()) == 0.0 and float(moved[inside].abs().min()) > 0
    for i in range(2):
        keep = inside[i]
        expected = torch.distributions.Normal(mean[i][keep].double(), float(std.flatten()[0])).log_prob(
            segment.states[1][i][keep].double()).mean()
        torch.testing.assert_close(segment.log_probs[0][i], expected.float())
    grpo = GRPO(SyncExpert(), group_size=2, num_steps=3, sde_window=1, explore="mouth", ratio_norm=True,
                kl_beta=0.1)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo, lora=LoraSettings(rank=4),
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    first, second = fit(module, talkingshapes, steps=2, batch_size=1)
    assert first["train/ratio"] == 1.0 and first["train/trained_steps"] == 1
    assert first["train/unexplored_rollouts"] == 0.0
    assert first["train/kl"] == 0.0  # LoRA starts as the reference
    assert second["train/kl"] > 0.0


def test_a_kl_over_a_region_counts_the_region_alone():
    mean, std = torch.randn(2, 3, 4, 5, 5), torch.full((2, 1, 1, 1, 1), 0.5)
    region = torch.zeros(2, 1, 4, 5, 5)
    region[:, :, :, 1:3, 1:3] = 1
    moved = mean + 0.3 * (1 - region)  # the policy differs from the reference outside the region only
    assert torch.equal(gaussian_kl(moved, mean, std, region), torch.zeros(2))
    torch.testing.assert_close(gaussian_kl(moved, mean, std, 1 - region), torch.full((2,), 0.09 / 0.5))


def test_mouth_exploration_needs_pose_and_a_known_region(talkingshapes, tmp_path):
    with pytest.raises(ValueError, match="explore must be 'all' or 'mouth', got 'face'"):
        GRPO(SyncExpert(), explore="face")
    module = AlignmentModule(tiny_wan(), FlowMatching())
    grpo = GRPO(SyncExpert(), group_size=2, num_steps=2, explore="mouth")
    batch = grouped_batch(talkingshapes, conditions=1, group_size=2)
    batch["pose"] = batch["pose"][:, :, :3]  # a skeleton without the TalkingShapes mouth point
    with pytest.raises(ValueError, match=r"pose: the mouth box needs keypoints \[B, T, K >= 4, 2\]"):
        grpo.rollouts(module.policy, batch, 17, torch.Generator().manual_seed(0))
    batch["pose"] = torch.full((2, 17, 8, 2), 1.5)  # every keypoint outside the frame: an empty box, nothing explored
    (segment,), _ = grpo.rollouts(module.policy, batch, 17, torch.Generator().manual_seed(0))
    assert float(segment.region.sum()) == 0 and bool((segment.log_probs == 0).all())
    rows = [json.loads(line) for line in talkingshapes.read_text().splitlines()[:2]]
    no_pose = tmp_path / "no_pose.jsonl"
    no_pose.write_text("".join(json.dumps({"id": r["id"], **{k: str(talkingshapes.parent / r[k]) for k in
                                                             ("audio", "reference")}}) + "\n" for r in rows))
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=GRPO(SyncExpert(), group_size=2, num_steps=2,
                                                                        explore="mouth"))
    with pytest.raises(Exception, match="pose") as error:
        fit(module, no_pose, batch_size=1)
    assert str(no_pose) in str(error.value)


def test_mouth_exploration_covers_the_generated_frames_of_each_chunk(talkingshapes):
    """Chunked rollouts: each chunk's region covers its generated latent frames only, and training stays on policy."""
    torch.manual_seed(0)
    module = AlignmentModule(tiny_wan(), FlowMatching())
    grpo = GRPO(SyncExpert(), group_size=2, num_steps=2, chunk_frames=9, motion_frames=5, explore="mouth",
                ratio_norm=True, train_fraction=1.0)
    expanded = grouped_batch(talkingshapes, conditions=1, group_size=2)
    segments, _ = grpo.rollouts(module.policy, expanded, 17, torch.Generator().manual_seed(0))
    for segment in segments:
        assert segment.region.shape[2] == segment.states.shape[3] - segment.free_from
        assert bool(torch.isfinite(segment.log_probs).all())
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo)
    row = fit(module, talkingshapes, batch_size=1)[0]
    assert row["train/trained_steps"] == 6 and row["train/ratio"] == 1.0
