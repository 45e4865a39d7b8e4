"""Rewards on real TalkingShapes clips: texture and jitter guards, the composite reward, GRPO group advantages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefalign import metrics
from prefalign.data import synthetic
from prefalign.rewards.base import Reward
from prefalign.rewards.composite import CompositeReward, group_advantages
from prefalign.rewards.regularizers import IdentityReward, JitterPenalty, TextureReward, high_frequency_energy
from prefalign.rewards.sync import SyncExpert

CFG = synthetic.TalkingShapesConfig()
SEEDS = (0, 1, 2)


def _video(frames: np.ndarray) -> torch.Tensor:
    """``[T, H, W, 3]`` float numpy -> ``[1, T, 3, H, W]``."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)[None].float()


def _cond(clip: synthetic.Clip) -> dict[str, torch.Tensor]:
    """A clip as a batch of one: ``video [1, T, 3, H, W]``, ``reference [1, 3, H, W]``, ``pose``, ``audio``."""
    return {
        "video": _video(clip.video),
        "reference": torch.from_numpy(clip.reference).permute(2, 0, 1)[None].float(),
        "pose": torch.from_numpy(clip.pose)[None],
        "audio": torch.from_numpy(clip.audio)[None],
    }


def _box_blur(video: torch.Tensor) -> torch.Tensor:
    """3×3 box blur of every frame (edges replicated)."""
    frames = video.flatten(0, 2)[:, None]
    blurred = F.avg_pool2d(F.pad(frames, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return blurred.view(video.shape)


def _noisy(video: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(seed))
    return (video + std * noise).clamp(0, 1)


def _shuffled(video: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return video[:, torch.randperm(video.shape[1], generator=torch.Generator().manual_seed(seed))]


@pytest.fixture(scope="module")
def clips() -> list[synthetic.Clip]:
    return [synthetic.make_clip(seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def batch(clips) -> dict[str, torch.Tensor]:
    """The three clips as one batch."""
    conds = [_cond(clip) for clip in clips]
    return {key: torch.cat([cond[key] for cond in conds]) for key in conds[0]}


class Fixed(Reward):
    """Returns the given terms whatever the videos."""

    def __init__(self, **terms: torch.Tensor):
        self.terms = terms

    def score(self, videos, cond):
        return dict(self.terms)


# Texture.


def test_high_frequency_energy_is_the_mean_squared_laplacian() -> None:
    image = torch.zeros(1, 3, 5, 5)
    image[0, :, 2, 2] = 1.0  # one white pixel: the Laplacian of the 3×3 valid area is 1 four times and −4 once
    assert high_frequency_energy(image).item() == pytest.approx((4 * 1 + 16) / 9)
    assert high_frequency_energy(torch.full((2, 3, 3, 8, 8), 0.7)).abs().max() < 1e-10


def test_texture_scores_the_ground_truth_near_zero_and_blur_and_noise_lower(clips) -> None:
    both, blur_only = TextureReward(), TextureReward(penalize="blur")
    for clip in clips:
        cond = _cond(clip)
        truth = both.score(cond["video"], cond)["texture"].item()
        blurred = both.score(_box_blur(cond["video"]), cond)["texture"].item()
        noisy = both.score(_noisy(cond["video"], 0.05), cond)["texture"].item()
        assert -0.5 < truth <= 0.0
        assert blurred < truth - 1.0
        assert noisy < truth - 0.3
        # One-sided: noise (more high-frequency energy than the reference) goes free, blur does not.
        assert blur_only.score(_noisy(cond["video"], 0.05), cond)["texture"].item() > noisy + 0.3
        assert blur_only.score(_box_blur(cond["video"]), cond)["texture"].item() == pytest.approx(blurred, rel=1e-4)
        # The reference itself, repeated, matches exactly.
        still = cond["reference"][:, None].expand_as(cond["video"])
        assert both.score(still, cond)["texture"].item() == pytest.approx(0.0, abs=1e-6)


def test_texture_tolerance_and_name(clips) -> None:
    cond = _cond(clips[0])
    scores = TextureReward(tolerance=1.0, name="skin").score(cond["video"], cond)
    assert list(scores) == ["skin"] and scores["skin"].item() == 0.0
    assert TextureReward(tolerance=1.0).score(_box_blur(cond["video"]), cond)["texture"].item() < -0.5


def test_texture_computes_in_fp32_and_checks_the_reference(clips) -> None:
    cond = _cond(clips[0])
    full = TextureReward().score(cond["video"], cond)["texture"]
    half = TextureReward().score(cond["video"].bfloat16(), {**cond, "reference": cond["reference"].bfloat16()})
    assert half["texture"].dtype == torch.float32
    torch.testing.assert_close(half["texture"], full, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="reference"):
        TextureReward().score(cond["video"], {**cond, "reference": cond["reference"][..., :16, :16]})
    with pytest.raises(ValueError, match="penalize"):
        TextureReward(penalize="noise")


# Jitter.


def test_jitter_with_ground_truth_passes_the_truth_and_penalises_shuffled_and_noisy_frames(clips) -> None:
    reward = JitterPenalty()
    for clip in clips:
        cond = _cond(clip)
        assert reward.score(cond["video"], cond)["jitter"].item() == 0.0
        assert reward.score(_shuffled(cond["video"]), cond)["jitter"].item() < -0.003
        assert reward.score(_noisy(cond["video"], 0.03), cond)["jitter"].item() < -0.003
        # Smoother than the truth is not rewarded: a frozen video scores 0 too.
        frozen = cond["video"][:, :1].expand_as(cond["video"])
        assert reward.score(frozen, cond)["jitter"].item() == 0.0


def test_identity_catches_the_darkening_hack_and_equals_the_colour_drift(clips) -> None:
    """Darkening the face raises the dark-pixel count (the sync expert's cheap hack); the identity term falls with
    it, and it is exactly −scale times the metric."""
    reward = IdentityReward(scale=2.0, name="id")
    for clip in clips:
        cond = _cond(clip)
        truth = reward.score(cond["video"], cond)["id"]
        darker = reward.score(cond["video"] * 0.8, cond)["id"]
        assert -0.1 < truth.item() <= 0 and darker.item() < truth.item() - 0.05
        expected = -2.0 * metrics.identity_drift(cond["video"], cond["reference"])
        torch.testing.assert_close(truth, expected)
    with pytest.raises(ValueError, match="needs 'reference'"):
        reward.score(_cond(clips[0])["video"], {})
    with pytest.raises(ValueError, match="scale must be positive"):
        IdentityReward(scale=0)


def test_jitter_from_the_pose_lets_real_head_motion_pass(clips) -> None:
    for clip in clips:
        # Head motion only (mouth closed): the motion the pose accounts for.
        head = _video(synthetic.render(clip.identity, clip.pose, np.zeros(CFG.num_frames), CFG))
        cond = {key: value for key, value in _cond(clip).items() if key != "video"}
        from_pose = JitterPenalty().score(head, cond)["jitter"].item()
        raw = JitterPenalty(implied="none").score(head, cond)["jitter"].item()
        shuffled = JitterPenalty().score(_shuffled(head), cond)["jitter"].item()
        assert JitterPenalty().implied_energy(head, cond).item() > 0
        assert raw < from_pose <= 0.0
        assert abs(from_pose) < 0.7 * abs(raw)
        assert shuffled < 5 * from_pose and shuffled < -0.002
        # Keypoints given in pixels with pose_scale=1 are the same estimate.
        in_pixels = {**cond, "pose": cond["pose"] * CFG.size}
        assert JitterPenalty(pose_scale=1.0).score(head, in_pixels)["jitter"].item() == pytest.approx(
            from_pose, rel=1e-5
        )


def test_jitter_sources_and_scale(clips) -> None:
    cond = _cond(clips[0])
    shuffled = _shuffled(cond["video"])
    without_truth = {key: value for key, value in cond.items() if key != "video"}
    assert JitterPenalty(implied="ground_truth").score(cond["video"], cond)["jitter"].item() == 0.0
    # auto prefers the ground truth to the pose.
    assert JitterPenalty().score(cond["video"], cond)["jitter"].item() == 0.0
    assert JitterPenalty().score(cond["video"], without_truth)["jitter"].item() < 0.0
    base = JitterPenalty(implied="none").score(shuffled, {})["jitter"]
    torch.testing.assert_close(JitterPenalty(implied="none", scale=100.0).score(shuffled, {})["jitter"], 100 * base)
    with pytest.raises(ValueError, match="needs 'video'"):
        JitterPenalty(implied="ground_truth").score(shuffled, without_truth)
    with pytest.raises(ValueError, match="needs 'pose'"):
        JitterPenalty(implied="pose").score(shuffled, {"reference": cond["reference"]})
    with pytest.raises(ValueError, match="pose"):
        JitterPenalty(implied="pose").score(shuffled, {**without_truth, "pose": cond["pose"][:, :5]})


def test_jitter_without_the_mouth_lets_the_mouth_move_and_still_catches_flicker_elsewhere(clips) -> None:
    """exclude_mouth: the mouth's own motion (what the audio implies, the sync term's to judge) costs nothing, a
    flicker outside the mouth box costs as much as it would anywhere, and both energies leave the box out."""
    for clip in clips:
        cond = _cond(clip)
        without_truth = {key: value for key, value in cond.items() if key != "video"}
        height, width = cond["video"].shape[-2:]
        box = metrics.training_mouth_box(cond["pose"], height, width)  # [1, T, H, W]
        # The mouth opened three times as wide as the truth's: a change inside the box only.
        still = _video(synthetic.render(clip.identity, clip.pose, np.zeros(CFG.num_frames), CFG))
        wide = _video(synthetic.render(clip.identity, clip.pose, np.clip(3 * clip.mouth, 0, 1), CFG))
        assert not ((wide - still).abs().sum(2) > 0)[~box].any()  # the box holds every pixel of the mouth
        assert JitterPenalty(implied="pose").score(wide, without_truth)["jitter"] < JitterPenalty(
            implied="pose").score(still, without_truth)["jitter"]  # the whole-frame penalty counts the mouth
        outside = JitterPenalty(implied="pose", exclude_mouth=True)
        assert outside.score(wide, without_truth)["jitter"].item() == outside.score(still, without_truth)["jitter"].item()
        # A flicker outside the box is penalised; the same energy is measured by the metric over the kept pixels.
        flicker = cond["video"].clone()
        flicker[:, 4][(~box[:, 4]).unsqueeze(1).expand_as(flicker[:, 4])] += 0.2
        flicker = flicker.clamp(0, 1)
        excess = JitterPenalty(implied="ground_truth", exclude_mouth=True, scale=10.0).score(flicker, cond)["jitter"]
        expected = -10.0 * metrics.jitter(flicker, cond["video"], keep=~box).clamp(min=0)
        torch.testing.assert_close(excess, expected)
        assert excess.item() < -0.003
        # The truth scores 0 against itself with the box left out.
        assert JitterPenalty(exclude_mouth=True).score(cond["video"], cond)["jitter"].item() == 0.0
    with pytest.raises(ValueError, match="exclude_mouth=True\\) needs 'pose'"):
        JitterPenalty(implied="none", exclude_mouth=True).score(cond["video"], {})
    with pytest.raises(ValueError, match="frame by frame"):
        JitterPenalty(implied="none", exclude_mouth=True).score(cond["video"], {"pose": cond["pose"][:, :5]})


def test_batched_scores_equal_one_by_one(clips, batch) -> None:
    spoiled = torch.cat(
        [_box_blur(batch["video"][:1]), _shuffled(batch["video"][1:2]), _noisy(batch["video"][2:], 0.03)]
    )
    without_truth = {key: value for key, value in batch.items() if key != "video"}
    rewards = [
        (TextureReward(), batch),
        (JitterPenalty(), batch),
        (JitterPenalty(), without_truth),
        (JitterPenalty(implied="none"), without_truth),
        (CompositeReward([SyncExpert(), TextureReward(), JitterPenalty()], weights={"jitter": 100.0}), batch),
    ]
    for reward, cond in rewards:
        together, _ = reward.total(spoiled, cond)
        alone = torch.cat(
            [reward.total(spoiled[i : i + 1], {k: v[i : i + 1] for k, v in cond.items()})[0] for i in range(3)]
        )
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-7)


# Composite.


def test_composite_weighs_the_terms_of_every_child(batch) -> None:
    videos = _box_blur(batch["video"])
    composite = CompositeReward(
        [SyncExpert(), TextureReward(), JitterPenalty()], weights={"texture": 0.5, "jitter": 10.0}
    )
    total, terms = composite.total(videos, batch)
    assert sorted(terms) == ["jitter", "sync", "texture"]
    for name, child in (("sync", SyncExpert()), ("texture", TextureReward()), ("jitter", JitterPenalty())):
        torch.testing.assert_close(terms[name], child.score(videos, batch)[name])
    torch.testing.assert_close(total, terms["sync"] + 0.5 * terms["texture"] + 10.0 * terms["jitter"])


def test_composite_batch_normalisation_standardises_each_term() -> None:
    composite = CompositeReward(
        [Fixed(a=torch.tensor([1.0, 2.0, 4.0, 7.0]), b=torch.tensor([0.3, 0.3, 0.3, 0.3]))],
        weights={"b": 5.0},
        normalize="batch",
    )
    normalised = composite.normalized(composite.score(torch.zeros(4, 3, 3, 4, 4), {}))
    assert normalised["a"].mean().abs() < 1e-6
    assert normalised["a"].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert normalised["b"].tolist() == [0.0] * 4  # a constant term gives 0, not noise divided by eps
    total, terms = composite.total(torch.zeros(4, 3, 3, 4, 4), {})
    torch.testing.assert_close(total, normalised["a"])
    assert terms["b"].tolist() == pytest.approx([0.3] * 4)  # the raw terms come back for logging


def test_composite_running_normalisation_matches_the_statistics_of_all_batches() -> None:
    first, second = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([7.0, -3.0])
    composite = CompositeReward([Fixed(a=first)], normalize="running")
    composite.total(torch.zeros(3, 3, 3, 4, 4), {})
    composite.terms = [Fixed(a=second)]
    total, _ = composite.total(torch.zeros(2, 3, 3, 4, 4), {})
    everything = torch.cat([first, second])
    stats = composite.running_stats["a"]
    assert stats["count"] == 5
    assert stats["mean"] == pytest.approx(everything.mean().item())
    assert stats["m2"] / stats["count"] == pytest.approx(everything.var(unbiased=False).item())
    expected = (second - everything.mean()) / (everything.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(total, expected)
    restored = CompositeReward([Fixed(a=second)], normalize="running")
    restored.load_state_dict(composite.state_dict())
    assert restored.running_stats == composite.running_stats


def test_composite_errors_name_the_terms(clips) -> None:
    cond = _cond(clips[0])
    with pytest.raises(ValueError, match="'texture' comes from both TextureReward and TextureReward"):
        CompositeReward([TextureReward(), TextureReward()]).score(cond["video"], cond)
    CompositeReward([TextureReward(), TextureReward(name="texture_2")]).score(cond["video"], cond)
    with pytest.raises(ValueError, match=r"unknown reward terms \['texure'\]; the terms are \['jitter', 'texture'\]"):
        CompositeReward([TextureReward(), JitterPenalty()], weights={"texure": 2.0}).total(cond["video"], cond)
    broken = CompositeReward([Fixed(good=torch.ones(2), judge=torch.tensor([0.5, float("nan")]))])
    with pytest.raises(FloatingPointError, match="'judge'"):
        broken.total(torch.zeros(2, 3, 3, 4, 4), {})
    with pytest.raises(FloatingPointError, match="'judge'"):
        broken.weighted_advantages({"judge": torch.tensor([0.5, float("inf")])}, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="normalize"):
        CompositeReward([TextureReward()], normalize="group")


def test_composite_is_built_from_class_path_yaml() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--reward", type=Reward)
    config = parser.parse_string(
        """
        reward:
          class_path: prefalign.rewards.composite.CompositeReward
          init_args:
            terms:
              - class_path: prefalign.rewards.sync.SyncExpert
              - class_path: prefalign.rewards.regularizers.TextureReward
                init_args: {penalize: blur}
              - class_path: prefalign.rewards.regularizers.JitterPenalty
                init_args: {motion_gain: 2.0, name: shake}
            weights: {shake: 50.0}
            normalize: running
            aggregate: advantage
        """
    )
    reward = parser.instantiate_classes(config).reward
    assert isinstance(reward, CompositeReward)
    assert [type(term).__name__ for term in reward.terms] == ["SyncExpert", "TextureReward", "JitterPenalty"]
    assert reward.terms[1].penalize == "blur" and reward.terms[2].name == "shake"
    assert (reward.weights, reward.normalize, reward.aggregate) == ({"shake": 50.0}, "running", "advantage")


# GRPO advantages.


def test_group_advantages_standardise_within_groups() -> None:
    rewards = torch.tensor([0.1, 0.5, 0.9, 2.0, 2.0, 2.0, -1.0, 3.0, 0.2, 0.7])
    groups = torch.tensor([7, 7, 7, 3, 3, 3, 9, 9, 1, 7])  # ids need be neither contiguous nor sorted
    advantages = group_advantages(rewards, groups)
    for group in groups.unique():
        members = groups == group
        assert advantages[members].mean().abs() < 1e-6
        r = rewards[members]
        if r.numel() > 1 and r.std() > 0:
            torch.testing.assert_close(advantages[members], (r - r.mean()) / (r.std(unbiased=False) + 1e-4))
    assert advantages[3:6].tolist() == [0.0, 0.0, 0.0]  # a constant group
    assert advantages[8].item() == 0.0  # a group of one
    assert torch.isfinite(advantages).all()


def test_group_advantages_clip_and_global_std() -> None:
    rewards = torch.tensor([0.0] * 99 + [1.0])  # one outlier: (1 − 0.01) / 0.0995 ≈ 9.95 standard deviations
    groups = torch.zeros(100, dtype=torch.long)
    assert group_advantages(rewards, groups).max().item() == 5.0
    assert group_advantages(rewards, groups, clip=None).max().item() == pytest.approx(9.94, abs=0.01)
    rewards = torch.tensor([0.0, 1.0, 10.0, 30.0])
    groups = torch.tensor([0, 0, 1, 1])
    global_std = rewards.std(unbiased=False)
    expected = torch.tensor([-0.5, 0.5, -10.0, 10.0]) / (global_std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, groups, global_std=True), expected)
    per_group = torch.tensor([-0.5 / (0.5 + 1e-4), 0.5 / (0.5 + 1e-4), -10.0 / (10.0 + 1e-4), 10.0 / (10.0 + 1e-4)])
    torch.testing.assert_close(group_advantages(rewards, groups), per_group)
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(rewards, groups[:3])


def test_weighted_advantages_equal_the_hand_computation() -> None:
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    terms = {
        "judge": torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 8.0]),
        "jitter": torch.tensor([-0.1, 0.0, -0.3, 0.0, 0.0, 0.0]),
    }
    composite = CompositeReward([Fixed(**terms)], weights={"judge": 2.0}, aggregate="advantage")

    def by_hand(r: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(r)
        for g in (0, 1):
            x = r[groups == g]
            out[groups == g] = 0 if x.max() == x.min() else (x - x.mean()) / (x.std(unbiased=False) + 1e-4)
        return out

    expected = 2.0 * by_hand(terms["judge"]) + by_hand(terms["jitter"])
    torch.testing.assert_close(composite.weighted_advantages(terms, groups), expected)
    total, _ = composite.total(torch.zeros(6, 3, 3, 4, 4), {})  # the weighted sum is still there for logging
    torch.testing.assert_close(total, 2.0 * terms["judge"] + terms["jitter"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rewards_run_on_the_gpu_in_bf16(batch) -> None:
    reward = CompositeReward([SyncExpert(), TextureReward(), JitterPenalty()], normalize="batch")
    on_cpu, terms_cpu = reward.total(batch["video"], batch)
    on_gpu = {key: value.cuda() for key, value in batch.items()}
    total, terms = reward.total(on_gpu["video"].bfloat16(), {**on_gpu, "reference": on_gpu["reference"].bfloat16()})
    assert total.device.type == "cuda" and terms["texture"].dtype == torch.float32
    torch.testing.assert_close(terms["jitter"].cpu(), terms_cpu["jitter"], atol=1e-3, rtol=0)
    advantages = reward.weighted_advantages(terms, torch.tensor([0, 0, 1], device="cuda"))
    assert advantages.device.type == "cuda" and torch.isfinite(advantages).all()


def test_composite_leaves_masks_out_of_the_sum_and_drops_masked_samples() -> None:
    """A judge's validity mask is not a reward; a sample it drops (NaN aspects) gets a NaN total, no error."""
    from prefalign.rewards import CompositeReward
    from prefalign.rewards.base import Reward

    class Judge(Reward):
        mask_terms = ("judge_valid",)

        def score(self, videos, cond):
            return {"judge/lip_sync": torch.tensor([0.5, float("nan"), 1.0]),
                    "judge_valid": torch.tensor([1.0, 0.0, 1.0])}

    class Constant(Reward):
        def score(self, videos, cond):
            return {"other": torch.tensor([1.0, 2.0, 3.0])}

    reward = CompositeReward([Judge(), Constant()], weights={"judge/lip_sync": 2.0})
    total, terms = reward.total(torch.zeros(3, 2, 3, 4, 4), {})
    assert torch.isnan(total[1])
    torch.testing.assert_close(total[[0, 2]], torch.tensor([2 * 0.5 + 1.0, 2 * 1.0 + 3.0]))
    assert "judge_valid" in terms
    with pytest.raises(ValueError, match="unknown reward terms"):
        CompositeReward([Judge()], weights={"judge_valid": 1.0}).total(torch.zeros(3, 2, 3, 4, 4), {})
    advantages = reward.weighted_advantages(
        {name: value[[0, 2]] for name, value in terms.items()}, torch.tensor([0, 0]))
    expected = 2 * 0.25 / (0.25 + 1e-4) + 1 / (1 + 1e-4)  # two terms' group advantages, weighted; no mask term
    torch.testing.assert_close(advantages, torch.tensor([-expected, expected]))
