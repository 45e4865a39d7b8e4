"""The TalkingShapes world: determinism, the DESIGN.md bounds and formulas, and the dataset on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prefalign import metrics
from prefalign.data import media, synthetic
from prefalign.data.synthetic import TalkingShapesConfig

CFG = TalkingShapesConfig()
SEEDS = range(30)


def _video(frames: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] numpy (float 0..1 or uint8) -> [1, T, 3, H, W] float."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)[None]
    return video.float() / 255 if frames.dtype == np.uint8 else video.float()


def _sync(frames: np.ndarray, audio: np.ndarray, fps: float = CFG.fps) -> float:
    return metrics.sync_score(_video(frames), torch.from_numpy(audio)[None], CFG.sample_rate, fps).item()


def test_defaults_are_17_frames_32px_25fps_16khz() -> None:
    clip = synthetic.make_clip(0)
    assert clip.video.shape == (17, 32, 32, 3) and clip.video.dtype == np.float32
    assert clip.audio.shape == (17 * 16000 // 25,) and clip.audio.dtype == np.float32
    assert clip.reference.shape == (32, 32, 3)
    assert clip.pose.shape == (17, 8, 2) and clip.pose.dtype == np.float32
    assert clip.envelope.shape == clip.mouth.shape == (17,)
    assert 0.0 <= clip.video.min() and clip.video.max() <= 1.0
    assert 0.0 <= clip.pose.min() and clip.pose.max() <= 1.0
    assert 0.0 <= clip.mouth.min() and clip.mouth.max() == 1.0


def test_same_seed_same_clip_other_seed_differs() -> None:
    first, again, other = synthetic.make_clip(7), synthetic.make_clip(7), synthetic.make_clip(8)
    for name in ("video", "audio", "reference", "pose", "envelope", "mouth"):
        assert np.array_equal(getattr(first, name), getattr(again, name)), name
        assert not np.array_equal(getattr(first, name), getattr(other, name)), name
    assert first.identity == again.identity != other.identity


def test_identity_does_not_depend_on_clip_length() -> None:
    short = synthetic.make_clip(3, TalkingShapesConfig(num_frames=9))
    long = synthetic.make_clip(3, TalkingShapesConfig(num_frames=33))
    assert short.identity == long.identity
    assert np.array_equal(short.reference, long.reference)


def test_config_rejects_odd_sizes() -> None:
    with pytest.raises(ValueError, match="even"):
        TalkingShapesConfig(size=33)


def test_audio_follows_the_design() -> None:
    for seed in range(10):
        clip = synthetic.make_clip(seed)
        assert np.abs(clip.audio).max() <= 1.0
        # Gaps between syllables sit at the -40 dB noise floor (RMS 0.01).
        assert 0.005 < clip.envelope.min() < 0.02
        # The fundamental dominates the spectrum of a 1/k harmonic tone.
        spectrum = np.abs(np.fft.rfft(clip.audio))
        f0 = np.fft.rfftfreq(len(clip.audio), 1 / CFG.sample_rate)[np.argmax(spectrum)]
        assert 85.0 <= f0 <= 245.0


def test_envelope_and_mouth_follow_their_formulas() -> None:
    clip = synthetic.make_clip(1)
    span = CFG.sample_rate // CFG.fps
    frames = clip.audio.astype(np.float64).reshape(CFG.num_frames, span)
    np.testing.assert_allclose(clip.envelope, np.sqrt((frames**2).mean(axis=1)), rtol=1e-5)
    expected = np.clip(clip.envelope / np.percentile(clip.envelope, 95), 0, 1)
    np.testing.assert_allclose(clip.mouth, expected, rtol=1e-5)
    assert np.array_equal(synthetic.mouth_track(np.zeros(5)), np.zeros(5))


def test_keypoints_are_where_the_face_is_drawn() -> None:
    clip = synthetic.make_clip(2)
    pose = clip.pose
    nose, left_eye, right_eye, mouth, chin, neck, left_shoulder, right_shoulder = pose.transpose(1, 0, 2)
    assert np.all(left_eye[:, 0] > right_eye[:, 0])  # the subject's left eye is on the image's right
    assert np.all(left_eye[:, 1] < nose[:, 1]) and np.all(nose[:, 1] < mouth[:, 1]) and np.all(mouth[:, 1] < chin[:, 1])
    assert np.all(chin[:, 1] < neck[:, 1]) and np.all(left_shoulder[:, 0] > right_shoulder[:, 0])
    # The eye keypoints land on dark pixels.
    lum = synthetic.luminance(clip.video)
    for t in range(CFG.num_frames):
        for eye in (left_eye[t], right_eye[t]):
            x, y = (eye * CFG.size).astype(int)
            assert lum[t, y - 1 : y + 2, x - 1 : x + 2].min() < 0.3


def test_luminance_bounds_on_rendered_pixels() -> None:
    for seed in SEEDS:
        clip = synthetic.make_clip(seed)
        identity = clip.identity
        lum = synthetic.luminance(clip.reference)
        assert lum[0, 0] >= 0.35 and np.allclose(clip.reference[0, 0], identity.background, atol=1e-6)
        shirt = clip.reference[-1, CFG.size // 2]
        assert lum[-1, CFG.size // 2] >= 0.35 and np.allclose(shirt, identity.shirt, atol=1e-6)
        nose_x, nose_y = (synthetic.neutral_pose(identity)[0, 0] * CFG.size).astype(int)
        assert lum[nose_y, nose_x] >= 0.5 and np.allclose(clip.reference[nose_y, nose_x], identity.skin, atol=1e-6)

        # Every dark pixel of every frame is an eye or the mouth: nothing else may fool the sync expert.
        frames = synthetic.luminance(clip.video)
        ys, xs = np.mgrid[0 : CFG.size, 0 : CFG.size] + 0.5
        for t in range(CFG.num_frames):
            points = clip.pose[t] * CFG.size
            d = np.linalg.norm(points[1] - points[2])
            near = np.zeros((CFG.size, CFG.size), dtype=bool)
            for index, (rx, ry) in ((1, (0.3 * d, 0.3 * d)), (2, (0.3 * d, 0.3 * d)), (3, (0.4 * d, 0.7 * d))):
                near |= (np.abs(xs - points[index, 0]) <= rx + 1) & (np.abs(ys - points[index, 1]) <= ry + 1)
            assert frames[t][~near].min() >= 0.35, (seed, t)


def test_mouth_opens_with_the_mouth_track() -> None:
    clip = synthetic.make_clip(4)
    pose = np.repeat(clip.pose[:1], 5, axis=0)
    frames = synthetic.render(clip.identity, pose, np.linspace(0, 1, 5), CFG)
    dark = (synthetic.luminance(frames) < 0.3).sum(axis=(1, 2))
    assert np.all(np.diff(dark) > 0)
    # The reference is the neutral closed-mouth frame.
    neutral = synthetic.render(clip.identity, synthetic.neutral_pose(clip.identity), np.zeros(1), CFG)[0]
    assert np.array_equal(neutral, clip.reference)


def test_ground_truth_sync_is_high_in_memory() -> None:
    clips = [synthetic.make_clip(seed) for seed in SEEDS]
    assert min(_sync(clip.video, clip.audio) for clip in clips) >= 0.9


def _read_clip(manifest: Path, row: dict) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    folder = manifest.parent
    frames, fps = media.read_video(folder / row["video"])
    wav = media.read_audio(folder / row["audio"], sample_rate=CFG.sample_rate, resample=False)
    track = media.read_audio(folder / row["video"], sample_rate=CFG.sample_rate, resample=False)
    return frames, fps, wav, track


def test_write_dataset_round_trip(tmp_path: Path) -> None:
    manifest = synthetic.write_dataset(tmp_path / "shapes", num_clips=20, seed=0, cfg=CFG)
    assert manifest == tmp_path / "shapes" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 20 and len({row["id"] for row in rows}) == 20
    for index, row in enumerate(rows):
        assert set(row) == {"id", "video", "audio", "reference", "pose", "text"}
        assert not Path(row["video"]).is_absolute()
        clip = synthetic.make_clip(synthetic.clip_seed(0, index), CFG)
        frames, fps, wav, track = _read_clip(manifest, row)
        assert frames.shape == (17, 32, 32, 3) and fps == CFG.fps
        assert np.abs(frames / 255.0 - clip.video).mean() < 0.03
        assert np.abs(wav - clip.audio).max() <= 1 / 32768
        assert abs(track.shape[0] - clip.audio.shape[0]) <= 1024
        pose = np.load(manifest.parent / row["pose"])
        assert pose.dtype == np.float32 and np.array_equal(pose, clip.pose)
        reference = media.read_image(manifest.parent / row["reference"])
        assert np.array_equal(reference, synthetic.to_uint8(clip.reference))
        # Lip sync survives H.264 and AAC.
        assert _sync(frames, wav, fps) >= 0.9
        assert _sync(frames, track, fps) >= 0.9


def test_write_dataset_is_deterministic_and_prefix_stable(tmp_path: Path) -> None:
    small = synthetic.write_dataset(tmp_path / "small", num_clips=2, seed=3).parent
    large = synthetic.write_dataset(tmp_path / "large", num_clips=3, seed=3).parent
    other = synthetic.write_dataset(tmp_path / "other", num_clips=2, seed=4).parent
    for path in sorted((small / "clips").iterdir()):
        same = large / "clips" / path.name
        assert path.read_bytes() == same.read_bytes(), path.name
        assert path.read_bytes() != (other / "clips" / path.name).read_bytes(), path.name
    small_rows = (small / "manifest.jsonl").read_text().splitlines()
    assert small_rows == (large / "manifest.jsonl").read_text().splitlines()[:2]


def test_synth_prints_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic.synth(str(tmp_path / "demo"), num_clips=2, seed=1, frames=9, size=16, fps=20)
    manifest = Path(capsys.readouterr().out.strip())
    assert manifest == tmp_path / "demo" / "manifest.jsonl"
    row = json.loads(manifest.read_text().splitlines()[0])
    frames, fps = media.read_video(manifest.parent / row["video"])
    assert frames.shape == (9, 16, 16, 3) and fps == 20
