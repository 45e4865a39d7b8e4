"""FID's Inception network (TensorFlow's FID Inception-v3 of 2015-12-05, in the layout of pytorch-fid's ported weights
``pt_inception-2015-12-05-6726825d.pth``) and FID over video frames, mergeable across batches and ranks.

The weights file holds exactly the state of torchvision's ``Inception3(num_classes=1008, aux_logits=False)`` (that is
what pytorch-fid strictly loads it into): per convolution ``conv.weight`` and ``bn.{weight,bias,running_mean,
running_var}``, and the 1008-logit ``fc``; no ``AuxLogits``. :class:`FIDInception` has the same keys and shapes, and
no ``bn.num_batches_tracked``: a training counter that a plain dict of ported tensors lacks and strict loading into
``BatchNorm2d`` then forgives (one in a file is ignored here).
"""

from __future__ import annotations

import pickle
import re
import stat
from pathlib import Path
from typing import Iterable, Union

import torch
import torch.nn.functional as F
from torch import nn

from prefalign.frechet import FeatureStats

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
#: Where the user downloads the weights from (nothing here downloads them).
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
#: The configuration option that names the weights file.
OPTION = "model.evaluation.inception"
#: The largest weights file read; the real one is about 91 MiB.
MAX_WEIGHTS_BYTES = 256 * 2**20
#: Pool3 features per frame.
FEATURES = 2048
#: The side every frame is resized to, as in TensorFlow's FID.
INPUT_SIZE = 299


class _FrozenBatchNorm(nn.Module):
    """Batch norm that always normalizes with its running statistics (FID's network is never trained, and keeps no
    ``num_batches_tracked``). TensorFlow's epsilon, 1e-3."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class _Conv(nn.Module):
    """The unit every layer is made of: a convolution without bias, batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = _FrozenBatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _same_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's SAME average pool divides by the pixels inside the image, not by 9 at the borders.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _same_max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


class _MixedA(nn.Module):
    """Mixed_5b-5d (35x35): 1x1, 5x5, double 3x3 and pooled towers."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        towers = [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_same_avg_pool(x)),
        ]
        return torch.cat(towers, 1)


class _MixedB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        towers = [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ]
        return torch.cat(towers, 1)


class _MixedC(nn.Module):
    """Mixed_6b-6e (17x17): factorized 7x7 towers of ``c7`` channels."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            double = layer(double)
        towers = [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_same_avg_pool(x)),
        ]
        return torch.cat(towers, 1)


class _MixedD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            tower = layer(tower)
        towers = [self.branch3x3_2(self.branch3x3_1(x)), tower, F.max_pool2d(x, 3, stride=2)]
        return torch.cat(towers, 1)


class _MixedE(nn.Module):
    """Mixed_7b, 7c (8x8): towers that split into 1x3 and 3x1. The TF graph pools Mixed_7c's pool tower with a max,
    not an average (``max_pool=True``): FID's features depend on it."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _same_max_pool(x) if self.max_pool else _same_avg_pool(x)
        towers = [
            self.branch1x1(x),
            self.branch3x3_2a(single),
            self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double),
            self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ]
        return torch.cat(towers, 1)


class FIDInception(nn.Module):
    """The Inception-v3 of TensorFlow's FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500): images in
    [0, 1] to the 2048 pool3 features, computed as pytorch-fid computes them. Always in eval mode, never trained
    (``requires_grad`` off); build it with :func:`load_fid_inception`. ``fc`` (the 1008 ImageNet logits) is kept so
    the weights file loads strictly; the features do not use it.

    Args:
        input_size (int): the side frames are resized to: 299 for FID (the network's and pytorch-fid's); a smaller
            one (at least 75) only makes tests cheap.
    """

    def __init__(self, input_size: int = INPUT_SIZE):
        super().__init__()
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 75:
            raise ValueError(f"input_size must be an integer >= 75 (Inception-v3's smallest), got {input_size!r}")
        self.input_size = input_size
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _MixedA(192, pool_features=32)
        self.Mixed_5c = _MixedA(256, pool_features=64)
        self.Mixed_5d = _MixedA(288, pool_features=64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b = _MixedC(768, c7=128)
        self.Mixed_6c = _MixedC(768, c7=160)
        self.Mixed_6d = _MixedC(768, c7=160)
        self.Mixed_6e = _MixedC(768, c7=192)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, 1008)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FIDInception:
        # A parent's ``.train()`` must not reach it: FID is defined with the running statistics.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, H, W]``, floats in [0, 1], of any size (resized to ``input_size``, 299) -> features
        ``[N, 2048]`` (float32, on the network's device)."""
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float [N, 3, H, W] in [0, 1]; got {images.dtype} "
                             f"{tuple(images.shape)}")  # fmt: skip
        weight = self.fc.weight
        x = images.to(device=weight.device, dtype=weight.dtype)
        x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean((2, 3))


def load_fid_inception(path: Union[str, Path]) -> FIDInception:
    """FID's Inception with the weights of ``path`` (``pt_inception-2015-12-05-6726825d.pth``, from pytorch-fid's
    GitHub release, or the same tensors as ``.safetensors``), on the CPU.

    Read without running code from the file (``weights_only``); every tensor of the network must be in the file with
    its shape, and nothing else (a ``bn.num_batches_tracked`` counter aside). Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` naming the file for one that is too big, cut short, holds code or other objects,
    or does not fit the network.
    """
    path = Path(path)
    state = _read_weights(path)
    network = FIDInception()
    own = network.state_dict()
    state = {key: value for key, value in state.items() if not _is_step_counter(key, own)}
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong = [f"{key} {tuple(state[key].shape)} instead of {tuple(own[key].shape)}"
             for key in own if key in state and state[key].shape != own[key].shape]  # fmt: skip
    problems = [f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("with other shapes", wrong))
                if keys]  # fmt: skip
    if problems:
        raise ValueError(f"{path}: not FID's Inception weights ({WEIGHTS_FILE} from {WEIGHTS_URL}): tensors "
                         + "; ".join(problems))
    bad = [key for key, value in state.items() if not value.is_floating_point() or not torch.isfinite(value).all()]
    if bad:
        raise ValueError(f"{path}: FID's Inception weights must be finite floats; not so: {', '.join(bad[:3])}")
    network.load_state_dict(state)
    return network


def _is_step_counter(key: str, own: dict) -> bool:
    return key.endswith(".num_batches_tracked") and key.removesuffix("num_batches_tracked") + "running_mean" in own


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        status = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: FID's Inception weights file does not exist; set {OPTION} to "
                                f"{WEIGHTS_FILE}, downloaded from pytorch-fid's release {WEIGHTS_URL}") from None
    if not stat.S_ISREG(status.st_mode):
        raise ValueError(f"{path}: FID's Inception weights must be a regular file ({OPTION})")
    if status.st_size > MAX_WEIGHTS_BYTES:
        raise ValueError(f"{path}: {status.st_size} bytes, above the {MAX_WEIGHTS_BYTES} of MAX_WEIGHTS_BYTES; "
                         f"FID's Inception weights ({WEIGHTS_FILE}) are about 91 MiB")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = re.search(r"WeightsUnpickler error: ([^\n]*)", str(error))
        reason = reason.group(1) if reason else str(error).strip().splitlines()[-1]
        raise ValueError(f"{path}: refused: it does not unpickle as plain tensors ({reason[:200]}); it holds code or "
                         "other objects, or is cut short. FID's Inception weights are a state dict of "
                         "tensors") from None
    except Exception as error:  # torch's zip reader and safetensors raise their own types for damaged files
        raise ValueError(f"{path}: cannot read FID's Inception weights, is the file whole? "
                         f"({type(error).__name__}: {str(error).strip()[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):  # fmt: skip
        raise ValueError(f"{path}: not a state dict (names to tensors); FID's Inception weights are one")
    return state


class FIDMetric:
    """FID between generated and real video frames: every frame (or every ``frame_stride``-th) is one sample of the
    two feature Gaussians. Keeps running statistics, not features; ``state``/``merge`` gather them across ranks.

    Args:
        network (FIDInception): the feature network (:func:`load_fid_inception`).
        batch_size (int): frames per network call.
        frame_stride (int): use frames ``0, s, 2s, ...`` of each clip (1: every frame).
    """

    def __init__(self, network: FIDInception, batch_size: int = 16, frame_stride: int = 1):
        for name, value in (("batch_size", batch_size), ("frame_stride", frame_stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.network = network
        self.batch_size = batch_size
        self.frame_stride = frame_stride
        self.reset()

    def reset(self) -> None:
        self.generated = FeatureStats(FEATURES)
        self.real = FeatureStats(FEATURES)
        self.clips = 0

    def to(self, device: Union[str, torch.device]) -> FIDMetric:
        self.network.to(device)
        return self

    @property
    def count(self) -> int:
        """Generated clips seen."""
        return self.clips

    @torch.no_grad()
    def update(self, generated: torch.Tensor, real: torch.Tensor) -> None:
        """Add clips ``[B, T, 3, H, W]`` (floats in [0, 1]); the two sides may differ in count, length and size."""
        for name, video in (("generated", generated), ("real", real)):
            if video.dim() != 5 or video.shape[2] != 3 or not video.is_floating_point():
                raise ValueError(f"{name} clips must be float [B, T, 3, H, W] in [0, 1]; got {video.dtype} "
                                 f"{tuple(video.shape)}")  # fmt: skip
        self._add(self.generated, generated)
        self._add(self.real, real)
        self.clips += generated.shape[0]

    def _add(self, stats: FeatureStats, video: torch.Tensor) -> None:
        stats.add(self.features(video))

    @torch.no_grad()
    def features(self, video: torch.Tensor) -> torch.Tensor:
        """The pool features of every ``frame_stride``-th frame of clips ``[B, T, 3, H, W]``: ``[B·T', 2048]``,
        ``batch_size`` frames per network call."""
        frames = video[:, :: self.frame_stride].flatten(0, 1)
        return torch.cat([self.network(chunk) for chunk in frames.split(self.batch_size)])

    def compute(self) -> float:
        """FID between the generated and the real frames seen."""
        if self.generated.count < 2 or self.real.count < 2:
            raise ValueError(f"FID needs at least 2 generated and 2 real frames; got {self.generated.count} and "
                             f"{self.real.count}")
        return self.generated.distance(self.real)

    def state(self) -> dict:
        """A snapshot of the statistics (CPU tensors), for ``merge`` or ``all_gather_object``."""
        return {"generated": _snapshot(self.generated), "real": _snapshot(self.real), "clips": self.clips}

    def merge(self, other: Union[FIDMetric, dict]) -> None:
        """Add another metric's statistics (or its ``state()``)."""
        state = other.state() if isinstance(other, FIDMetric) else other
        self.generated.merge(FeatureStats.from_state(state["generated"]))
        self.real.merge(FeatureStats.from_state(state["real"]))
        self.clips += int(state["clips"])

    @classmethod
    def from_states(cls, metric: FIDMetric, states: Iterable[dict]) -> FIDMetric:
        """A metric with ``metric``'s network and settings holding the sum of ``states`` (every rank's ``state()``,
        as ``all_gather_object`` returns them)."""
        merged = cls(metric.network, batch_size=metric.batch_size, frame_stride=metric.frame_stride)
        for state in states:
            merged.merge(state)
        return merged


def _snapshot(stats: FeatureStats) -> dict:
    # FeatureStats.state shares its running tensors, which later updates change in place.
    return {key: value.clone() if torch.is_tensor(value) else value for key, value in stats.state().items()}
