"""The FVD network and metric (prefalign/i3d.py): pytorch-i3d's weights layout, safe loading, the feature convention,
and the metric's accumulation across batches and ranks, on a seeded random I3D (no weights are downloaded)."""

import pickle
import re

import pytest
import torch
import torch.nn.functional as F

from prefalign.i3d import MIN_FRAMES, NUM_CLASSES, FVDMetric, InceptionI3D, Unit3D, _max_pool, _same_padding, load_i3d

# pytorch-i3d's InceptionI3d (pytorch_i3d.py), block by block: (name, in channels, out channels, kernel) of the stem
# Unit3Ds, and (name, in channels, [b0, b1a, b1b, b2a, b2b, b3b]) of the InceptionModules, in channels written as
# its code writes them. Max pools and dropout hold no tensors.
THEIR_STEM = [("Conv3d_1a_7x7", 3, 64, 7), ("Conv3d_2b_1x1", 64, 64, 1), ("Conv3d_2c_3x3", 64, 192, 3)]
THEIR_MIXED = [
    ("Mixed_3b", 192, [64, 96, 128, 16, 32, 32]),
    ("Mixed_3c", 256, [128, 128, 192, 32, 96, 64]),
    ("Mixed_4b", 128 + 192 + 96 + 64, [192, 96, 208, 16, 48, 64]),
    ("Mixed_4c", 192 + 208 + 48 + 64, [160, 112, 224, 24, 64, 64]),
    ("Mixed_4d", 160 + 224 + 64 + 64, [128, 128, 256, 24, 64, 64]),
    ("Mixed_4e", 128 + 256 + 64 + 64, [112, 144, 288, 32, 64, 64]),
    ("Mixed_4f", 112 + 288 + 64 + 64, [256, 160, 320, 32, 128, 128]),
    ("Mixed_5b", 256 + 320 + 128 + 128, [256, 160, 320, 32, 128, 128]),
    ("Mixed_5c", 256 + 320 + 128 + 128, [384, 192, 384, 48, 128, 128]),
]
THEIR_LOGITS_IN = 384 + 384 + 128 + 128


def _their_unit(name, cin, cout, k, batch_norm=True):
    """A pytorch-i3d Unit3D's tensors: a bias-free conv3d and a BatchNorm3d, or (the logits) a biased conv3d."""
    keys = {f"{name}.conv3d.weight": (cout, cin, k, k, k)}
    if batch_norm:
        keys.update({f"{name}.bn.{p}": (cout,) for p in ("weight", "bias", "running_mean", "running_var")})
    else:
        keys[f"{name}.conv3d.bias"] = (cout,)
    return keys


def their_layout() -> dict[str, tuple]:
    """Every tensor of pytorch-i3d's released ``rgb_imagenet.pt``: name → shape (no ``num_batches_tracked``: the
    file was written in March 2018, before PyTorch's batch norm had that counter)."""
    keys = {}
    for name, cin, cout, k in THEIR_STEM:
        keys.update(_their_unit(name, cin, cout, k))
    for name, cin, (c0, c1a, c1b, c2a, c2b, c3) in THEIR_MIXED:
        for branch, bin_, bout, k in (
            ("b0", cin, c0, 1),
            ("b1a", cin, c1a, 1),
            ("b1b", c1a, c1b, 3),
            ("b2a", cin, c2a, 1),
            ("b2b", c2a, c2b, 3),
            ("b3b", cin, c3, 1),
        ):
            keys.update(_their_unit(f"{name}.{branch}", bin_, bout, k))
    keys.update(_their_unit("logits", THEIR_LOGITS_IN, 400, 1, batch_norm=False))
    return keys


def random_their_state(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in their_layout().items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = torch.rand(state[k].shape, generator=g) + 0.5
    return state


def moving_clips(n, frames=MIN_FRAMES, size=32, seed=0) -> torch.Tensor:
    """Clips ``[n, frames, 3, size, size]`` in [0, 1]: a smooth random texture per clip drifting a random step per
    frame, so that the order of frames matters."""
    g = torch.Generator().manual_seed(seed)
    texture = F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(size, size), mode="bilinear")
    steps = torch.randint(1, 4, (n, 2), generator=g).tolist()
    return torch.stack([torch.stack([texture[i].roll((dy * k, dx * k), dims=(1, 2)) for k in range(frames)])
                        for i, (dy, dx) in enumerate(steps)])  # fmt: skip


def calibrate(net: InceptionI3D, videos: torch.Tensor) -> None:
    """Give a random I3D sane batch-norm statistics: each norm's running mean and variance become its input's on
    ``videos``, set by a hook on the convolution before it (one pass calibrates every layer in order)."""
    hooks = []
    for unit in net.modules():
        if isinstance(unit, Unit3D) and unit.bn is not None:

            def set_stats(conv, inputs, out, bn=unit.bn):
                bn.running_mean.copy_(out.mean((0, 2, 3, 4)))
                bn.running_var.copy_(out.var((0, 2, 3, 4)))

            hooks.append(unit.conv3d.register_forward_hook(set_stats))
    net.features(videos)
    for hook in hooks:
        hook.remove()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the I3D's many short parallel regions stall when the cores are shared with other
    processes (on 2 shared cores this file took 60-105 s with 2 threads, 16 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net() -> InceptionI3D:
    torch.manual_seed(0)
    network = InceptionI3D()
    calibrate(network, moving_clips(1, seed=100))
    return network


# --- architecture and loading ---------------------------------------------------------------------------------------


def test_state_dict_is_pytorch_i3d_layout():
    ours = {k: tuple(v.shape) for k, v in InceptionI3D().state_dict().items()}
    expected = their_layout()
    assert len(expected) == (3 + 9 * 6) * 5 + 2  # 57 units with batch norm, and the logits' weight and bias
    assert ours == expected


def test_same_padding_is_pytorch_i3d_rule():
    """Their ``compute_pad``: ``k - stride`` when the size divides by the stride, else ``k - size % stride`` (never
    negative), the odd step at the end; and the pooling (one axis at a time here) equals ``max_pool3d`` on it."""

    def their_pad(size, k, s):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        return [total // 2, total - total // 2]

    for kernel, stride in (
        ((7, 7, 7), (2, 2, 2)),
        ((1, 3, 3), (1, 2, 2)),
        ((3, 3, 3), (1, 1, 1)),
        ((2, 2, 2), (2, 2, 2)),
    ):
        for shape in ((9, 224, 224), (5, 57, 56), (2, 7, 7), (3, 14, 15), (1, 1, 2)):
            x = torch.randn(1, 2, *shape)
            expected = sum((their_pad(n, k, s) for n, k, s in reversed(list(zip(shape, kernel, stride)))), [])
            assert _same_padding(x, kernel, stride) == expected
            if shape[0] < 9:
                torch.testing.assert_close(_max_pool(x, kernel, stride),
                                           F.max_pool3d(F.pad(x, expected), kernel, stride), rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize("form", ["zip", "legacy", "with_num_batches_tracked", "safetensors"])
def test_load_i3d_reads_their_layout(tmp_path, form):
    """``torch.save`` of a state dict in their layout (the 2018 release used the legacy non-zip format; a state dict
    re-saved from their module on today's PyTorch also holds ``bn.num_batches_tracked``), or a safetensors file."""
    state = random_their_state()
    path = tmp_path / ("i3d.safetensors" if form == "safetensors" else "rgb_imagenet.pt")
    if form == "safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    elif form == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif form == "with_num_batches_tracked":
        counters = {k.replace("running_mean", "num_batches_tracked"): torch.tensor(0) for k in state
                    if k.endswith(".bn.running_mean")}  # fmt: skip
        torch.save({**state, **counters}, path)
    else:
        torch.save(state, path)
    model = load_i3d(path)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not model.training and not model.train().training  # a fixed feature network stays in eval mode


class _Payload:
    """Unpickling this opens (creates) the marker file: code a state dict must never run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_i3d_refuses_a_pickle_with_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "rgb_imagenet.pt"
    torch.save({"logits.conv3d.bias": torch.zeros(400), "extra": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: refused")):
        load_i3d(path)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # and it is refused, not merely harmless: plain unpickling runs it
        torch.load(path, weights_only=True)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_i3d_refuses_truncated_wrong_and_oversized_files(tmp_path, monkeypatch):
    import prefalign.i3d as i3d

    state = random_their_state()
    whole = tmp_path / "whole.pt"
    torch.save(state, whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(f"{truncated}: cannot read")):
        load_i3d(truncated)

    wrong = tmp_path / "wrong.pt"
    torch.save({**state, "Mixed_4b.b1b.conv3d.weight": torch.zeros(208, 96, 1, 1, 1)}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pt.*Mixed_4b\.b1b\.conv3d\.weight \(208, 96, 1, 1, 1\)"):
        load_i3d(wrong)
    missing = tmp_path / "missing.pt"
    torch.save({k: v for k, v in state.items() if k != "logits.conv3d.bias"}, missing)
    with pytest.raises(ValueError, match=r"missing\.pt.*1 missing.*logits\.conv3d\.bias"):
        load_i3d(missing)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, wrapped)
    with pytest.raises(ValueError, match="DataParallel"):
        load_i3d(wrapped)

    monkeypatch.setattr(i3d, "MAX_WEIGHTS_BYTES", 1 << 20)
    with pytest.raises(ValueError, match=re.escape(str(whole)) + ": .* more than"):
        load_i3d(whole)


def test_load_i3d_missing_file_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.evaluation\.i3d.*pytorch-i3d's models/rgb_imagenet\.pt"):
        load_i3d(tmp_path / "nowhere.pt")


# --- features -------------------------------------------------------------------------------------------------------


def test_features_follow_the_fvd_convention(net):
    """``[B, 400]``: frames resized to 224×224, scaled to [-1, 1], a 5-frame clip padded to 9 by repeating its last
    frame, the per-step logits averaged over time."""
    videos = moving_clips(1, frames=5, size=40)
    features = net.features(videos)
    assert features.shape == (1, NUM_CLASSES)

    frames = F.interpolate(videos[0], size=(224, 224), mode="bilinear", align_corners=False)  # [T, 3, 224, 224]
    clip = (frames * 2 - 1).transpose(0, 1)[None]
    padded = torch.cat([clip] + [clip[:, :, -1:]] * (MIN_FRAMES - 5), dim=2)
    with torch.no_grad():
        logits = net(padded)
    assert logits.shape == (1, NUM_CLASSES, 1)  # ceil(9 / 8) - 1 steps
    torch.testing.assert_close(features, logits.mean(2), rtol=1e-4, atol=1e-5)
    assert features.std() > 0.1  # calibrated: the features are not a constant
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a mixed-precision run does not lower the metric's precision
        assert torch.equal(net.features(videos), features)


def test_features_see_time(net):
    videos = moving_clips(1, seed=3)
    shuffled = videos[:, torch.randperm(MIN_FRAMES, generator=torch.Generator().manual_seed(0))]
    ordered, reordered = net.features(torch.cat([videos, shuffled]))  # one batch of 2: [2, 400]
    assert (ordered - reordered).norm() > 0.05 * ordered.norm()


def test_fvd_is_zero_on_a_set_itself_and_grows_with_noise(net):
    real = moving_clips(3, seed=1)
    features = net.features(real)
    itself = FVDMetric(net)
    itself.generated.add(features)
    itself.real.add(features)
    assert abs(itself.compute()) < 1e-3
    noise = torch.randn(real[:2].shape, generator=torch.Generator().manual_seed(2))
    distances = []
    for level in (0.05, 0.15, 0.4):
        metric = FVDMetric(net)
        metric.real = itself.real
        metric.generated.add(net.features((real[:2] + level * noise).clamp(0, 1)))
        distances.append(metric.compute())
    assert 0 < distances[0] < distances[1] < distances[2], distances


# --- the metric -----------------------------------------------------------------------------------------------------


def test_fvd_metric_batches_and_ranks_equal_one_pass(net):
    generated, real = moving_clips(2, seed=10), moving_clips(2, seed=20)
    whole = FVDMetric(net)
    whole.update(generated, real)

    batches = FVDMetric(net, batch_size=1)
    batches.update(generated[:1], real[:1])
    first_rank = batches.state()  # a snapshot: the next update must not change it
    batches.update(generated[1:], real[1:])
    second_rank = FVDMetric(net)
    second_rank.update(generated[1:], real[1:])
    merged = FVDMetric.from_states(second_rank, [first_rank, second_rank.state()])

    assert whole.count == batches.count == merged.count == 2
    expected = whole.compute()
    assert expected > 0
    assert batches.compute() == pytest.approx(expected, rel=1e-4)
    assert merged.compute() == pytest.approx(expected, rel=1e-4)

    merged.merge(FVDMetric.from_states(whole, []))  # an empty rank adds nothing
    assert merged.compute() == pytest.approx(expected, rel=1e-4)
    merged.reset()
    with pytest.raises(ValueError, match="at least 2 generated clips"):
        merged.compute()


def test_fvd_metric_rejects_bad_clips(net):
    metric = FVDMetric(net)
    with pytest.raises(ValueError, match=r"real must be clips \[B, T, 3, H, W\]"):
        metric.update(torch.rand(1, MIN_FRAMES, 3, 8, 8), torch.rand(1, 3, MIN_FRAMES, 8, 8))
    with pytest.raises(ValueError, match=r"generated must be in \[0, 1\]"):
        metric.update(torch.rand(1, MIN_FRAMES, 3, 8, 8) * 2 - 1, torch.rand(1, MIN_FRAMES, 3, 8, 8))
    with pytest.raises(ValueError, match="floats"):
        metric.update(torch.zeros(1, MIN_FRAMES, 3, 8, 8, dtype=torch.uint8), torch.rand(1, MIN_FRAMES, 3, 8, 8))
    assert metric.count == 0
