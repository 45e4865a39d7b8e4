"""Round trips and bad-input errors of prefalign.data.media."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from prefalign.data import media
from prefalign.data.errors import DataError

FPS = 25
RATE = 16000


def _frames(num_frames: int = 17, size: int = 32) -> np.ndarray:
    # A moving gradient with a moving square: smooth areas and edges, like real footage.
    y, x = np.mgrid[0:size, 0:size]
    frames = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = (x * 6 + t * 3) % 256
        frames[t, ..., 1] = y * 5 + 40
        frames[t, ..., 2] = 128
        frames[t, 8 + t // 4 : 16 + t // 4, 8:16] = (200, 30, 60)
    return frames


def _tone(frequency: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    time = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * time)).astype(np.float32)


def _peak_frequency(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[np.argmax(spectrum)])


def _write_pcm(path: Path, samples: np.ndarray, rate: int) -> None:
    """A wav with any channel count and rate, written without media.py (so its checks can be tested)."""
    samples = np.atleast_2d(samples)  # [C, S]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(samples.shape[0])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.round(samples.T * 32767).astype("<i2").tobytes())


@pytest.fixture
def video_with_audio(tmp_path: Path) -> Path:
    path = tmp_path / "clip.mp4"
    media.write_video(path, _frames(), FPS, audio=_tone(220.0, 17 / FPS, RATE), sample_rate=RATE)
    return path


def test_video_round_trip_keeps_frames_size_and_fps(video_with_audio: Path) -> None:
    frames, fps = media.read_video(video_with_audio)
    assert frames.dtype == np.uint8
    assert frames.shape == (17, 32, 32, 3)
    assert fps == FPS
    # yuv420p halves the chroma resolution, so colour edges blur; the average pixel stays close.
    assert np.abs(frames.astype(float) - _frames()).mean() < 6.0


def test_audio_track_round_trip_keeps_duration_and_tone(video_with_audio: Path) -> None:
    audio = media.read_audio(video_with_audio, sample_rate=RATE)
    assert audio.dtype == np.float32
    assert abs(audio.shape[0] - 17 / FPS * RATE) <= 1024  # one AAC frame of padding at most
    assert abs(_peak_frequency(audio, RATE) - 220.0) < 3.0


def test_non_integer_fps_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ntsc.mp4"
    media.write_video(path, _frames(9), 29.97)
    _, fps = media.read_video(path)
    assert fps == pytest.approx(29.97, abs=1e-3)


def test_mpeg4_fallback_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "video_codec", lambda: "mpeg4")
    path = tmp_path / "fallback.mp4"
    media.write_video(path, _frames(), FPS, audio=_tone(220.0, 17 / FPS, RATE))
    frames, fps = media.read_video(path)
    assert frames.shape == (17, 32, 32, 3) and fps == FPS
    assert np.abs(frames.astype(float) - _frames()).mean() < 8.0


def test_write_video_is_atomic_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    media.write_video(path, _frames(5), FPS)
    media.write_video(path, _frames(9), FPS)
    assert media.read_video(path)[0].shape[0] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temp file left behind


def test_write_video_rejects_odd_sizes_and_bad_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        media.write_video(tmp_path / "odd.mp4", np.zeros((3, 31, 32, 3), np.uint8), FPS)
    with pytest.raises(ValueError, match="uint8"):
        media.write_video(tmp_path / "float.mp4", np.zeros((3, 32, 32, 3), np.float32), FPS)
    assert not any(tmp_path.iterdir())


def test_wav_round_trip_is_exact_to_16_bits(tmp_path: Path) -> None:
    audio = _tone(300.0, 0.5, RATE)
    media.write_wav(tmp_path / "a.wav", audio, RATE)
    decoded = media.read_audio(tmp_path / "a.wav", sample_rate=RATE, resample=False)
    assert decoded.shape == audio.shape
    assert np.abs(decoded - audio).max() <= 1 / 32768


def test_resample_keeps_duration_and_frequency() -> None:
    audio = _tone(440.0, 1.0, 44100)
    resampled = media.resample(audio, 44100, RATE)
    assert resampled.dtype == np.float32
    assert resampled.shape == (RATE,)
    assert abs(_peak_frequency(resampled, RATE) - 440.0) < 2.0


def test_read_audio_resamples_a_44k_file(tmp_path: Path) -> None:
    _write_pcm(tmp_path / "cd.wav", _tone(440.0, 0.5, 44100), 44100)
    audio = media.read_audio(tmp_path / "cd.wav", sample_rate=RATE)
    assert abs(audio.shape[0] - RATE // 2) <= 1
    assert abs(_peak_frequency(audio, RATE) - 440.0) < 3.0


def test_read_audio_mixes_stereo_to_mono(tmp_path: Path) -> None:
    left = _tone(440.0, 0.25, RATE, amplitude=0.6)
    _write_pcm(tmp_path / "stereo.wav", np.stack([left, np.zeros_like(left)]), RATE)
    audio = media.read_audio(tmp_path / "stereo.wav", sample_rate=RATE)
    assert np.abs(audio - left / 2).max() < 1e-3


def test_image_round_trip_is_exact(tmp_path: Path) -> None:
    image = _frames(1)[0]
    media.write_image(tmp_path / "ref.png", image)
    assert np.array_equal(media.read_image(tmp_path / "ref.png"), image)


def _assert_data_error(error: pytest.ExceptionInfo[DataError], path: Path, field: str, words: str) -> None:
    assert error.value.path == str(path)
    assert error.value.field == field
    assert words in str(error.value)
    assert str(path) in str(error.value) and field in str(error.value)


def test_corrupt_mp4_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError) as error:
        media.read_video(path)
    _assert_data_error(error, path, "video", "cannot open")


def test_truncated_mp4_is_a_data_error(video_with_audio: Path, tmp_path: Path) -> None:
    data = video_with_audio.read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as error:
        media.read_video(path)
    _assert_data_error(error, path, "video", "")
    assert any(words in error.value.message for words in ("truncated", "cannot decode", "cannot open"))
    with pytest.raises(DataError) as error:
        media.read_audio(path)
    _assert_data_error(error, path, "audio", "")
    assert any(words in error.value.message for words in ("truncated", "cannot decode", "cannot open"))


def test_mp4_without_audio_is_a_data_error_when_audio_is_needed(tmp_path: Path) -> None:
    path = tmp_path / "mute.mp4"
    media.write_video(path, _frames(5), FPS)
    with pytest.raises(DataError) as error:
        media.read_audio(path)
    _assert_data_error(error, path, "audio", "has no audio stream")


def test_wav_is_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "speech.wav"
    media.write_wav(path, _tone(200.0, 0.2, RATE), RATE)
    with pytest.raises(DataError) as error:
        media.read_video(path, field="rejected")
    _assert_data_error(error, path, "rejected", "has no video stream")


def test_silent_wav_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "silent.wav"
    media.write_wav(path, np.zeros(RATE, dtype=np.float32), RATE)
    with pytest.raises(DataError) as error:
        media.read_audio(path)
    _assert_data_error(error, path, "audio", "audio is silent")


def test_wrong_rate_without_resampling_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "cd.wav"
    _write_pcm(path, _tone(440.0, 0.2, 44100), 44100)
    with pytest.raises(DataError) as error:
        media.read_audio(path, sample_rate=RATE, resample=False)
    _assert_data_error(error, path, "audio", "44100 Hz, expected 16000 Hz")


def test_rate_below_8k_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "phone.wav"
    _write_pcm(path, _tone(200.0, 0.2, 4000), 4000)
    with pytest.raises(DataError) as error:
        media.read_audio(path)
    _assert_data_error(error, path, "audio", "below the minimum")


@pytest.mark.parametrize(
    ("reader", "field"),
    [(media.read_video, "video"), (media.read_audio, "audio"), (media.read_image, "reference")],
)
def test_missing_file_is_a_data_error(tmp_path: Path, reader, field: str) -> None:
    path = tmp_path / "nowhere.bin"
    with pytest.raises(DataError) as error:
        reader(path)
    _assert_data_error(error, path, field, "file not found")


def test_corrupt_image_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(b"not a png at all")
    with pytest.raises(DataError) as error:
        media.read_image(path)
    _assert_data_error(error, path, "reference", "cannot read image")
