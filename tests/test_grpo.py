"""GRPO: rollouts with log-probs, the exact first-pass ratio, group advantages, the KL to the reference, training."""

import lightning as L
import pytest
import torch

from prefalign.algorithms.grpo import GRPO, gaussian_kl, ppo_clip_loss
from prefalign.data.datamodule import PortraitDataModule
from prefalign.module import AlignmentModule, LoraSettings
from prefalign.processes import Diffusion, FlowMatching
from prefalign.rewards import SyncExpert
from prefalign.rewards.base import Reward

from conftest import tiny_wan


class Recorder(L.Callback):
    """Keeps every logged training metric of every step."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def fit(module, talkingshapes, steps=1, batch_size=2, **trainer_args):
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[recorder], **trainer_args,
    )  # fmt: skip
    data = PortraitDataModule(train=str(talkingshapes), batch_size=batch_size, num_frames=17, val_fraction=0.0)
    trainer.fit(module, datamodule=data)
    return recorder.rows


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
    dm = PortraitDataModule(train=str(talkingshapes), batch_size=2, num_frames=17, val_fraction=0.0)
    batch = next(iter(dm.train_dataloader()))
    expanded = {k: v.repeat_interleave(3, 0) if torch.is_tensor(v) and v.ndim else v for k, v in batch.items()}
    segments, videos = grpo.rollouts(module, expanded, 17, torch.Generator().manual_seed(0))
    start = segments[0].states[0]
    assert torch.equal(start[0], start[2]) and not torch.equal(start[0], start[3])
    assert not torch.equal(segments[0].states[-1][0], segments[0].states[-1][1])  # the SDE still spreads them
    assert videos.shape == (6, 17, 3, 32, 32)


def test_chunked_rollouts_join_and_train(talkingshapes):
    """Long clips roll out chunk by chunk; each chunk starts from the previous one's last frames."""
    torch.manual_seed(0)
    module = AlignmentModule(tiny_wan(), FlowMatching())
    grpo = GRPO(SyncExpert(), group_size=2, num_steps=2, chunk_frames=9, motion_frames=5)
    dm = PortraitDataModule(train=str(talkingshapes), batch_size=1, num_frames=17, val_fraction=0.0)
    batch = next(iter(dm.train_dataloader()))
    expanded = {k: v.repeat_interleave(2, 0) if torch.is_tensor(v) and v.ndim else v for k, v in batch.items()}
    segments, video = grpo.rollouts(module, expanded, 17, torch.Generator().manual_seed(0))
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


class RankRecorder(L.Callback):
    """Writes each rank's last rollouts to a file: ddp_spawn children cannot hand objects back."""

    def __init__(self, folder):
        self.folder = str(folder)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        rollouts = module.algorithm.last_rollouts
        torch.save({**rollouts, "ids": list(batch["id"])},
                   f"{self.folder}/rank{trainer.global_rank}_step{trainer.global_step}.pt")


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
