"""TalkingShapes metrics: the formulas on hand-made tensors, and the behaviour on perturbed clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefalign import metrics
from prefalign.data import synthetic
from prefalign.data.synthetic import TalkingShapesConfig

CFG = TalkingShapesConfig()
SEEDS = range(20)


def _video(frames: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] float numpy -> [1, T, 3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)[None].float()


def _sync(frames: np.ndarray, audio: np.ndarray, pose: np.ndarray | None = None) -> float:
    pose_tensor = None if pose is None else torch.from_numpy(pose)[None]
    audio_tensor = torch.from_numpy(audio)[None]
    return metrics.sync_score(_video(frames), audio_tensor, CFG.sample_rate, CFG.fps, pose=pose_tensor).item()


@pytest.fixture(scope="module")
def clips() -> list[synthetic.Clip]:
    return [synthetic.make_clip(seed) for seed in SEEDS]


def test_frame_envelope_matches_the_world() -> None:
    for fps, num_frames in ((25, 17), (29.97, 20)):
        audio = np.random.default_rng(0).normal(size=(2, 12000)).astype(np.float32)
        ours = metrics.frame_envelope(torch.from_numpy(audio), 16000, fps, num_frames)
        for row in range(2):
            world = synthetic.frame_envelope(audio[row], 16000, fps, num_frames)
            np.testing.assert_allclose(ours[row].numpy(), world, rtol=1e-5)


def test_frame_envelope_gives_zero_past_the_end_of_the_audio() -> None:
    envelope = metrics.frame_envelope(torch.ones(1, 640 * 3), 16000, 25, 5)
    assert envelope.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]


def test_luminance_is_rec601() -> None:
    video = torch.rand(2, 3, 3, 4, 5)
    expected = 0.299 * video[:, :, 0] + 0.587 * video[:, :, 1] + 0.114 * video[:, :, 2]
    torch.testing.assert_close(metrics.luminance(video), expected)


def test_mouth_openness_counts_dark_pixels_and_respects_the_box() -> None:
    video = torch.ones(1, 2, 3, 16, 16)
    video[0, 0, :, 2:4, 2:4] = 0.0  # 4 dark pixels far from the mouth
    video[0, 1, :, 9:12, 7:9] = 0.1  # 6 dark pixels at the mouth
    assert metrics.mouth_openness(video).tolist() == [[4.0, 6.0]]
    pose = torch.zeros(1, 2, 8, 2)
    pose[..., 1, :] = torch.tensor([10.0, 6.0]) / 16  # eyes 4 px apart: box ± (1.6, 2) px
    pose[..., 2, :] = torch.tensor([6.0, 6.0]) / 16
    pose[..., 3, :] = torch.tensor([8.0, 10.5]) / 16
    assert metrics.mouth_openness(video, pose).tolist() == [[0.0, 6.0]]


def test_pearson_is_zero_for_constants_and_never_nan() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    result = metrics.pearson(a, b)
    torch.testing.assert_close(result, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(metrics.pearson(a[:1], -b[:1]), torch.tensor([-1.0]))
    assert not metrics.pearson(b, a).isnan().any()


def test_jitter_of_linear_motion_is_zero_and_excess_can_be_negative() -> None:
    ramp = torch.linspace(0, 1, 9).view(1, 9, 1, 1, 1).expand(2, 9, 3, 4, 4)
    torch.testing.assert_close(metrics.jitter(ramp), torch.zeros(2))
    flicker = ramp.clone()
    flicker[:, 4] += 0.3
    assert (metrics.jitter(flicker) > 0).all()
    assert (metrics.jitter(ramp, ground_truth=flicker) < 0).all()


def test_jitter_over_kept_pixels_is_the_mean_over_the_counted_elements() -> None:
    """With ``keep``, the second difference at frame t counts where frames t-1, t and t+1 keep the pixel, and the
    mean runs over those elements only."""
    video = torch.rand(2, 5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(2, 5, 4, 4, dtype=torch.bool)
    keep[0, :, :2] = False  # clip 0: the top half is never counted
    keep[1, 3, 0, 0] = False  # clip 1: one pixel left out at frame 3, so from the differences at frames 2, 3 and 4
    second = (video[:, 2:] - 2 * video[:, 1:-1] + video[:, :-2]).square()  # [2, 3, 3, 4, 4], frames 1..3 centred
    expected_0 = second[0, :, :, 2:].mean()
    counted = torch.ones(3, 4, 4, dtype=torch.bool)
    counted[1:, 0, 0] = False  # centred at frames 2 and 3, each reading frame 3
    expected_1 = second[1].permute(1, 0, 2, 3)[:, counted].mean()
    torch.testing.assert_close(metrics.jitter(video, keep=keep), torch.stack([expected_0, expected_1]))
    # All kept is the plain metric; the ground truth is measured over the same pixels.
    torch.testing.assert_close(metrics.jitter(video, keep=torch.ones_like(keep)), metrics.jitter(video))
    truth = video.flip(1)
    torch.testing.assert_close(metrics.jitter(video, truth, keep),
                               metrics.jitter(video, keep=keep) - metrics.jitter(truth, keep=keep))
    assert metrics.jitter(video, keep=torch.zeros_like(keep)).isnan().all()  # nothing counted
    with pytest.raises(ValueError, match="keep must be"):
        metrics.jitter(video, keep=keep[:, :4])


def test_identity_drift_is_the_mean_colour_distance() -> None:
    reference = torch.full((1, 3, 4, 4), 0.5)
    video = torch.full((1, 5, 3, 4, 4), 0.5)
    video[:, :, 0] = 0.8  # red shifted by 0.3 in every frame
    torch.testing.assert_close(metrics.identity_drift(video, reference), torch.tensor([0.3]))


def test_ground_truth_sync_is_high(clips: list[synthetic.Clip]) -> None:
    for clip in clips:
        assert _sync(clip.video, clip.audio) >= 0.9
        assert _sync(clip.video, clip.audio, clip.pose) >= 0.9


def test_mouth_shifted_in_time_scores_low(clips: list[synthetic.Clip]) -> None:
    scores = []
    for clip in clips:
        delayed = np.concatenate([np.full(4, clip.mouth[0]), clip.mouth[:-4]])  # mouth lags the audio by 4 frames
        frames = synthetic.render(clip.identity, clip.pose, delayed, CFG)
        scores.append(_sync(frames, clip.audio))
        assert scores[-1] < _sync(clip.video, clip.audio)
    assert np.mean(scores) < 0.5


def test_frozen_mouth_scores_near_zero(clips: list[synthetic.Clip]) -> None:
    scores = []
    for clip in clips:
        frozen = np.full_like(clip.mouth, clip.mouth.mean())
        scores.append(_sync(synthetic.render(clip.identity, clip.pose, frozen, CFG), clip.audio))
    # Head drift still moves a few anti-aliased pixels across the threshold, so single clips scatter around 0.
    assert abs(np.mean(scores)) < 0.2
    assert np.mean(scores) < 0.9 * np.mean([_sync(clip.video, clip.audio) for clip in clips]) - 0.5


def test_a_still_frame_scores_exactly_zero(clips: list[synthetic.Clip]) -> None:
    clip = clips[0]
    still = np.repeat(clip.video[:1], CFG.num_frames, axis=0)
    assert _sync(still, clip.audio) == 0.0


def test_shuffled_frames_jitter_more_than_ground_truth(clips: list[synthetic.Clip]) -> None:
    rng = np.random.default_rng(0)
    for clip in clips:
        truth = _video(clip.video)
        shuffled = truth[:, torch.from_numpy(rng.permutation(CFG.num_frames))]
        assert metrics.jitter(shuffled).item() > metrics.jitter(truth).item()
        assert metrics.jitter(shuffled, ground_truth=truth).item() > 0
        assert metrics.jitter(truth, ground_truth=truth).item() == 0


def test_darkening_raises_identity_drift(clips: list[synthetic.Clip]) -> None:
    for clip in clips:
        truth = _video(clip.video)
        reference = torch.from_numpy(clip.reference).permute(2, 0, 1)[None]
        darkened = truth * 0.5
        drift = metrics.identity_drift(darkened, reference).item()
        assert drift > metrics.identity_drift(truth, reference).item() + 0.1


def test_metrics_are_batched_like_single_clips(clips: list[synthetic.Clip]) -> None:
    video = torch.cat([_video(clip.video) for clip in clips[:4]])
    audio = torch.stack([torch.from_numpy(clip.audio) for clip in clips[:4]])
    batched = metrics.sync_score(video, audio, CFG.sample_rate, CFG.fps)
    single = torch.cat([metrics.sync_score(v[None], a[None], CFG.sample_rate, CFG.fps) for v, a in zip(video, audio)])
    torch.testing.assert_close(batched, single)
    assert metrics.jitter(video).shape == (4,)


def test_dark_centroid_sits_between_the_eyes_and_the_mouth(clips: list[synthetic.Clip]) -> None:
    for clip in clips[:5]:
        centre = metrics.dark_centroid(_video(clip.video))[0]  # [T, 2] pixels
        keypoints = torch.from_numpy(clip.pose[:, 1:4]).float() * CFG.size  # eyes and mouth, in pixels
        low, high = keypoints.amin(dim=1), keypoints.amax(dim=1)
        assert ((centre >= low - 1) & (centre <= high + 1)).all()


def test_head_offset_measures_displacement_in_pixels(clips: list[synthetic.Clip]) -> None:
    truth = _video(clips[0].video)
    assert metrics.head_offset(truth, truth).item() == 0.0
    moved = torch.roll(truth, shifts=3, dims=-1)  # the whole picture 3 pixels to the right
    assert metrics.head_offset(moved, truth).item() == pytest.approx(3.0, abs=0.3)
