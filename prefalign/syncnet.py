"""Sync-C / Sync-D (SyncNet's LSE-C / LSE-D), the lip-sync scores of the talking-head papers, on tensors.

Chung & Zisserman, "Out of time: automated lip sync in the wild" (ACCV 2016 workshops),
https://www.robots.ox.ac.uk/~vgg/software/lipsync/ ; the scores are those of ``SyncNetInstance.evaluate`` in
https://github.com/joonson/syncnet_python (re-implemented here, not copied): 5-frame face windows and 0.2 s of MFCC
are embedded by two CNNs, and the mean distance between them is searched over audio offsets of ±``vshift`` frames.
Sync-D is the smallest mean distance (lower is better), Sync-C its margin below the median (higher is better).

Nothing is downloaded: the weights are the ``syncnet_v2.model`` file of that repository's ``download_model.sh``.
"""

from __future__ import annotations

import decimal
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prefalign.data.errors import DataError

SYNCNET_FPS = 25
"""Video rate SyncNet was trained at: a window of 5 frames is 0.2 s, as is a window of 20 MFCC frames."""
SYNCNET_SAMPLE_RATE = 16000
"""Audio rate of SyncNet's MFCC (their pipeline resamples every file to 16 kHz mono with ffmpeg)."""
WINDOW_FRAMES = 5
"""Video frames per lip window."""
MFCC_PER_FRAME = 4
"""MFCC frames (100 per second) per video frame (25 per second)."""
WINDOW_MFCC = WINDOW_FRAMES * MFCC_PER_FRAME
"""MFCC frames per audio window (0.2 s)."""
CROP_SIZE = 224
"""Side of the face crops SyncNet's lip stream takes."""
EMBEDDING_DIM = 1024
"""Size of both embeddings (``num_layers_in_fc_layers`` in their code)."""
INT16_SCALE = 32768.0
"""Float samples in [-1, 1] times this are the int16 values their ``wavfile.read`` gives (as ffmpeg converts)."""
PAD_GREY = 110 / 255
"""Value of the pixels a crop takes from outside the frame: their ``crop_video`` pads frames with 110."""
CROP_SCALE = 0.4
"""How far a crop reaches beyond the face box (their ``--crop_scale``): see :func:`face_crops`."""
SMOOTHING_FRAMES = 13
"""Median filter length over time of the crop boxes (their ``medfilt(kernel_size=13)``)."""
MAX_WEIGHTS_BYTES = 256 * 2**20
"""Largest weights file read: ``syncnet_v2.model`` is about 54 MB (13.6 M float32 numbers)."""
WEIGHTS_HINT = (
    "SyncNet's syncnet_v2.model, from the joonson/syncnet_python repository's download_model.sh "
    "(wget http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model)"
)
"""Where the weights come from, for error messages."""

#: COCO-WholeBody's 68 face points (DWPose's 133 keypoints: 17 body, 6 feet, 68 face, 21 + 21 hands).
WHOLEBODY_FACE = range(23, 91)
#: TalkingShapes' face points (``prefalign.data.synthetic.KEYPOINT_NAMES``): nose, eyes, mouth, chin.
TALKINGSHAPES_FACE = range(0, 5)
FACE_POINTS = {133: WHOLEBODY_FACE, 8: TALKINGSHAPES_FACE}
"""Keypoint counts a pose track may have, and the points of each that outline the face."""


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------


def _conv_block(conv: nn.Module, norm: nn.Module, *extra: nn.Module) -> list[nn.Module]:
    return [conv, norm, nn.ReLU(), *extra]


class SyncNet(nn.Module):
    """SyncNet ``syncnet_v2``: an audio CNN on MFCC and a lip CNN on 5-frame face windows, each into 1024 numbers.

    The modules and their ``nn.Sequential`` positions reproduce class ``S`` of syncnet_python's ``SyncNetModel.py``
    so that the published state dict loads key for key (layers without weights keep their positions: a no-op
    ``MaxPool2d(1)`` at ``netcnnaud.3``). The 102 keys (:func:`syncnet_keys`; 88 without the 14 batch norms'
    ``num_batches_tracked``), by module:

    - ``netcnnaud`` (audio, ``nn.Sequential`` of 2-d layers; ``[B, 1, 13, 20]`` → ``[B, 512, 1, 1]``): convolutions
      at 0 ``[64, 1, 3, 3]``, 4 ``[192, 64, 3, 3]``, 8 ``[384, 192, 3, 3]``, 11 ``[256, 384, 3, 3]``,
      14 ``[256, 256, 3, 3]``, 18 ``[512, 256, 5, 4]`` (``.weight``, ``.bias``), each followed by a batch norm at the
      next index (``.weight``, ``.bias``, ``.running_mean``, ``.running_var``, ``.num_batches_tracked``) and a ReLU;
      max pools at 3 (1×1), 7 (3×3, stride (1, 2)), 17 (3×3, stride 2).
    - ``netcnnlip`` (video, 3-d layers; ``[B, 3, 5, 224, 224]`` → ``[B, 512, 1, 1, 1]``): convolutions at
      0 ``[96, 3, 5, 7, 7]`` (stride (1, 2, 2)), 4 ``[256, 96, 1, 5, 5]`` (stride (1, 2, 2), padding (0, 1, 1)),
      8, 11, 14 ``[256, 256, 1, 3, 3]``, 18 ``[512, 256, 1, 6, 6]``, each with a batch norm at the next index and a
      ReLU; max pools (1, 3, 3) of stride (1, 2, 2) at 3, 7 (padding (0, 1, 1)) and 17.
    - ``netfcaud`` and ``netfclip``: linear 0 ``[512, 512]``, batch norm 1 (512), ReLU, linear 3 ``[1024, 512]``.

    ``num_batches_tracked`` (a training counter, unused at inference) is optional when loading: PyTorch before 0.4.1
    did not save it.
    """

    def __init__(self):
        super().__init__()
        self.netcnnaud = nn.Sequential(
            *_conv_block(nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.MaxPool2d(1, 1)),
            *_conv_block(nn.Conv2d(64, 192, 3, padding=1), nn.BatchNorm2d(192), nn.MaxPool2d(3, (1, 2))),
            *_conv_block(nn.Conv2d(192, 384, 3, padding=1), nn.BatchNorm2d(384)),
            *_conv_block(nn.Conv2d(384, 256, 3, padding=1), nn.BatchNorm2d(256)),
            *_conv_block(nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), nn.MaxPool2d(3, 2)),
            *_conv_block(nn.Conv2d(256, 512, (5, 4)), nn.BatchNorm2d(512)),
        )
        self.netfcaud = self._head()
        self.netfclip = self._head()
        pool = dict(kernel_size=(1, 3, 3), stride=(1, 2, 2))
        self.netcnnlip = nn.Sequential(
            *_conv_block(nn.Conv3d(3, 96, (5, 7, 7), stride=(1, 2, 2)), nn.BatchNorm3d(96), nn.MaxPool3d(**pool)),
            *_conv_block(nn.Conv3d(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), nn.BatchNorm3d(256),
                         nn.MaxPool3d(**pool, padding=(0, 1, 1))),
            *_conv_block(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
            *_conv_block(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
            *_conv_block(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.MaxPool3d(**pool)),
            *_conv_block(nn.Conv3d(256, 512, (1, 6, 6)), nn.BatchNorm3d(512)),
        )

    @staticmethod
    def _head() -> nn.Sequential:
        return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, EMBEDDING_DIM))

    def forward_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """Audio embeddings of MFCC windows.

        Args:
            mfcc (torch.Tensor): ``[B, 1, 13, 20]``: 13 coefficients of 20 frames (0.2 s) each, as
                :func:`mfcc` computes them from int16-scaled 16 kHz audio (no normalisation).

        Returns:
            torch.Tensor: ``[B, 1024]``.
        """
        if mfcc.ndim != 4 or mfcc.shape[1:] != (1, 13, WINDOW_MFCC):
            raise ValueError(f"expected MFCC windows [B, 1, 13, {WINDOW_MFCC}], got {tuple(mfcc.shape)}")
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def forward_lip(self, frames: torch.Tensor) -> torch.Tensor:
        """Lip embeddings of face windows.

        Args:
            frames (torch.Tensor): ``[B, 3, 5, 224, 224]``: 5 consecutive 224×224 face crops, channels in BGR order
                with values in [0, 255], as their ``evaluate`` feeds OpenCV frames (no normalisation);
                :func:`lip_input` converts RGB crops in [0, 1].

        Returns:
            torch.Tensor: ``[B, 1024]``.
        """
        if frames.ndim != 5 or frames.shape[1:] != (3, WINDOW_FRAMES, CROP_SIZE, CROP_SIZE):
            raise ValueError(f"expected face windows [B, 3, {WINDOW_FRAMES}, {CROP_SIZE}, {CROP_SIZE}], "
                             f"got {tuple(frames.shape)}")
        return self.netfclip(self.netcnnlip(frames).flatten(1))


def syncnet_keys() -> dict[str, tuple[int, ...]]:
    """The published state dict's keys and shapes (those of a fresh :class:`SyncNet`)."""
    return {key: tuple(value.shape) for key, value in SyncNet().state_dict().items()}


def load_syncnet(
    path: str | Path,
    option: str = "model.evaluation.syncnet",
    max_bytes: int = MAX_WEIGHTS_BYTES,
) -> SyncNet:
    """Read ``syncnet_v2.model`` (a ``torch.save``'d state dict) into a :class:`SyncNet`, in eval mode, on the CPU.

    Read with ``weights_only=True``: a pickle that would run code, or holds anything but tensors, is refused.

    Args:
        path (str | Path): the weights file.
        option (str): the setting that named the file, for error messages.
        max_bytes (int): a larger file is refused before it is read.

    Returns:
        SyncNet: the network, eval mode.

    Raises:
        FileNotFoundError: no file at ``path``.
        DataError: a file that is too large, truncated, refused by the weights-only unpickler, not a state dict of
            tensors, or whose keys or shapes differ from :func:`syncnet_keys` (``num_batches_tracked`` may be
            missing).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{option}: the SyncNet weights file {str(path)!r} does not exist; get {WEIGHTS_HINT}")
    if not path.is_file():
        raise DataError("not a regular file (the SyncNet weights file syncnet_v2.model)", path=path, field=option)
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(f"the file is {size} bytes, larger than SyncNet's weights (at most {max_bytes})", path=path,
                        field=option)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        text = str(error)
        if "weights only" in text.lower() or "weights_only" in text:
            reason = "it is a pickle that would run code (or holds objects that are not tensors): refused"
        else:
            first = text.splitlines()[0][:200] if text else ""
            reason = f"it is damaged or truncated ({type(error).__name__}: {first})"
        raise DataError(f"cannot read the SyncNet weights: {reason}", path=path, field=option) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise DataError(f"not a state dict of tensors (got {type(state).__name__}); expected {WEIGHTS_HINT}",
                        path=path, field=option)
    expected = syncnet_keys()
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        more_missing, more_unexpected = ("..." if len(keys) > 6 else "" for keys in (missing, unexpected))
        raise DataError(f"not SyncNet's syncnet_v2 layout: missing keys {missing[:6]}{more_missing}, unexpected keys "
                        f"{unexpected[:6]}{more_unexpected}", path=path, field=option)
    wrong = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in state.items()
             if tuple(v.shape) != expected[k]]
    if wrong:
        raise DataError(f"tensors of the wrong shape: {wrong[:4]}", path=path, field=option)
    net = SyncNet()
    net.load_state_dict(state, strict=False)  # keys checked above; only num_batches_tracked may be absent
    return net.eval()


# ---------------------------------------------------------------------------------------------------------------
# MFCC (python_speech_features.mfcc, as their evaluate calls it)
# ---------------------------------------------------------------------------------------------------------------


def _round_half_up(value: float) -> int:
    # python_speech_features rounds frame sizes this way (Python's round() would round 0.5 to even).
    return int(decimal.Decimal(value).quantize(decimal.Decimal("1"), rounding=decimal.ROUND_HALF_UP))


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(num_filters: int, nfft: int, sample_rate: int, low_hz: float = 0.0,
                   high_hz: Optional[float] = None) -> np.ndarray:
    """python_speech_features' triangular mel filters on FFT bins (edges floored to whole bins).

    Returns:
        np.ndarray: float64 ``[num_filters, nfft // 2 + 1]``.
    """
    high_hz = sample_rate / 2 if high_hz is None else high_hz
    if not 0 <= low_hz < high_hz <= sample_rate / 2:
        raise ValueError(f"mel filter edges must satisfy 0 <= low < high <= sample_rate / 2, got {low_hz}, {high_hz}")
    edges = np.floor((nfft + 1) * _mel_to_hz(np.linspace(_hz_to_mel(low_hz), _hz_to_mel(high_hz), num_filters + 2))
                     / sample_rate)
    bins = np.arange(nfft // 2 + 1, dtype=np.float64)[None, :]
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    # Rising edge on [left, centre), falling on [centre, right); an empty side (equal edges) contributes nothing.
    rising = np.where((bins >= left) & (bins < centre), (bins - left) / np.maximum(centre - left, 1), 0.0)
    falling = np.where((bins >= centre) & (bins < right), (right - bins) / np.maximum(right - centre, 1), 0.0)
    return rising + falling


def _dct_ortho(size: int, count: int) -> np.ndarray:
    """The first ``count`` rows of the orthonormal DCT-II matrix ``[count, size]``."""
    k = np.arange(count, dtype=np.float64)[:, None]
    n = np.arange(size, dtype=np.float64)[None, :]
    matrix = np.cos(np.pi * k * (2 * n + 1) / (2 * size)) * np.sqrt(2.0 / size)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def mfcc(
    audio: torch.Tensor,
    sample_rate: int = 16000,
    winlen: float = 0.025,
    winstep: float = 0.01,
    numcep: int = 13,
    nfilt: int = 26,
    nfft: int = 512,
    preemph: float = 0.97,
    ceplifter: int = 22,
    append_energy: bool = True,
) -> torch.Tensor:
    """MFCC as ``python_speech_features.mfcc(audio, sample_rate)`` computes them with its defaults, in torch.

    Pre-emphasis over the whole signal, rectangular frames of ``winlen`` every ``winstep`` (the last zero-padded),
    power spectrum ``|rfft(frame, nfft)|² / nfft``, mel filterbank energies, log, orthonormal DCT-II, sinusoidal
    lifter, and (``append_energy``) coefficient 0 replaced by the log of the frame's total power. Zero energies
    become float64 eps before the log, as there. Computed in float64 (float32 on MPS).

    Args:
        audio (torch.Tensor): ``[S]`` or ``[B, S]`` samples, at whatever scale (SyncNet's are int16 values).
        sample_rate (int): in Hz.
        winlen (float): frame length in seconds.
        winstep (float): frame step in seconds (0.01: 100 frames per second).
        numcep (int): coefficients kept.
        nfilt (int): mel filters.
        nfft (int): FFT size (frames longer than it are cut, as numpy's rfft does).
        preemph (float): pre-emphasis coefficient.
        ceplifter (int): lifter length; 0 for none.
        append_energy (bool): replace coefficient 0 with the log frame energy.

    Returns:
        torch.Tensor: ``[B, numcep, frames]``, ``frames = 1 + ceil((S - frame_len) / step)`` (1 when
        ``S <= frame_len``); float64, or float32 on MPS.
    """
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2 or audio.shape[1] == 0:
        raise ValueError(f"expected audio [S] or [B, S] with S > 0, got {tuple(audio.shape)}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if not 0 < numcep <= nfilt:
        raise ValueError(f"numcep must be in [1, nfilt={nfilt}], got {numcep}")
    dtype = torch.float32 if audio.device.type == "mps" else torch.float64
    x = audio.to(dtype)
    frame_len, step = _round_half_up(winlen * sample_rate), _round_half_up(winstep * sample_rate)
    num_samples = x.shape[1]
    num_frames = 1 if num_samples <= frame_len else 1 + math.ceil((num_samples - frame_len) / step)
    x = torch.cat([x[:, :1], x[:, 1:] - preemph * x[:, :-1]], dim=1)
    x = F.pad(x, (0, (num_frames - 1) * step + frame_len - num_samples))
    frames = x.unfold(1, frame_len, step)  # [B, frames, frame_len]
    power = torch.fft.rfft(frames, n=nfft).abs().square() / nfft
    eps = torch.finfo(torch.float64).eps
    energy = power.sum(-1)
    energy = torch.where(energy == 0, torch.full_like(energy, eps), energy)
    bank = torch.from_numpy(mel_filterbank(nfilt, nfft, sample_rate)).to(device=x.device, dtype=dtype)
    bands = power @ bank.T
    bands = torch.where(bands == 0, torch.full_like(bands, eps), bands)
    cepstra = bands.log() @ torch.from_numpy(_dct_ortho(nfilt, numcep)).to(device=x.device, dtype=dtype).T
    if ceplifter > 0:
        lift = 1 + (ceplifter / 2) * np.sin(np.pi * np.arange(numcep) / ceplifter)
        cepstra = cepstra * torch.from_numpy(lift).to(device=x.device, dtype=dtype)
    if append_energy:
        cepstra[..., 0] = energy.log()
    return cepstra.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Face crops
# ---------------------------------------------------------------------------------------------------------------


def _median_over_time(values: torch.Tensor, kernel: int) -> torch.Tensor:
    """Running median along the last dim, edges replicated (scipy's medfilt pads with zeros, which shrinks the boxes
    of a track's first and last frames; their tracks are 100+ frames long, ours may be 17)."""
    length = values.shape[-1]
    kernel = min(kernel, length if length % 2 else length - 1)
    if kernel <= 1:
        return values
    half = kernel // 2
    padded = F.pad(values[None], (half, half), mode="replicate")[0]
    return padded.unfold(-1, kernel, 1).median(dim=-1).values


def _pose_boxes(pose: torch.Tensor, height: int, width: int, crop_scale: float) -> torch.Tensor:
    """Crop boxes ``[B, T, 4]`` (x0, y0, x1, y1 in pixels, floats) from the face points, as their ``crop_video``
    makes them from a face detection: half-size ``s = max(w, h) / 2`` and centre of the face box, median-smoothed
    over time; the crop spans ``[cx − s(1 + c), cx + s(1 + c)]`` × ``[cy − s, cy + s(1 + 2c)]``."""
    points = pose[:, :, list(FACE_POINTS[pose.shape[2]])].to(torch.float32)
    points = points * torch.tensor([width, height], dtype=points.dtype, device=points.device)
    low, high = points.amin(dim=2), points.amax(dim=2)  # [B, T, 2]
    centre = (low + high) / 2
    half = ((high - low).amax(dim=-1) / 2).clamp(min=1.0)  # a degenerate face (one point) still gets a 2-pixel box
    half = _median_over_time(half, SMOOTHING_FRAMES)
    cx = _median_over_time(centre[..., 0], SMOOTHING_FRAMES)
    cy = _median_over_time(centre[..., 1], SMOOTHING_FRAMES)
    c = crop_scale
    return torch.stack([cx - half * (1 + c), cy - half, cx + half * (1 + c), cy + half * (1 + 2 * c)], dim=-1)


def _crop_resize(frame: torch.Tensor, box: Sequence[int], size: int) -> torch.Tensor:
    """``frame [3, H, W]`` cut to the integer pixel box (x0, y0, x1, y1), grey outside the frame, resized."""
    x0, y0, x1, y1 = box
    height, width = frame.shape[-2:]
    pad = (max(0, -x0), max(0, x1 - width), max(0, -y0), max(0, y1 - height))
    if any(pad):
        frame = F.pad(frame, pad, value=PAD_GREY)
        x0, x1, y0, y1 = x0 + pad[0], x1 + pad[0], y0 + pad[2], y1 + pad[2]
    return F.interpolate(frame[None, :, y0:y1, x0:x1], size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0]


def face_crops(
    video: torch.Tensor,
    pose: Optional[torch.Tensor] = None,
    box: Optional[Sequence[float]] = None,
    crop_scale: float = CROP_SCALE,
    size: int = CROP_SIZE,
) -> tuple[torch.Tensor, str]:
    """Square face crops for SyncNet, from the pose track where there is one, else a fixed box or the whole frame.

    From a pose: the box of the face points (DWPose's 133 COCO-WholeBody keypoints: the 68 face points 23..90;
    TalkingShapes' 8: nose, eyes, mouth, chin) stands in for their S3FD face detection, and is widened and smoothed
    as their ``crop_video`` does (``crop_scale``, a 13-frame running median, grey ``110`` beyond the frame). The 68
    landmarks span eyebrows to chin, a little less than a detector's box, which also holds the forehead.

    Args:
        video (torch.Tensor): ``[B, T, 3, H, W]`` RGB in [0, 1].
        pose (torch.Tensor | None): ``[B, T, K, 2]`` keypoints (x, y) as fractions of the frame, K in
            ``FACE_POINTS`` (133 or 8).
        box (Sequence[float] | None): without a pose, a fixed crop ``(x0, y0, x1, y1)`` as fractions of the frame
            (used as given, not widened); without either, the whole frame (squeezed to a square if it is not one).
        crop_scale (float): with a pose, how far the crop reaches beyond the face box.
        size (int): side of the crops.

    Returns:
        tuple[torch.Tensor, str]: float32 crops ``[B, T, 3, size, size]`` in [0, 1] (bilinear, antialiased), and
        where they came from: ``"pose"``, ``"box"`` or ``"frame"``.
    """
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"expected video [B, T, 3, H, W], got {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"expected video as floats in [0, 1], got {video.dtype}")
    batch, frames, _, height, width = video.shape
    video = video.to(torch.float32)
    if pose is not None:
        if pose.ndim != 4 or pose.shape[:2] != (batch, frames) or pose.shape[3] != 2:
            raise ValueError(f"expected pose [{batch}, {frames}, K, 2] to match the video, got {tuple(pose.shape)}")
        if pose.shape[2] not in FACE_POINTS:
            raise ValueError(f"cannot find the face in pose tracks of {pose.shape[2]} keypoints: SyncNet crops need "
                             f"{sorted(FACE_POINTS)} (DWPose whole-body, TalkingShapes); pass pose=None to crop a "
                             "fixed box or the whole frame")
        if not torch.isfinite(pose).all():
            raise ValueError("pose holds NaN or infinite keypoints")
        boxes = _pose_boxes(pose, height, width, crop_scale).floor().long().tolist()
        crops = torch.stack([
            torch.stack([_crop_resize(video[b, t], boxes[b][t], size) for t in range(frames)]) for b in range(batch)
        ])
        return crops, "pose"
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (all(math.isfinite(v) for v in (x0, y0, x1, y1)) and x0 < x1 and y0 < y1):
            raise ValueError(f"box must be (x0, y0, x1, y1) fractions of the frame with x0 < x1 and y0 < y1, got {box}")
        pixels = [math.floor(x0 * width), math.floor(y0 * height), math.ceil(x1 * width), math.ceil(y1 * height)]
        flat = video.flatten(0, 1)
        crops = torch.stack([_crop_resize(frame, pixels, size) for frame in flat])
        return crops.view(batch, frames, 3, size, size), "box"
    crops = F.interpolate(video.flatten(0, 1), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return crops.view(batch, frames, 3, size, size), "frame"


# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------


class SyncEmbedder(Protocol):
    """What :func:`sync_scores` needs of a network: :class:`SyncNet`, or a stand-in with the same two methods."""

    def forward_audio(self, mfcc: torch.Tensor) -> torch.Tensor: ...

    def forward_lip(self, frames: torch.Tensor) -> torch.Tensor: ...


_TRAIN_MODE_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout)


def lip_input(crops: torch.Tensor) -> torch.Tensor:
    """RGB crops in [0, 1] ``[N, T, 3, H, W]`` → SyncNet's lip input ``[N, 3, T, H, W]``: BGR in [0, 255] (their
    ``evaluate`` feeds the frames of ``cv2.imread`` as they are)."""
    return crops.flip(2).permute(0, 2, 1, 3, 4) * 255.0


def _frames_at_25(num_frames: int, fps: float) -> torch.Tensor:
    """Indices of the frames that a nearest-frame conversion to 25 fps keeps (as ``ffmpeg -r 25`` does)."""
    rate = Fraction(fps).limit_denominator(100000)
    count = int(num_frames * SYNCNET_FPS / rate)
    # Output frame i at i / 25 s takes the source frame whose time is nearest: round(i * fps / 25).
    index = (torch.arange(count, dtype=torch.int64) * rate.numerator * 2 + SYNCNET_FPS * rate.denominator) // (
        2 * SYNCNET_FPS * rate.denominator)
    return index.clamp(max=num_frames - 1)


def sync_scores(
    net: SyncEmbedder,
    crops: torch.Tensor,
    audio: torch.Tensor,
    sample_rate: int,
    fps: float = 25.0,
    vshift: int = 15,
    batch_size: int = 20,
) -> dict[str, torch.Tensor]:
    """Sync-D, Sync-C and the audio offset of each clip, as syncnet_python's ``evaluate`` computes them.

    Windows of 5 frames (frames ``i .. i+4``) and of 20 MFCC frames (``4i .. 4i+19``) are embedded for
    ``i = 0 .. T − 6`` (their loop stops one window short of ``T − 4``). The audio embeddings are zero-padded by
    ``vshift`` on both sides, and ``d[i, j] = ‖lip_i − audio_{i+j−vshift}‖`` (``pairwise_distance``, eps 1e-6) for
    ``j = 0 .. 2·vshift``; ``mean_d[j]`` averages over ``i``. Then ``sync_d = min_j mean_d``,
    ``sync_c = median_j mean_d − sync_d`` and ``sync_offset = vshift − argmin_j mean_d``: an offset of ``−k`` means
    the audio lags the video by ``k`` frames (its sound of frame ``i`` is heard at frame ``i + k``).

    Other rates are converted first: frames to 25 fps by nearest frame (as ``ffmpeg -r 25``), audio to 16 kHz
    (soxr). Audio in [-1, 1] is scaled to int16 values (their MFCC is of ``wavfile.read``'s int16 samples, which
    moves coefficient 0, the log energy, by ``log(32768²)``). Audio past the video is ignored; audio short of it by
    less than one frame is zero-padded, by more is an error.

    Args:
        net (SyncEmbedder): :class:`SyncNet` (eval mode) or anything with its ``forward_audio`` / ``forward_lip``.
        crops (torch.Tensor): ``[B, T, 3, 224, 224]`` RGB face crops in [0, 1] (:func:`face_crops`).
        audio (torch.Tensor): ``[B, S]`` mono in [-1, 1], starting with frame 0.
        sample_rate (int): audio rate in Hz.
        fps (float): the crops' frame rate; at 25 fps a clip needs at least 6 frames.
        vshift (int): offsets searched, ``−vshift .. vshift`` frames (their ``run_syncnet.py`` default: 15).
        batch_size (int): windows per network call (bounds memory: a lip window is 3 MB in float32).

    Returns:
        dict[str, torch.Tensor]: ``sync_d`` and ``sync_c`` (float32 ``[B]``), ``sync_offset`` (int64 ``[B]``), and
        ``distances`` (float32 ``[B, 2·vshift + 1]``, ``mean_d`` per offset), on the crops' device.
    """
    _check_inputs(net, crops, audio, sample_rate, fps, vshift, batch_size)
    out_device = crops.device
    if fps != SYNCNET_FPS:
        crops = crops[:, _frames_at_25(crops.shape[1], fps).to(crops.device)]
    frames = crops.shape[1]
    if frames - WINDOW_FRAMES < 1:
        raise ValueError(f"SyncNet needs at least {WINDOW_FRAMES + 1} frames at 25 fps, the clip has {frames}")
    audio = _audio_at_16k(audio, sample_rate, frames)
    features = mfcc(audio.float() * INT16_SCALE, SYNCNET_SAMPLE_RATE).to(torch.float32)  # [B, 13, F]
    lip, sound = _embed_windows(net, crops, features, batch_size)
    distances = _offset_distances(lip, sound, vshift)  # [B, 2·vshift + 1]
    sync_d, best = distances.min(dim=1)
    sync_c = distances.median(dim=1).values - sync_d
    return {
        "sync_d": sync_d.to(out_device),
        "sync_c": sync_c.to(out_device),
        "sync_offset": (vshift - best).to(out_device),
        "distances": distances.to(out_device),
    }


def _check_inputs(net: SyncEmbedder, crops: torch.Tensor, audio: torch.Tensor, sample_rate: int, fps: float,
                  vshift: int, batch_size: int) -> None:
    """Refuse what :func:`sync_scores` cannot score: crops or audio of the wrong shape, settings out of range, or a
    network in training mode."""
    if crops.ndim != 5 or crops.shape[2:] != (3, CROP_SIZE, CROP_SIZE):
        raise ValueError(f"expected crops [B, T, 3, {CROP_SIZE}, {CROP_SIZE}], got {tuple(crops.shape)}")
    if audio.ndim != 2 or audio.shape[0] != crops.shape[0]:
        raise ValueError(f"expected audio [{crops.shape[0]}, S] for {crops.shape[0]} clips, got {tuple(audio.shape)}")
    if isinstance(vshift, bool) or not isinstance(vshift, int) or vshift < 0:
        raise ValueError(f"vshift must be an integer >= 0, got {vshift!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if fps <= 0 or sample_rate <= 0:
        raise ValueError(f"fps and sample_rate must be positive, got {fps} and {sample_rate}")
    if isinstance(net, nn.Module) and any(m.training for m in net.modules() if isinstance(m, _TRAIN_MODE_LAYERS)):
        raise ValueError("the SyncNet is in training mode (batch norm would use batch statistics): call .eval()")


def _embed_windows(net: SyncEmbedder, crops: torch.Tensor, features: torch.Tensor, batch_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The lip and audio embeddings of every window of every clip, ``batch_size`` windows per network call:
    25-fps crops ``[B, T, 3, 224, 224]`` and MFCCs ``[B, 13, F]`` → two ``[B, T − 5, D]``, on the network's
    device (the crops' where it has no parameters)."""
    batch, frames = crops.shape[:2]
    num_windows = frames - WINDOW_FRAMES
    parameter = next(iter(net.parameters()), None) if isinstance(net, nn.Module) else None
    device = parameter.device if parameter is not None else crops.device
    clip_index = torch.arange(batch).repeat_interleave(num_windows)
    start = torch.arange(num_windows).repeat(batch)
    lip, sound = [], []
    with torch.no_grad():
        for chunk in range(0, batch * num_windows, batch_size):
            b, i = clip_index[chunk : chunk + batch_size], start[chunk : chunk + batch_size]
            frame_index = (i[:, None] + torch.arange(WINDOW_FRAMES)).to(crops.device)
            windows = crops[b.to(crops.device)[:, None], frame_index]  # [n, 5, 3, 224, 224]
            lip.append(net.forward_lip(lip_input(windows.to(device))).float())
            mfcc_index = (MFCC_PER_FRAME * i[:, None] + torch.arange(WINDOW_MFCC)).to(features.device)
            cepstra = features[b.to(features.device)[:, None], :, mfcc_index].transpose(1, 2)  # [n, 13, 20]
            sound.append(net.forward_audio(cepstra[:, None].to(device)).float())
    return torch.cat(lip).view(batch, num_windows, -1), torch.cat(sound).view(batch, num_windows, -1)


def _audio_at_16k(audio: torch.Tensor, sample_rate: int, frames: int) -> torch.Tensor:
    """Audio at 16 kHz cut (or zero-padded by less than a frame) to exactly ``frames`` 25-fps frames."""
    if sample_rate != SYNCNET_SAMPLE_RATE:
        from prefalign.data import media

        audio = torch.stack([
            torch.from_numpy(media.resample(clip.float().cpu().numpy(), sample_rate, SYNCNET_SAMPLE_RATE))
            for clip in audio
        ]).to(audio.device)
    samples_per_frame = SYNCNET_SAMPLE_RATE // SYNCNET_FPS
    needed = frames * samples_per_frame
    if audio.shape[1] <= needed - samples_per_frame:
        raise ValueError(f"the audio lasts {audio.shape[1] / SYNCNET_SAMPLE_RATE:.3f} s, the video "
                         f"{frames / SYNCNET_FPS:.3f} s: give audio covering every frame")
    return F.pad(audio[:, :needed], (0, max(0, needed - audio.shape[1])))


def _offset_distances(lip: torch.Tensor, sound: torch.Tensor, vshift: int) -> torch.Tensor:
    """Mean over windows of ``‖lip_i − sound_{i+j−vshift}‖`` (zeros beyond the ends), per offset ``j``:
    ``[B, N, D]`` twice → ``[B, 2·vshift + 1]``."""
    num_windows = lip.shape[1]
    padded = F.pad(sound, (0, 0, vshift, vshift))
    columns = [F.pairwise_distance(lip, padded[:, j : j + num_windows]).mean(dim=1) for j in range(2 * vshift + 1)]
    return torch.stack(columns, dim=1)


class SyncMetric:
    """Sync-C and Sync-D of video clips with their audio: a loaded :class:`SyncNet` and the settings to use it.

    Args:
        weights (str): ``syncnet_v2.model`` (``model.evaluation.syncnet``).
        fps (float): the clips' frame rate (converted to 25 fps for SyncNet).
        sample_rate (int): the audio's rate (converted to 16 kHz).
        vshift (int): audio offsets searched, ± frames.
        device (str | torch.device): where the network runs.
        batch_size (int): windows per network call.
        box (Sequence[float] | None): crop for clips without a pose track, ``(x0, y0, x1, y1)`` fractions of the
            frame; None: the whole frame.

    Raises:
        FileNotFoundError: the weights file is missing (the message names ``model.evaluation.syncnet`` and where
            the weights come from).
    """

    option = "model.evaluation.syncnet"

    def __init__(
        self,
        weights: str,
        fps: float = 25.0,
        sample_rate: int = 16000,
        vshift: int = 15,
        device: str | torch.device = "cpu",
        batch_size: int = 20,
        box: Optional[Sequence[float]] = None,
    ):
        if not os.path.exists(os.path.expanduser(str(weights))):
            raise FileNotFoundError(f"{self.option}: the SyncNet weights file {str(weights)!r} does not exist; "
                                    f"download {WEIGHTS_HINT} and give its path as {self.option}")
        self.net = load_syncnet(weights, option=self.option).to(device)
        self.fps, self.sample_rate, self.vshift, self.batch_size, self.box = fps, sample_rate, vshift, batch_size, box
        self.crop_source: Optional[str] = None
        """Where the crops of the last call came from: ``pose``, ``box`` or ``frame``."""

    def to(self, device: str | torch.device) -> SyncMetric:
        self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, video: torch.Tensor, audio: torch.Tensor, pose: Optional[torch.Tensor] = None
                 ) -> dict[str, torch.Tensor]:
        """Scores per clip.

        Args:
            video (torch.Tensor): ``[B, T, 3, H, W]`` in [0, 1].
            audio (torch.Tensor): ``[B, S]`` mono in [-1, 1] at ``sample_rate``.
            pose (torch.Tensor | None): ``[B, T, K, 2]`` keypoints to crop the face by (:func:`face_crops`).

        Returns:
            dict[str, torch.Tensor]: ``sync_c``, ``sync_d`` (float32 ``[B]``) and ``sync_offset`` (int64 ``[B]``).
        """
        if video.ndim != 5 or audio.ndim != 2 or audio.shape[0] != video.shape[0]:
            raise ValueError(f"expected video [B, T, 3, H, W] and audio [B, S], got {tuple(video.shape)} and "
                             f"{tuple(audio.shape)}")
        names = ("sync_c", "sync_d", "sync_offset")
        scores = {name: [] for name in names}
        # One clip at a time: a clip's 224x224 crops take 0.6 MB a frame, a batch of long clips would take GBs.
        for index in range(video.shape[0]):
            crops, self.crop_source = face_crops(video[index : index + 1], None if pose is None else
                                                 pose[index : index + 1], self.box)
            clip = sync_scores(self.net, crops, audio[index : index + 1], self.sample_rate, fps=self.fps,
                               vshift=self.vshift, batch_size=self.batch_size)
            for name in names:
                scores[name].append(clip[name])
        return {name: torch.cat(values) for name, values in scores.items()}
