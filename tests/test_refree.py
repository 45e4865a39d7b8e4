"""ReFree: the loss at β = 0, the perturbations against the TalkingShapes metrics, the lagged self-play snapshot."""

import copy

import numpy as np
import pytest
import torch

from prefalign import metrics
from prefalign.algorithms import ReFree
from prefalign.algorithms.base import per_sample_mse
from prefalign.algorithms.refree import PERTURBATIONS, perturb
from prefalign.data import synthetic
from prefalign.lora import LoraSettings
from prefalign.module import AlignmentModule
from prefalign.processes import FlowMatching

from conftest import tiny_wan

CFG = synthetic.TalkingShapesConfig()


def test_beta_zero_leaves_exactly_the_flow_matching_loss(clip_batch):
    torch.manual_seed(0)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=ReFree(beta=0.0, negatives={"jitter": 1.0}))
    module.algorithm.setup(module.policy)
    torch.manual_seed(5)
    loss, logged = module.algorithm.loss(module.policy, clip_batch)
    torch.manual_seed(5)  # the same noise and timesteps, drawn in the same order
    x0 = module.denoiser.encode_video(clip_batch["video"])
    eps = torch.randn_like(x0)
    t = module.process.sample_t(x0.shape[0])
    cond = module.denoiser.condition(clip_batch)
    pred = module.denoiser(module.process.noise(x0, eps, t), module.process.model_time(t), cond)
    expected = per_sample_mse(pred, module.process.target(x0, eps, t)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert "preference_loss" not in logged


def test_preference_term_starts_at_zero_and_has_gradient(clip_batch):
    torch.manual_seed(0)
    module = AlignmentModule(tiny_wan(), FlowMatching(), lora=LoraSettings(rank=4),
                             algorithm=ReFree(beta=500.0, fm_weight=0.0, negatives={"freeze": 1.0}))
    module.algorithm.setup(module.policy)
    loss, logged = module.algorithm.loss(module.policy, clip_batch)
    assert logged["preference_loss"] == 0.0 and logged["reward_margin"] == 0.0  # policy = lagged reference
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_each_perturbation_breaks_motion_by_the_metrics(kind):
    """On ground-truth TalkingShapes clips each perturbation raises the jitter or lowers the sync."""
    generator = torch.Generator().manual_seed(0)
    worse = 0
    for seed in range(8):
        clip = synthetic.make_clip(seed)
        video = torch.from_numpy(np.ascontiguousarray(clip.video)).permute(0, 3, 1, 2)[None].float()
        audio = torch.from_numpy(clip.audio)[None]
        broken = perturb(video, kind, generator)
        assert broken.shape == video.shape
        sync = metrics.sync_score(video, audio, CFG.sample_rate, CFG.fps).item()
        sync_broken = metrics.sync_score(broken, audio, CFG.sample_rate, CFG.fps).item()
        jitter_up = (metrics.jitter(broken) - metrics.jitter(video)).item()
        worse += jitter_up > 1e-3 or sync_broken < sync - 0.1
    assert worse == 8


def lora_module(**refree):
    torch.manual_seed(0)
    algorithm = ReFree(negatives={"self_play": 1.0}, self_play_steps=3, **refree)
    module = AlignmentModule(tiny_wan(), FlowMatching(), lora=LoraSettings(rank=4), algorithm=algorithm)
    algorithm.setup(module.policy)
    return module


def sample(model, module, batch, seed):
    """What the self-play sampler does, with ``model`` in place of the lagged snapshot."""
    denoiser, process = module.denoiser, module.process
    cond = denoiser.condition(batch)
    x = process.prior((4, *denoiser.latent_shape(17, 32, 32)), generator=torch.Generator().manual_seed(seed))
    schedule = process.timesteps(3)
    with torch.no_grad():
        for t, t_next in zip(schedule[:-1], schedule[1:]):
            x = process.step(model(x, process.model_time(t.expand(4)), cond), x, t, t_next).sample
    return x


def train(module, batch, steps):
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
    for _ in range(steps):
        loss, _ = module.algorithm.loss(module.policy, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_self_play_negatives_come_from_the_lagged_snapshot(clip_batch):
    module = lora_module(refresh_every=100)
    start = copy.deepcopy(module.denoiser)
    train(module, clip_batch, 2)  # the live policy moves; the snapshot does not
    module.algorithm.generator.manual_seed(7)
    module.algorithm.self_play_latents.clear()
    negatives = module.algorithm.self_play(module.policy, clip_batch, [0, 1, 2, 3])
    played = torch.stack([negatives[i] for i in range(4)])
    torch.testing.assert_close(played, sample(start, module, clip_batch, 7), rtol=1e-5, atol=1e-5)
    live = sample(module.denoiser, module, clip_batch, 7)
    assert (played - live).abs().max() > 1e-3


def test_the_snapshot_and_the_cache_refresh_on_schedule(clip_batch):
    module = lora_module(refresh_every=3)
    refree = module.algorithm

    refree.loss(module.policy, clip_batch)
    assert len(refree.self_play_latents) == 4 and refree.self_play_sampled == 4
    refree.loss(module.policy, clip_batch)  # cached: nothing sampled again
    assert refree.self_play_sampled == 4
    train(module, clip_batch, 1)
    x_t, t = torch.randn(4, 192, 5, 8, 8), torch.full((4,), 400.0)
    cond = module.denoiser.condition(clip_batch)
    for step in (1, 2):
        refree.on_step_end(module.policy, step)
        assert len(refree.self_play_latents) == 4
    with module.reference() as lagged, torch.no_grad():
        assert (lagged(x_t, t, cond) - module.denoiser(x_t, t, cond)).abs().max() > 1e-4  # still the start
    refree.on_step_end(module.policy, 3)
    assert len(refree.self_play_latents) == 0 and refree.refreshes == 1
    with module.reference() as lagged, torch.no_grad():
        torch.testing.assert_close(lagged(x_t, t, cond), module.denoiser(x_t, t, cond), rtol=0, atol=0)


def test_unknown_negative_sources_are_named():
    with pytest.raises(ValueError, match="wobble"):
        ReFree(negatives={"wobble": 1.0})
