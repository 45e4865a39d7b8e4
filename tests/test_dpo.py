"""Diffusion-DPO / Flow-DPO: the loss against the formula, shared noise, the start at log 2, LoRA reference memory."""

import math

import pytest
import torch

from prefalign.algorithms.dpo import DiffusionDPO, dpo_loss
from prefalign.lora import LoraSettings
from prefalign.module import AlignmentModule
from prefalign.processes import Diffusion, FlowMatching

from conftest import quiet_trainer, tiny_wan


def reference_formula(e_w, e_l, r_w, r_l, beta, loss_type):
    """Written out independently from DESIGN.md: -log σ(-β/2 · [(e_w - e_w^ref) - (e_l - e_l^ref)])."""
    inside = -beta / 2 * ((e_w - r_w) - (e_l - r_l))
    if loss_type == "sigmoid":
        return torch.log1p(torch.exp(-inside))
    if loss_type == "hinge":
        return torch.clamp(1 - inside, min=0)
    log_ratio = inside / beta  # IPO regresses the log-ratio surrogate h onto 1/(2β)
    return (log_ratio - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_loss_matches_the_formula(loss_type):
    g = torch.Generator().manual_seed(0)
    e_w, e_l, r_w, r_l = (torch.rand(64, generator=g, dtype=torch.float64) * 0.01 for _ in range(4))
    for beta in (500.0, 5000.0):
        loss, margin = dpo_loss(e_w, e_l, r_w, r_l, beta, loss_type)
        torch.testing.assert_close(loss, reference_formula(e_w, e_l, r_w, r_l, beta, loss_type))
        torch.testing.assert_close(margin, -beta / 2 * ((e_w - r_w) - (e_l - r_l)))


def test_beta_conventions_are_the_same_loss():
    """Salesforce's β = 5000 with the 1/2 equals the diffusers example's β = 2500 without it."""
    e_w, e_l, r_w, r_l = torch.rand(4, 16, dtype=torch.float64) * 0.01
    ours, _ = dpo_loss(e_w, e_l, r_w, r_l, 5000.0)
    without_half = -torch.nn.functional.logsigmoid(-2500.0 * ((e_w - r_w) - (e_l - r_l)))
    torch.testing.assert_close(ours, without_half)


def test_beta_to_zero_gives_no_preference_gradient():
    e_w = torch.rand(8, requires_grad=True)
    e_l = torch.rand(8, requires_grad=True)
    loss, _ = dpo_loss(e_w, e_l, torch.rand(8), torch.rand(8), beta=1e-9)
    loss.sum().backward()
    assert e_w.grad.abs().max() < 1e-8 and e_l.grad.abs().max() < 1e-8


def pair_batch(clip_batch):
    batch = dict(clip_batch)
    batch["rejected"] = batch["video"].flip(1)  # the same clip played backwards
    return batch


@pytest.mark.parametrize("process", [FlowMatching(), Diffusion(prediction="eps")], ids=["flow", "diffusion"])
def test_at_initialisation_loss_is_log2_and_margin_zero(clip_batch, process):
    module = AlignmentModule(tiny_wan(), process, algorithm=DiffusionDPO(), lora=LoraSettings(rank=4))
    loss, logged = module.algorithm.loss(module.policy, pair_batch(clip_batch))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert logged["reward_margin"].item() == 0.0


def test_pair_shares_noise_and_timestep(clip_batch, monkeypatch):
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=DiffusionDPO(), lora=LoraSettings(rank=4))
    seen = {}
    forward = module.denoiser.forward

    def spy(x_t, t, cond):
        seen.setdefault("calls", []).append((x_t.clone(), t.clone()))
        return forward(x_t, t, cond)

    monkeypatch.setattr(module.denoiser, "forward", spy)
    batch = pair_batch(clip_batch)
    module.algorithm.loss(module.policy, batch)
    (x_t, t), (x_ref, t_ref) = seen["calls"]  # one policy forward on 2B, one reference forward on 2B
    assert x_t.shape[0] == 8 and torch.equal(x_t, x_ref) and torch.equal(t, t_ref)
    torch.testing.assert_close(t[:4], t[4:], rtol=0, atol=0)
    # x_t = (1-σ)x0 + σ·eps with the same eps: removing each clip's own part leaves the same noise.
    chosen = module.denoiser.encode_video(batch["video"])
    rejected = module.denoiser.encode_video(batch["rejected"])
    sigma = (t[:4] / 1000).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close((x_t[:4] - (1 - sigma) * chosen) / sigma, (x_t[4:] - (1 - sigma) * rejected) / sigma)


def test_lora_reference_forward_adds_no_parameter_memory(clip_batch):
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=DiffusionDPO(), lora=LoraSettings(rank=4))
    before = {id(p) for p in module.parameters()} | {id(b) for b in module.buffers()}
    module.algorithm.loss(module.policy, pair_batch(clip_batch))
    after = {id(p) for p in module.parameters()} | {id(b) for b in module.buffers()}
    assert before == after and module._reference is None


def test_dpo_prefers_the_winner_after_training(clip_batch):
    torch.manual_seed(0)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=DiffusionDPO(beta=2000.0), lora=LoraSettings(rank=8))
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=3e-3)
    batch = pair_batch(clip_batch)
    accuracies = []
    for _ in range(25):
        loss, logged = module.algorithm.loss(module.policy, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        accuracies.append(logged["implicit_accuracy"].item())
    assert sum(accuracies[-5:]) / 5 > 0.7


def test_aspect_labels_weigh_and_orient_pairs():
    algo = DiffusionDPO(aspect_weights={"lip_sync": 1.0, "motion": 0.5})
    batch = {"labels": [{"lip_sync": 1, "motion": 1}, {"lip_sync": -1, "motion": 0}, None]}
    torch.testing.assert_close(algo.pair_weights(batch, 3, torch.device("cpu")), torch.tensor([1.5, -1.0, 1.0]))


def test_online_reference_refreshes_after_every_kth_step(tmp_path):
    """reference_refresh_every=2 in a real fit: refreshed after steps 2 and 4 (before those steps' checkpoints)."""
    import lightning as L

    from prefalign.data.datamodule import PortraitDataModule
    from prefalign.data.synthetic import write_dataset

    pairs = write_dataset(tmp_path, num_clips=4, seed=5, rejected=("shift",))
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=DiffusionDPO(reference_refresh_every=2),
                             lora=LoraSettings(rank=4))
    refreshes, seen = [], []
    original = module.refresh_reference

    def counted():
        refreshes.append(1)
        original()

    module.refresh_reference = counted

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, len(refreshes)))

    trainer = quiet_trainer(max_steps=5, callbacks=[Count()])
    trainer.fit(module, datamodule=PortraitDataModule(train=str(pairs), val_fraction=0.0, batch_size=2, num_frames=9))
    assert seen == [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)]  # one at setup (the start), then after steps 2 and 4


class RankedReward:
    """A reward that ranks samples by their mean brightness (NaN where ``drop`` says so), and records what it saw."""

    def __init__(self, drop=()):
        self.drop = set(drop)
        self.seen = None

    def total(self, videos, cond):
        self.seen = videos
        scores = videos.float().flatten(1).mean(dim=1)
        for i in self.drop:
            scores[i] = float("nan")
        return scores, {"brightness": scores}


def online_batch(clip_batch):
    return {k: v for k, v in clip_batch.items() if k != "video"} | {"num_frames": torch.tensor([9] * 4)}


def test_online_pairs_are_the_best_and_worst_sample_of_each_group(clip_batch):
    reward = RankedReward()
    algo = DiffusionDPO(reward=reward, group_size=3, sample_steps=2)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=algo, lora=LoraSettings(rank=4))
    batch = {k: (v[:2] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in online_batch(clip_batch).items()}
    batch["audio"] = batch["audio"][:, : 9 * 640]
    chosen, rejected, weight, logged = algo.online_pairs(module.policy, batch)
    assert chosen.shape == rejected.shape == (2, *module.denoiser.latent_shape(9, 32, 32))
    brightness = reward.seen.flatten(1).mean(dim=1).view(2, 3)
    decoded_chosen = module.denoiser.decode(chosen).flatten(1).mean(dim=1)
    decoded_rejected = module.denoiser.decode(rejected).flatten(1).mean(dim=1)
    torch.testing.assert_close(decoded_chosen, brightness.max(dim=1).values)
    torch.testing.assert_close(decoded_rejected, brightness.min(dim=1).values)
    assert weight.tolist() == [1.0, 1.0]
    assert logged["online_reward_best"] > logged["online_reward_worst"]


def test_online_groups_without_two_usable_rewards_weigh_nothing(clip_batch):
    algo = DiffusionDPO(reward=RankedReward(drop=(0, 1)), group_size=2, sample_steps=1)  # group 0 fully dropped
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=algo, lora=LoraSettings(rank=4))
    batch = {k: (v[:2] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in online_batch(clip_batch).items()}
    batch["audio"] = batch["audio"][:, : 9 * 640]
    _, _, weight, logged = algo.online_pairs(module.policy, batch)
    assert weight.tolist() == [0.0, 1.0]
    assert logged["online_dropped_fraction"].item() == 0.5


def test_dpo_without_rejected_clips_needs_a_reward(talkingshapes):
    from prefalign.data.errors import DataError

    with pytest.raises(DataError, match="rejected"):
        DiffusionDPO().check_fields({"video", "audio", "reference"}, str(talkingshapes))
    DiffusionDPO(reward=RankedReward()).check_fields({"video", "audio", "reference"}, str(talkingshapes))


def test_online_dpo_fits_on_clips_without_rejected(tmp_path, talkingshapes):
    """The same clips SFT trains on: DPO makes its pairs from its own samples, and its adapters move."""
    from prefalign.data.datamodule import PortraitDataModule
    from prefalign.rewards import SyncExpert

    algo = DiffusionDPO(beta=500.0, reward=SyncExpert(), group_size=2, sample_steps=2, lr=1e-3)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=algo, lora=LoraSettings(rank=4))
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, datamodule=PortraitDataModule(train=str(talkingshapes), val_fraction=0.0, batch_size=2,
                                                      num_frames=9))
    assert trainer.global_step == 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == 1e-3  # the algorithm's rate
    moved = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved)
