"""SyncNet's Sync-C / Sync-D: the published weights layout, safe loading, MFCC against a float64 numpy reference,
the offset search on clips with a known shift, and face crops. No weights are downloaded: random ones stand in."""

import decimal
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prefalign.data import media
from prefalign.data.errors import DataError
from prefalign.data.synthetic import TalkingShapesConfig, make_clip, write_dataset
from prefalign.syncnet import (
    SyncMetric,
    SyncNet,
    face_crops,
    load_syncnet,
    mfcc,
    sync_scores,
)

# ---------------------------------------------------------------------------------------------------------------
# The published layout, written down from SyncNetModel.py's class S (joonson/syncnet_python), not from our module
# ---------------------------------------------------------------------------------------------------------------

#: nn.Sequential index -> convolution weight shape; a BatchNorm follows each at index + 1.
AUDIO_CONVS = {0: (64, 1, 3, 3), 4: (192, 64, 3, 3), 8: (384, 192, 3, 3), 11: (256, 384, 3, 3),
               14: (256, 256, 3, 3), 18: (512, 256, 5, 4)}
LIP_CONVS = {0: (96, 3, 5, 7, 7), 4: (256, 96, 1, 5, 5), 8: (256, 256, 1, 3, 3), 11: (256, 256, 1, 3, 3),
             14: (256, 256, 1, 3, 3), 18: (512, 256, 1, 6, 6)}


def _batch_norm(keys: dict, prefix: str, channels: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}.{name}"] = (channels,)
    keys[f"{prefix}.num_batches_tracked"] = ()


def published_layout() -> dict:
    keys = {}
    for stream, convs in (("netcnnaud", AUDIO_CONVS), ("netcnnlip", LIP_CONVS)):
        for index, shape in convs.items():
            keys[f"{stream}.{index}.weight"] = shape
            keys[f"{stream}.{index}.bias"] = (shape[0],)
            _batch_norm(keys, f"{stream}.{index + 1}", shape[0])
    for head in ("netfcaud", "netfclip"):
        keys[f"{head}.0.weight"], keys[f"{head}.0.bias"] = (512, 512), (512,)
        _batch_norm(keys, f"{head}.1", 512)
        keys[f"{head}.3.weight"], keys[f"{head}.3.bias"] = (1024, 512), (1024,)
    return keys


def random_state(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in published_layout().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.05
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("syncnet") / "syncnet_v2.model"
    torch.save(random_state(), path)
    return path


def test_architecture_matches_the_published_layout():
    ours = {key: tuple(value.shape) for key, value in SyncNet().state_dict().items()}
    assert ours == published_layout()
    assert len(ours) == 102


def test_loads_published_layout_and_embeds(weights_file):
    net = load_syncnet(weights_file)
    assert not net.training
    state = random_state()
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert net.forward_audio(torch.randn(2, 1, 13, 20)).shape == (2, 1024)
        assert net.forward_lip(torch.rand(2, 3, 5, 224, 224) * 255).shape == (2, 1024)
    with pytest.raises(ValueError, match="224"):
        net.forward_lip(torch.rand(1, 3, 5, 112, 112))


def test_loads_a_file_without_batch_norm_counters(tmp_path):
    # Files saved before PyTorch 0.4.1 have no num_batches_tracked; inference does not use it.
    state = {k: v for k, v in random_state().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.model"
    torch.save(state, path)
    net = load_syncnet(path)
    assert torch.equal(net.netcnnlip[0].weight, state["netcnnlip.0.weight"])


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.model"
    torch.save({"netcnnaud.0.weight": _RunsCode(marker)}, path)
    with pytest.raises(DataError, match="run code") as error:
        load_syncnet(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_refuses_bad_files_naming_them(tmp_path, weights_file):
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated") as error:
        load_syncnet(truncated)
    assert str(truncated) in str(error.value) and "model.evaluation.syncnet" in str(error.value)

    state = random_state()
    del state["netcnnlip.0.weight"]
    missing = tmp_path / "missing.model"
    torch.save(state, missing)
    with pytest.raises(DataError, match=r"missing keys \['netcnnlip.0.weight'\]") as error:
        load_syncnet(missing)
    assert str(missing) in str(error.value)

    state = random_state()
    state["netfclip.3.weight"] = torch.zeros(512, 512)
    wrong = tmp_path / "wrong.model"
    torch.save(state, wrong)
    with pytest.raises(DataError, match="netfclip.3.weight"):
        load_syncnet(wrong)

    listed = tmp_path / "list.model"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(DataError, match="not a state dict"):
        load_syncnet(listed)

    with pytest.raises(DataError, match="larger than"):
        load_syncnet(weights_file, max_bytes=1000)


def test_missing_weights_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.evaluation.syncnet") as error:
        SyncMetric(weights=str(tmp_path / "syncnet_v2.model"))
    assert "syncnet_v2.model" in str(error.value) and "download_model.sh" in str(error.value)


def test_metric_end_to_end_with_random_weights(weights_file):
    metric = SyncMetric(weights=str(weights_file), fps=25.0, sample_rate=16000, vshift=2, batch_size=2)
    clip = make_clip(3, TalkingShapesConfig(num_frames=8))
    video = torch.from_numpy(clip.video).permute(0, 3, 1, 2)[None]
    audio = torch.from_numpy(clip.audio)[None]
    scores = metric(video.expand(2, -1, -1, -1, -1), audio.expand(2, -1))
    assert metric.crop_source == "frame"
    assert scores["sync_c"].shape == scores["sync_d"].shape == (2,)
    assert torch.allclose(scores["sync_d"][0], scores["sync_d"][1])
    assert torch.isfinite(scores["sync_d"]).all() and (scores["sync_c"] >= 0).all()
    metric(video, audio, torch.from_numpy(clip.pose)[None])
    assert metric.crop_source == "pose"


# ---------------------------------------------------------------------------------------------------------------
# MFCC
# ---------------------------------------------------------------------------------------------------------------


def reference_mfcc(signal: np.ndarray, rate: int = 16000) -> np.ndarray:
    """python_speech_features.mfcc's defaults, step by step in float64 numpy (with scipy's DCT): [frames, 13]."""
    from scipy.fft import dct

    def half_up(value):
        return int(decimal.Decimal(value).quantize(decimal.Decimal("1"), rounding=decimal.ROUND_HALF_UP))

    nfft, nfilt = 512, 26
    signal = np.asarray(signal, dtype=np.float64)
    emphasised = np.append(signal[0], signal[1:] - 0.97 * signal[:-1])
    length, step = half_up(0.025 * rate), half_up(0.01 * rate)
    count = 1 if len(signal) <= length else 1 + math.ceil((len(signal) - length) / step)
    padded = np.concatenate([emphasised, np.zeros((count - 1) * step + length - len(signal))])
    frames = np.stack([padded[k * step : k * step + length] for k in range(count)])
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    energy = power.sum(axis=1)
    energy[energy == 0] = np.finfo(float).eps
    mel = np.linspace(0, 2595 * np.log10(1 + rate / 2 / 700), nfilt + 2)
    edges = np.floor((nfft + 1) * 700 * (10 ** (mel / 2595) - 1) / rate)
    bank = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        for i in range(int(edges[j]), int(edges[j + 1])):
            bank[j, i] = (i - edges[j]) / (edges[j + 1] - edges[j])
        for i in range(int(edges[j + 1]), int(edges[j + 2])):
            bank[j, i] = (edges[j + 2] - i) / (edges[j + 2] - edges[j + 1])
    bands = power @ bank.T
    bands[bands == 0] = np.finfo(float).eps
    cepstra = dct(np.log(bands), type=2, axis=1, norm="ortho")[:, :13]
    cepstra *= 1 + 11 * np.sin(np.pi * np.arange(13) / 22)
    cepstra[:, 0] = np.log(energy)
    return cepstra


def _speechy(num_samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    clip = rng.normal(0, 3000, num_samples).round()
    clip[: num_samples // 8] = 0  # digital silence: the log of eps
    return clip


@pytest.mark.parametrize("num_samples", [16000, 16123, 400, 250])
def test_mfcc_matches_the_reference(num_samples):
    signal = _speechy(num_samples, num_samples)
    expected = reference_mfcc(signal)
    got = mfcc(torch.from_numpy(signal))  # float64
    assert got.shape == (1, 13, expected.shape[0])
    assert np.abs(got[0].T.numpy() - expected).max() <= 1e-9 * np.abs(expected).max()
    got32 = mfcc(torch.from_numpy(signal).float()[None].repeat(2, 1))
    assert got32.shape == (2, 13, expected.shape[0])
    assert np.abs(got32[1].T.numpy() - expected).max() <= 1e-4 * np.abs(expected).max()


def test_mfcc_is_100_frames_per_second():
    one, two = (mfcc(torch.zeros(16000 * s)).shape[-1] for s in (1, 2))
    assert two - one == 100
    assert one == 1 + math.ceil((16000 - 400) / 160)


def test_mfcc_matches_python_speech_features():
    psf = pytest.importorskip("python_speech_features")
    signal = _speechy(20000, 1)
    expected = psf.mfcc(signal, 16000)
    got = mfcc(torch.from_numpy(signal))[0].T.numpy()
    assert np.abs(got - expected).max() <= 1e-9 * np.abs(expected).max()


# ---------------------------------------------------------------------------------------------------------------
# The offset search, with a stand-in embedding whose aligned windows agree
# ---------------------------------------------------------------------------------------------------------------


def _standardise(values: torch.Tensor) -> torch.Tensor:
    centred = values - values.mean(dim=1, keepdim=True)
    scale = centred.square().mean(dim=1, keepdim=True).sqrt() + 0.05 * values.abs().mean(dim=1, keepdim=True) + 1e-9
    # A constant first component keeps the embeddings far from the zero padding beyond the audio's ends.
    return torch.cat([torch.full_like(values[:, :1], 10.0), centred / scale], dim=1)


class MouthEnergyNet(nn.Module):
    """Lip embedding: the darkness of each frame of the window (the mouth is the only dark area that changes size);
    audio embedding: the RMS of each frame's 4 MFCC frames, from coefficient 0 (the log energy). Both are
    standardised over the window, so a window whose mouth follows the loudness matches its audio."""

    def forward_lip(self, frames: torch.Tensor) -> torch.Tensor:
        blue, green, red = frames.unbind(1)  # BGR in [0, 255]
        luma = 0.299 * red + 0.587 * green + 0.114 * blue
        darkness = ((76.5 - luma) / 76.5).clamp(0, 1).mean(dim=(-2, -1))  # [N, 5]
        return _standardise(darkness)

    def forward_audio(self, cepstra: torch.Tensor) -> torch.Tensor:
        energy = cepstra[:, 0, 0].exp()  # [N, 20]
        rms = energy.view(-1, 5, 4).mean(dim=-1).sqrt()
        return _standardise(rms)


def _delay(audio: torch.Tensor, frames: int, samples_per_frame: int = 640) -> torch.Tensor:
    """Audio heard ``frames`` later (earlier when negative), silence filling in."""
    shift = frames * samples_per_frame
    if shift >= 0:
        return torch.cat([torch.zeros(shift), audio[: audio.shape[0] - shift]])
    return torch.cat([audio[-shift:], torch.zeros(-shift)])


def test_offset_search_recovers_a_known_shift():
    clip = make_clip(11, TalkingShapesConfig(num_frames=60))
    video = torch.from_numpy(clip.video).permute(0, 3, 1, 2)[None]
    crops, source = face_crops(video, torch.from_numpy(clip.pose)[None])
    assert source == "pose"
    audio = torch.from_numpy(clip.audio)
    delays = [0, 3, -2]  # audio heard 3 frames late, 2 frames early
    batch_audio = torch.stack([_delay(audio, k) for k in delays])
    scores = sync_scores(MouthEnergyNet(), crops.expand(len(delays), -1, -1, -1, -1), batch_audio, 16000)
    # Offsets as their evaluate reports them: audio late by k frames -> -k.
    assert scores["sync_offset"].tolist() == [-k for k in delays]
    aligned_d, aligned_c = scores["sync_d"][0], scores["sync_c"][0]
    assert (scores["sync_d"][1:] > aligned_d).all()
    assert (scores["sync_c"][1:] < aligned_c).all()
    assert scores["distances"].shape == (3, 31) and scores["distances"][0].argmin() == 15


def test_clips_too_short_or_audio_missing_are_errors():
    net = MouthEnergyNet()
    with pytest.raises(ValueError, match="at least 6 frames"):
        sync_scores(net, torch.rand(1, 5, 3, 224, 224), torch.rand(1, 3200), 16000)
    with pytest.raises(ValueError, match="audio lasts"):
        sync_scores(net, torch.rand(1, 8, 3, 224, 224), torch.rand(1, 6 * 640), 16000)
    with pytest.raises(ValueError, match="training mode"):
        sync_scores(SyncNet(), torch.rand(1, 8, 3, 224, 224), torch.rand(1, 8 * 640), 16000)
    # Short by less than one frame: zero-padded.
    out = sync_scores(net, torch.rand(1, 8, 3, 224, 224), torch.rand(1, 8 * 640 - 100), 16000, vshift=1)
    assert out["sync_d"].shape == (1,)


def test_other_rates_are_converted():
    clip = make_clip(5, TalkingShapesConfig(num_frames=50))
    video = torch.from_numpy(clip.video).permute(0, 3, 1, 2)[None]
    crops, _ = face_crops(video, torch.from_numpy(clip.pose)[None])
    audio = torch.from_numpy(clip.audio)[None]
    base = sync_scores(MouthEnergyNet(), crops, audio, 16000, fps=25.0, vshift=4)
    # The same clip at 50 fps (every frame twice) and 24 kHz scores the same offset.
    doubled = crops.repeat_interleave(2, dim=1)
    audio24 = torch.from_numpy(media.resample(clip.audio, 16000, 24000))[None]
    other = sync_scores(MouthEnergyNet(), doubled, audio24, 24000, fps=50.0, vshift=4)
    assert other["sync_offset"].tolist() == base["sync_offset"].tolist() == [0]
    assert other["sync_d"].item() == pytest.approx(base["sync_d"].item(), rel=0.2)


def test_talkingshapes_ground_truth_beats_shifted_mouths(tmp_path):
    manifest = write_dataset(tmp_path, num_clips=4, seed=0, cfg=TalkingShapesConfig(), rejected=("shift",))
    import json

    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    root = manifest.parent
    net = MouthEnergyNet()

    def scores(video_path: Path, row: dict) -> dict:
        frames, fps = media.read_video(root / video_path)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)[None]
        pose = torch.from_numpy(np.load(root / row["pose"]))[None]
        audio = torch.from_numpy(media.read_audio(root / row["audio"], 16000))[None]
        crops, source = face_crops(video, pose)
        assert source == "pose"
        return sync_scores(net, crops, audio, 16000, fps=fps)

    truth = [scores(row["video"], row) for row in rows]
    shifted = [scores(row["rejected"], row) for row in rows]
    truth_d = torch.cat([s["sync_d"] for s in truth])
    shifted_d = torch.cat([s["sync_d"] for s in shifted])
    assert truth_d.mean() < shifted_d.mean()
    assert (truth_d < shifted_d).all()  # clip by clip, too (margins 0.5 to 2.4 with this stand-in)
    assert (torch.cat([s["sync_offset"] for s in truth]) == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Face crops
# ---------------------------------------------------------------------------------------------------------------


def _face_video(size: int = 64, frames: int = 3) -> torch.Tensor:
    video = torch.ones(1, frames, 3, size, size)
    video[:, :, 1:, 20:36, 28:44] = 0.0  # a red face at x 28..44, y 20..36
    return video


def _red(crops: torch.Tensor) -> torch.Tensor:
    return (crops[:, :, 0] > 0.9) & (crops[:, :, 1] < 0.1)


def test_face_crops_follow_the_pose():
    video = _face_video()
    pose = torch.full((1, 3, 8, 2), 0.9)  # neck and shoulders far from the face
    pose[:, :, :5] = torch.tensor([[36, 26], [40, 22], [32, 22], [36, 30], [36, 34]]) / 64  # nose eyes mouth chin
    crops, source = face_crops(video, pose)
    assert source == "pose" and crops.shape == (1, 3, 3, 224, 224)
    assert _red(crops)[..., 112, 112].all()
    assert _red(crops).float().mean() > 0.3 > _red(face_crops(video)[0]).float().mean()

    whole_body = torch.full((1, 3, 133, 2), 0.95)
    grid = torch.stack(torch.meshgrid(torch.linspace(30, 42, 17), torch.linspace(21, 35, 4), indexing="xy"), -1)
    whole_body[:, :, 23:91] = grid.reshape(-1, 2)[:68] / 64
    crops, source = face_crops(video, whole_body)
    assert source == "pose" and _red(crops)[..., 112, 112].all()

    # A face at the frame's edge: the crop reaches out of the frame, where it is grey as in their crop_video.
    corner = torch.full((1, 3, 8, 2), 0.02)
    crops, _ = face_crops(video, corner)
    assert torch.allclose(crops[0, 0, :, 0, 0], torch.full((3,), 110 / 255), atol=1e-3)

    with pytest.raises(ValueError, match="17 keypoints"):
        face_crops(video, torch.rand(1, 3, 17, 2))


def test_face_crops_box_and_frame():
    video = torch.rand(2, 4, 3, 48, 64)
    crops, source = face_crops(video, box=(0.25, 0.5, 0.75, 1.0))
    assert source == "box" and crops.shape == (2, 4, 3, 224, 224)
    expected = torch.nn.functional.interpolate(video[1, 2:3, :, 24:48, 16:48], size=(224, 224), mode="bilinear",
                                               antialias=True, align_corners=False)
    assert torch.allclose(crops[1, 2:3], expected)
    crops, source = face_crops(video)
    assert source == "frame" and crops.shape == (2, 4, 3, 224, 224)
    with pytest.raises(ValueError, match="x0 < x1"):
        face_crops(video, box=(0.5, 0, 0.2, 1))
