"""FID: the Fréchet distance against scipy, FID's Inception in the exact layout of pytorch-fid's weights file (loaded
safely), and the metric's behaviour on a seeded random-weights network."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from prefalign import inception
from prefalign.frechet import FeatureStats, frechet_distance
from prefalign.inception import FIDInception, FIDMetric, load_fid_inception

# ---------------------------------------------------------------------------------------------------------------
# The Fréchet distance


def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook formula with scipy's general matrix square root, in float64."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root).real)


def _covariance(rng: np.random.Generator, dim: int, rank: int, floor: float) -> np.ndarray:
    factor = rng.standard_normal((dim, rank))
    return factor @ factor.T / rank + floor * np.eye(dim)


@pytest.mark.parametrize("rank, floor", [(64, 0.1), (256, 0.0), (8, 1e-8)], ids=["full", "wide", "near-singular"])
def test_frechet_distance_matches_scipy(rank, floor):
    rng = np.random.default_rng(rank)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64) * 0.5
    sigma1, sigma2 = _covariance(rng, 64, rank, floor), _covariance(rng, 64, rank, floor)
    expected = _scipy_frechet(mu1, sigma1, mu2, sigma2)
    got = frechet_distance(*(torch.from_numpy(a) for a in (mu1, sigma1, mu2, sigma2)))
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("floor", [0.1, 1e-8])
def test_frechet_distance_of_a_gaussian_with_itself_is_zero(floor):
    rng = np.random.default_rng(1)
    mu, sigma = torch.from_numpy(rng.standard_normal(64)), torch.from_numpy(_covariance(rng, 64, 8, floor))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_feature_stats_match_numpy_and_merge():
    rng = np.random.default_rng(2)
    features = rng.standard_normal((50, 16)) * rng.uniform(0.5, 3, 16) + rng.standard_normal(16)
    whole, first, second = FeatureStats(16), FeatureStats(16), FeatureStats(16)
    whole.add(torch.from_numpy(features))
    first.add(torch.from_numpy(features[:20]))
    second.add(torch.from_numpy(features[20:]))
    first.merge(FeatureStats.from_state(second.state()))
    for stats in (whole, first):
        mean, cov = stats.mean_cov()
        np.testing.assert_allclose(mean.numpy(), features.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cov.numpy(), np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)
    assert first.count == whole.count == 50


# ---------------------------------------------------------------------------------------------------------------
# The network's layout: every tensor of pytorch-fid's weights file, written down from torchvision's Inception3
# (num_classes=1008, aux_logits=False) with pytorch-fid's FID blocks (same convolutions, other pooling).
# A layer is (name, in channels, out channels, kernel height, kernel width).

STEM = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
        ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]  # fmt: skip


def _block_a(cin, pool):  # InceptionA / FIDInceptionA
    return [("branch1x1", cin, 64, 1, 1), ("branch5x5_1", cin, 48, 1, 1), ("branch5x5_2", 48, 64, 5, 5),
            ("branch3x3dbl_1", cin, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3),
            ("branch_pool", cin, pool, 1, 1)]  # fmt: skip


def _block_b(cin):  # InceptionB
    return [("branch3x3", cin, 384, 3, 3), ("branch3x3dbl_1", cin, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3),
            ("branch3x3dbl_3", 96, 96, 3, 3)]  # fmt: skip


def _block_c(cin, c7):  # InceptionC / FIDInceptionC
    return [("branch1x1", cin, 192, 1, 1), ("branch7x7_1", cin, c7, 1, 1), ("branch7x7_2", c7, c7, 1, 7),
            ("branch7x7_3", c7, 192, 7, 1), ("branch7x7dbl_1", cin, c7, 1, 1), ("branch7x7dbl_2", c7, c7, 7, 1),
            ("branch7x7dbl_3", c7, c7, 1, 7), ("branch7x7dbl_4", c7, c7, 7, 1), ("branch7x7dbl_5", c7, 192, 1, 7),
            ("branch_pool", cin, 192, 1, 1)]  # fmt: skip


def _block_d(cin):  # InceptionD
    return [("branch3x3_1", cin, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3), ("branch7x7x3_1", cin, 192, 1, 1),
            ("branch7x7x3_2", 192, 192, 1, 7), ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)]


def _block_e(cin):  # InceptionE / FIDInceptionE_1, FIDInceptionE_2
    return [("branch1x1", cin, 320, 1, 1), ("branch3x3_1", cin, 384, 1, 1), ("branch3x3_2a", 384, 384, 1, 3),
            ("branch3x3_2b", 384, 384, 3, 1), ("branch3x3dbl_1", cin, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
            ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1), ("branch_pool", cin, 192, 1, 1)]


BLOCKS = {
    "Mixed_5b": _block_a(192, 32), "Mixed_5c": _block_a(256, 64), "Mixed_5d": _block_a(288, 64),
    "Mixed_6a": _block_b(288),
    "Mixed_6b": _block_c(768, 128), "Mixed_6c": _block_c(768, 160), "Mixed_6d": _block_c(768, 160),
    "Mixed_6e": _block_c(768, 192),
    "Mixed_7a": _block_d(768),
    "Mixed_7b": _block_e(1280), "Mixed_7c": _block_e(2048),
}  # fmt: skip


def _expected_layout() -> dict[str, tuple[int, ...]]:
    layers = list(STEM) + [(f"{block}.{name}", *rest) for block, convs in BLOCKS.items() for name, *rest in convs]
    layout = {}
    for name, cin, cout, kh, kw in layers:
        layout[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for tensor in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.bn.{tensor}"] = (cout,)
    layout["fc.weight"], layout["fc.bias"] = (1008, 2048), (1008,)
    return layout


EXPECTED = _expected_layout()


def test_layout_is_pytorch_fids_weights_file():
    own = {key: tuple(value.shape) for key, value in FIDInception().state_dict().items()}
    assert own == EXPECTED
    # 94 convolutions with 5 tensors each, and fc; no AuxLogits, no num_batches_tracked
    assert len(own) == 94 * 5 + 2 == 472
    assert not any("AuxLogits" in key or "num_batches_tracked" in key for key in own)
    assert own["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert own["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert own["Mixed_7c.branch3x3dbl_2.conv.weight"] == (384, 448, 3, 3)
    assert own["Mixed_7c.branch_pool.bn.running_var"] == (192,)
    # 91 MiB of float32, the size of the published file
    assert sum(np.prod(shape) for shape in own.values()) == 23_885_392


def _random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the file's layout: He-normal convolutions (activations neither vanish nor explode), batch
    norm as the identity (running mean 0, var 1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in EXPECTED.items():
        if key.endswith("conv.weight") or key == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=generator) * (2 / fan_in) ** 0.5
        elif key.endswith(("bn.weight", "running_var")):
            state[key] = torch.ones(shape)
        else:
            state[key] = torch.zeros(shape)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_FILE
    torch.save(_random_state(), path)
    return path


@pytest.fixture(scope="module")
def network(weights_file) -> FIDInception:
    return load_fid_inception(weights_file)


@pytest.fixture(scope="module")
def small_network(network) -> FIDInception:
    """The same network on 75x75 frames (16 times fewer pixels than 299): cheap behaviour tests."""
    small = FIDInception(input_size=75)
    small.load_state_dict(network.state_dict())
    return small


def test_loads_the_layout_from_pth_and_safetensors(weights_file, network, tmp_path):
    state = _random_state()
    for key, value in network.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not network.training and not any(p.requires_grad for p in network.parameters())
    network.train()
    assert not network.training
    # the same tensors as safetensors; the legacy (pre-1.6) torch.save format; a file with the step counters that
    # torchvision's BatchNorm2d saves
    save_file(state, str(tmp_path / "inception.safetensors"))
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    counters = {key.replace("running_mean", "num_batches_tracked"): torch.tensor(0)
                for key in state if key.endswith("running_mean")}  # fmt: skip
    torch.save({**state, **counters}, tmp_path / "counters.pth")
    for name in ("inception.safetensors", "legacy.pth", "counters.pth"):
        loaded = load_fid_inception(tmp_path / name).state_dict()
        assert torch.equal(loaded["Mixed_7c.branch_pool.conv.weight"], state["Mixed_7c.branch_pool.conv.weight"])


def _small_state() -> dict[str, torch.Tensor]:
    return {"Conv2d_1a_3x3.bn.weight": torch.ones(32)}


class _Payload:
    """Unpickling it runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refuses_a_pickle_with_code(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "marker"
    torch.save({**_small_state(), "Conv2d_1a_3x3.conv.weight": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="refused") as error:
        load_fid_inception(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_refuses_broken_files(tmp_path, monkeypatch):
    whole = tmp_path / "whole.pth"
    torch.save({key: torch.zeros(64) for key in ("a", "b", "c")}, whole)
    data = whole.read_bytes()
    for name, content in (("cut.pth", data[: len(data) // 2]), ("empty.pth", b""), ("cut.safetensors", data[:40])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=str(tmp_path / name)):
            load_fid_inception(tmp_path / name)
    with pytest.raises(ValueError, match="missing.*unexpected"):
        load_fid_inception(whole)
    monkeypatch.setattr(inception, "MAX_WEIGHTS_BYTES", 100)
    with pytest.raises(ValueError, match="above"):
        load_fid_inception(whole)
    with pytest.raises(FileNotFoundError, match=r"model\.evaluation\.inception.*github\.com/mseitzer/pytorch-fid"):
        load_fid_inception(tmp_path / "absent.pth")


def test_refuses_wrong_keys_and_shapes(tmp_path):
    state = _random_state()
    state["Mixed_5b.branch_pool.conv.weight"] = torch.zeros(64, 192, 1, 1)
    state["AuxLogits.fc.weight"] = state.pop("fc.weight")
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(ValueError) as error:
        load_fid_inception(tmp_path / "wrong.pth")
    message = str(error.value)
    for part in (str(tmp_path / "wrong.pth"), "1 missing (fc.weight)", "1 unexpected (AuxLogits.fc.weight)",
                 "Mixed_5b.branch_pool.conv.weight (64, 192, 1, 1) instead of (32, 192, 1, 1)"):
        assert part in message


# ---------------------------------------------------------------------------------------------------------------
# The forward pass


def test_features_resize_scale_and_pool(network):
    images = torch.rand(2, 3, 32, 32)
    seen = {}
    hooks = [network.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.update(first=args[0])),
             network.Mixed_7c.register_forward_hook(lambda m, args, out: seen.update(last=out))]  # fmt: skip
    try:
        with torch.no_grad():
            features = network(images)
    finally:
        for hook in hooks:
            hook.remove()
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    resized = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen["first"], 2 * resized - 1)
    assert seen["last"].shape == (2, 2048, 8, 8)
    torch.testing.assert_close(features, seen["last"].mean((2, 3)))
    assert features.std(0).mean() > 1e-3  # the random network tells images apart
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        network(torch.rand(2, 1, 32, 32))


# How each block is wired, from torchvision's Inception blocks: what feeds each layer ("x": the block's input;
# branch_pool takes the pooled input, checked below), and the towers concatenated, in order ("max_pool": a 3x3
# stride-2 max pool of the input).
_A = {"feeds": {"branch5x5_2": "branch5x5_1", "branch3x3dbl_2": "branch3x3dbl_1", "branch3x3dbl_3": "branch3x3dbl_2"},
      "towers": ["branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool"]}  # fmt: skip
_B = {"feeds": {"branch3x3dbl_2": "branch3x3dbl_1", "branch3x3dbl_3": "branch3x3dbl_2"},
      "towers": ["branch3x3", "branch3x3dbl_3", "max_pool"]}  # fmt: skip
_C = {"feeds": {"branch7x7_2": "branch7x7_1", "branch7x7_3": "branch7x7_2", "branch7x7dbl_2": "branch7x7dbl_1",
                "branch7x7dbl_3": "branch7x7dbl_2", "branch7x7dbl_4": "branch7x7dbl_3",
                "branch7x7dbl_5": "branch7x7dbl_4"},
      "towers": ["branch1x1", "branch7x7_3", "branch7x7dbl_5", "branch_pool"]}  # fmt: skip
_D = {"feeds": {"branch3x3_2": "branch3x3_1", "branch7x7x3_2": "branch7x7x3_1", "branch7x7x3_3": "branch7x7x3_2",
                "branch7x7x3_4": "branch7x7x3_3"},
      "towers": ["branch3x3_2", "branch7x7x3_4", "max_pool"]}  # fmt: skip
_E = {"feeds": {"branch3x3_2a": "branch3x3_1", "branch3x3_2b": "branch3x3_1", "branch3x3dbl_2": "branch3x3dbl_1",
                "branch3x3dbl_3a": "branch3x3dbl_2", "branch3x3dbl_3b": "branch3x3dbl_2"},
      "towers": ["branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]}
WIRING = {"Mixed_5b": _A, "Mixed_5c": _A, "Mixed_5d": _A, "Mixed_6a": _B, "Mixed_6b": _C, "Mixed_6c": _C,
          "Mixed_6d": _C, "Mixed_6e": _C, "Mixed_7a": _D, "Mixed_7b": _E, "Mixed_7c": _E}  # fmt: skip


@pytest.mark.parametrize("block", list(WIRING))
def test_blocks_are_wired_as_inception_v3(network, block):
    module, wiring = getattr(network, block), WIRING[block]
    layers = [name for name, *_ in BLOCKS[block]]
    x = torch.rand(1, BLOCKS[block][0][1], 9, 9)
    inputs, outputs = {}, {}
    hooks = []
    for name in layers:
        layer = getattr(module, name)
        hooks.append(layer.register_forward_pre_hook(lambda m, args, name=name: inputs.update({name: args[0]})))
        hooks.append(layer.register_forward_hook(lambda m, args, out, name=name: outputs.update({name: out})))
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        for hook in hooks:
            hook.remove()
    for name in layers:
        if name != "branch_pool":
            assert torch.equal(inputs[name], outputs[wiring["feeds"][name]] if name in wiring["feeds"] else x), name
    towers = [F.max_pool2d(x, 3, stride=2) if name == "max_pool" else outputs[name] for name in wiring["towers"]]
    torch.testing.assert_close(out, torch.cat(towers, 1), rtol=0, atol=0)


def test_layer_is_conv_batch_norm_relu_with_tensorflows_epsilon(network):
    """Every layer normalizes with its running statistics (also after ``.train()``) and TF's epsilon, 1e-3."""
    layer = copy.deepcopy(network.Mixed_6e.branch7x7_2)
    generator = torch.Generator().manual_seed(3)
    mean, var = torch.randn(192, generator=generator), torch.rand(192, generator=generator) * 1e-3
    gamma, beta = torch.randn(192, generator=generator), torch.randn(192, generator=generator)
    layer.bn.running_mean.copy_(mean), layer.bn.running_var.copy_(var)
    layer.bn.weight.copy_(gamma), layer.bn.bias.copy_(beta)
    layer.train()
    x = torch.randn(2, 192, 5, 9, generator=generator)
    conv = F.conv2d(x, layer.conv.weight, padding=(0, 3))
    shape = (1, -1, 1, 1)
    expected = ((conv - mean.view(shape)) / (var.view(shape) + 1e-3).sqrt() * gamma.view(shape)
                + beta.view(shape)).relu()  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bn.running_mean, mean)  # statistics untouched


@pytest.mark.parametrize("block, pool", [("Mixed_5b", "avg"), ("Mixed_5d", "avg"), ("Mixed_6b", "avg"),
                                         ("Mixed_6e", "avg"), ("Mixed_7b", "avg"), ("Mixed_7c", "max")])  # fmt: skip
def test_pool_towers_are_tensorflows(network, block, pool):
    """FID's blocks: TF's 3x3 SAME average pool (the padding is not counted), and a max pool in Mixed_7c."""
    module = getattr(network, block)
    x = torch.rand(1, module.branch_pool.conv.in_channels, 6, 6)
    seen = {}
    hook = module.branch_pool.register_forward_pre_hook(lambda m, args: seen.update(pooled=args[0]))
    try:
        with torch.no_grad():
            module(x)
    finally:
        hook.remove()
    if pool == "max":
        expected = F.max_pool2d(x, 3, stride=1, padding=1)
    else:  # the mean of the pixels inside the image: 4 at a corner, 6 on an edge
        window_sums = F.conv2d(F.pad(x, (1, 1, 1, 1)), torch.ones(x.shape[1], 1, 3, 3), groups=x.shape[1])
        counts = F.conv2d(F.pad(torch.ones(1, 1, 6, 6), (1, 1, 1, 1)), torch.ones(1, 1, 3, 3))
        expected = window_sums / counts
    torch.testing.assert_close(seen["pooled"], expected)


# ---------------------------------------------------------------------------------------------------------------
# FID on the random network


def _frames(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Smooth random images: a coarse colour grid upsampled."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_fid_is_zero_for_a_set_with_itself_and_grows_with_noise(small_network):
    images = _frames(6, seed=0)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        real = FeatureStats(2048)
        real.add(small_network(images))
        distances = []
        for sigma in (0.05, 0.15, 0.4):
            noisy = FeatureStats(2048)
            noisy.add(small_network(images + sigma * noise))
            distances.append(noisy.distance(real))
    assert real.distance(real) < 1e-6
    assert 0 < distances[0] < distances[1] < distances[2], distances


def test_metric_batches_and_ranks_add_up(small_network):
    generated = torch.stack([_frames(3, seed=10), _frames(3, seed=11)])  # [2 clips, 3 frames, 3, 32, 32]
    real = torch.stack([_frames(3, seed=20), _frames(3, seed=21)])
    # frames 0 and 2 of each clip: 4 a side; batch_size 3 splits them differently in each update
    whole = FIDMetric(small_network, batch_size=3, frame_stride=2)
    whole.update(generated, real)
    assert (whole.generated.count, whole.real.count, whole.count) == (4, 4, 2)
    # two batches on one rank, then the second batch alone on another rank, gathered
    split = FIDMetric(small_network, batch_size=3, frame_stride=2)
    split.update(generated[:1], real[:1])
    rank0 = split.state()
    split.update(generated[1:], real[1:])
    rank1 = FIDMetric(small_network, batch_size=3, frame_stride=2)
    rank1.update(generated[1:], real[1:])
    gathered = FIDMetric.from_states(whole, [rank0, rank1.state()])
    value = whole.compute()
    assert value > 0
    for metric in (split, gathered):
        assert metric.count == 2 and metric.real.count == 4
        torch.testing.assert_close(metric.generated.total, whole.generated.total, rtol=1e-5, atol=1e-6)
        assert metric.compute() == pytest.approx(value, rel=1e-4)
    assert rank0["clips"] == 1 and rank0["generated"]["count"] == 2  # a snapshot: later updates leave it alone
    whole.reset()
    with pytest.raises(ValueError, match="at least 2"):
        whole.compute()
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        whole.update(generated[0], real)


@pytest.mark.slow
def test_fid_of_two_draws_of_one_distribution_is_below_other_distribution(network):
    """More frames: two draws of smooth images are closer than smooth images and noise."""
    metric_same, metric_other = FIDMetric(network), FIDMetric(network)
    first, second = _frames(32, seed=0)[None], _frames(32, seed=1)[None]
    noise = torch.rand(first.shape, generator=torch.Generator().manual_seed(2))
    metric_same.update(first, second)
    metric_other.update(noise, second)
    assert metric_same.compute() < metric_other.compute()

