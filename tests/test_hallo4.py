"""Hallo4 (a Wan2.1 VACE 1.3B with speech and skeleton cross-attention) on diffusers' WanVACETransformer3DModel.

The port is checked against a golden forward of Hallo4's own code (``fixtures/hallo4_reference.safetensors``, see
``fixtures/README.md``); the tiny release (``layouts.hallo4_release``) is checked to have the released key layout;
loading, conversion, refusals, LoRA, one DPO and one GRPO step, the skeleton, speech and text conditions are tested
on the tiny layouts (``conftest``'s session fixtures).
"""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from prefalign.data.errors import DataError
from prefalign.denoisers import WanVAECodec, Wav2Vec2AudioEncoder
from prefalign.denoisers.hallo4 import (
    MODULES_CONFIG,
    MODULES_FILE,
    MODULES_FOLDER,
    TEXT_FILE,
    WAN_NEGATIVE_PROMPT,
    Hallo4Denoiser,
    convert,
    embed_prompts,
    load_converted,
    load_released,
    read_text_embedding,
    speech_windows,
    split_released,
)
from prefalign.denoisers.skeleton import OPENPOSE_COLORS, render_skeleton

from conftest import quiet_trainer
from layouts import HALLO4_TINY, HALLO4_TINY_OVERRIDES, WAN_VAE, hallo4_state_dict

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hallo4_reference.safetensors")
#: What the fixture's sizes need beyond the shapes (its config: 2 heads, VACE layers [0, 2], text_len 16, and a
#: speech MLP over 3 levels of 16 features).
FIXTURE_OVERRIDES = dict(num_attention_heads=2, vace_layers=[0, 2], text_len=16, audio_levels=3, audio_dim=16)
#: A random wav2vec2 with 3 levels (input + 2 layers) of 16 features: the fixture's speech width.
FIXTURE_AUDIO = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     conv_dim=[8, 8], conv_kernel=[10, 3], conv_stride=[5, 2], num_conv_pos_embeddings=4,
                     num_conv_pos_embedding_groups=2)
FRAMES = 17  # TalkingShapes clips: 17 frames of 32x32 at 25 fps, 8 keypoints


# --- helpers and fixtures ----------------------------------------------------------------------------------------
def tiny_hallo4(wan_dir: str, wav2vec2_dir: str, **source) -> Hallo4Denoiser:
    """The tiny Hallo4 on the tiny Wan VAE and wav2vec2 (2 levels of 32), skeletons from 8 keypoints."""
    options = dict(pose_keypoints=8)
    options.update(source)
    codec = WanVAECodec(pretrained=wan_dir, subfolder="vae")
    audio = Wav2Vec2AudioEncoder(pretrained=wav2vec2_dir, layers=[1, 2], resample="features")
    return Hallo4Denoiser(codec, audio, **options)


def fixed_inputs(denoiser: Hallo4Denoiser, batch_size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *denoiser.latent_shape(FRAMES, 32, 32), generator=g)
    return x, torch.tensor([700.0, 250.0])[:batch_size]


def padded(embedding: torch.Tensor, length: int) -> torch.Tensor:
    out = torch.zeros(length, embedding.shape[1])
    out[: embedding.shape[0]] = embedding
    return out


class Recorder(L.Callback):
    """Keeps the logged training metrics of every step."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


@pytest.fixture(scope="module")
def reference():
    """The golden file: its tensors and its metadata config."""
    with safe_open(FIXTURE, framework="pt") as handle:
        config = json.loads(handle.metadata()["config"])
    return load_file(FIXTURE), config


@pytest.fixture(scope="module")
def batch(talkingshapes):
    """Two TalkingShapes clips of 17 frames (video, audio, reference, 8 keypoints per frame)."""
    from prefalign.data.datamodule import PortraitDataModule

    data = PortraitDataModule(train=str(talkingshapes), batch_size=2, num_frames=FRAMES, val_fraction=0.0)
    return next(iter(data.train_dataloader()))


@pytest.fixture(scope="module")
def plain(hallo4_dir, wan_i2v_14b_dir, wav2vec2_base_960h_dir):
    """The converted tiny release, as loaded (read only: tests must not change it)."""
    return tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, pretrained=hallo4_dir).eval()


@pytest.fixture(scope="module")
def plain_cond(plain, batch):
    with torch.no_grad():
        return plain.condition(batch)


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    """A Wan-like text folder built offline: ``tokenizer/`` (a word-level tokenizer that appends ``</s>``, as T5's
    does) and ``text_encoder/`` (a random 2-layer umT5 encoder of width 32, the tiny release's text_dim)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("umt5")
    words = ["<pad>", "</s>", "<unk>", "a", "person", "is", "talking", "quiet", "room"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=len(words), d_model=HALLO4_TINY["text_dim"], d_kv=8, d_ff=16, num_layers=2,
                        num_heads=2, num_decoder_layers=0)
    UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
    return str(root)


# --- 1. the forward is Hallo4's ------------------------------------------------------------------------------------
def test_forward_equals_hallo4s_own_code_from_pth_and_safetensors(reference, tmp_path):
    """The fixture's weights, as a torch zip and as safetensors, give Hallo4's outputs at both VACE scales."""
    tensors, config = reference
    weights = {k.removeprefix("weights/"): v for k, v in tensors.items() if k.startswith("weights/")}
    torch.save(weights, tmp_path / "model_weight.pth")
    save_file(weights, str(tmp_path / "model_weight.safetensors"))
    text = torch.stack([padded(tensors["inputs/context_0"], config["text_len"]),
                        padded(tensors["inputs/context_1"], config["text_len"])])
    outputs = {}
    for name in ("model_weight.pth", "model_weight.safetensors"):
        torch.manual_seed(0)
        codec, audio = WanVAECodec(config=WAN_VAE), Wav2Vec2AudioEncoder(config=FIXTURE_AUDIO)
        denoiser = Hallo4Denoiser(codec, audio, checkpoint=str(tmp_path / name), overrides=FIXTURE_OVERRIDES).eval()
        for scale in config["vace_context_scales"]:
            with torch.no_grad():
                y = denoiser.released_forward(
                    tensors["inputs/x"], tensors["inputs/t"], tensors["inputs/vace_context"], text,
                    tensors["inputs/audio_emb"], tensors["inputs/skeleton_latents"], vace_scale=scale,
                )
            expected = tensors[f"outputs/scale_{scale}"]
            assert y.shape == expected.shape == (2, 16, 3, 4, 6)
            error = (y - expected).abs().max().item()
            assert error < 1e-4, f"{name} at VACE scale {scale}: max |diff| {error}"  # the acceptance bound
            assert error < 2e-5, f"{name} at VACE scale {scale}: max |diff| {error} (was ~3e-6: a drift)"
            outputs[name, scale] = y
    # The two scales give different outputs, and the two file formats the same ones.
    assert not torch.allclose(outputs["model_weight.pth", 1.0], outputs["model_weight.pth", 0.7])
    for scale in config["vace_context_scales"]:
        assert torch.equal(outputs["model_weight.pth", scale], outputs["model_weight.safetensors", scale])


# --- 2. the tiny release's layout is the released one ---------------------------------------------------------------
def test_key_table_at_the_fixtures_sizes_is_the_fixtures_state_dict(reference):
    tensors, config = reference
    audio = config["audio_proj"]
    sizes = {
        "dim": config["dim"], "heads": config["num_heads"], "ffn": config["ffn_dim"], "layers": config["num_layers"],
        "vace_blocks": len(config["vace_layers"]), "in_channels": config["in_dim"],
        "vace_channels": config["vace_in_dim"], "text_dim": config["text_dim"], "freq_dim": config["freq_dim"],
        "out_channels": config["out_dim"], "patch": tuple(config["patch_size"]), "audio_window": audio["seq_len"],
        "audio_levels": audio["blocks"], "audio_dim": audio["channels"], "audio_hidden": audio["intermediate_dim"],
        "audio_tokens": audio["context_tokens"], "pose_channels": tensors["inputs/skeleton_latents"].shape[1],
    }  # fmt: skip
    assert set(sizes) == set(HALLO4_TINY)  # every size the key table takes
    assert (sizes["dim"], sizes["ffn"], sizes["layers"], sizes["vace_blocks"]) == (24, 48, 4, 2)
    assert (sizes["in_channels"], sizes["vace_channels"], sizes["text_dim"], sizes["pose_channels"]) == (16, 96, 20, 16)
    assert (sizes["audio_window"], sizes["audio_levels"], sizes["audio_dim"], sizes["audio_tokens"]) == (5, 3, 16, 4)
    theirs = {k.removeprefix("weights/"): v for k, v in tensors.items() if k.startswith("weights/")}
    ours = hallo4_state_dict(sizes)
    assert len(theirs) == 293
    assert sorted(ours) == sorted(theirs)
    shapes = {k: (tuple(ours[k].shape), tuple(theirs[k].shape)) for k in ours}
    assert {k: s for k, s in shapes.items() if s[0] != s[1]} == {}
    assert all(v.dtype == torch.float32 for v in ours.values())


# --- 3. every tensor used exactly once ----------------------------------------------------------------------------
def test_every_released_tensor_is_loaded_exactly_once(hallo4_release_file):
    state = torch.load(hallo4_release_file, map_location="cpu", weights_only=True)
    transformer, modules = load_released(hallo4_release_file, HALLO4_TINY_OVERRIDES)
    ours_t, ours_m = transformer.state_dict(), modules.state_dict()
    assert len(state) == len(ours_t) + len(ours_m)
    tensors, own = split_released(state, hallo4_release_file)
    assert len(tensors) + len(own) == len(state)
    assert set(tensors) == set(ours_t) and set(own) == set(ours_m)
    assert all(torch.equal(ours_t[k], v) for k, v in tensors.items())
    assert all(torch.equal(ours_m[k], v) for k, v in own.items())
    # Sizes the shapes tell, and the overrides.
    assert transformer.config.num_layers == 4 and list(transformer.config.vace_layers) == [0, 2]
    assert transformer.config.num_attention_heads == 2 and transformer.config.attention_head_dim == 16
    assert modules.config["text_len"] == 16 and modules.config["audio_levels"] == 2
    assert modules.config["audio_tokens"] == HALLO4_TINY["audio_tokens"]


@pytest.mark.parametrize(
    "extra, named",
    [("not_hallo4.weight", "not_hallo4.weight"),
     ("vace_blocks.1.before_proj.weight", "vace_blocks.1.proj_in.weight"),  # named as diffusers' key
     ("blocks.0.audio_cross_attn.extra.weight", "blocks.0.audio_cross_attn.extra.weight")],
    ids=["unknown-name", "transformer-name-without-a-place", "module-name-without-a-place"],
)
def test_a_tensor_without_a_place_is_refused_naming_the_file(hallo4_release_file, tmp_path, extra, named):
    state = torch.load(hallo4_release_file, weights_only=True)
    state[extra] = torch.zeros(HALLO4_TINY["dim"], HALLO4_TINY["dim"])
    path = tmp_path / "model_weight.pth"
    torch.save(state, path)
    with pytest.raises(DataError) as error:
        load_released(path, HALLO4_TINY_OVERRIDES)
    assert str(path) in str(error.value) and named in str(error.value)


def test_a_missing_tensor_is_refused_naming_the_file_and_the_key(hallo4_release_file, tmp_path):
    state = torch.load(hallo4_release_file, weights_only=True)
    del state["blocks.1.audio_cross_attn.q.weight"]
    path = tmp_path / "model_weight.pth"
    torch.save(state, path)
    with pytest.raises(DataError) as error:
        load_released(path, HALLO4_TINY_OVERRIDES)
    assert str(path) in str(error.value)
    assert "blocks.1.audio_cross_attn.q.weight" in str(error.value)


@pytest.mark.parametrize("key", ["blocks.2.cross_attn.k.weight", "blocks.3.condition_cross_attn.v.bias"])
def test_a_tensor_of_another_shape_is_refused(hallo4_release_file, tmp_path, key):
    state = torch.load(hallo4_release_file, weights_only=True)
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    path = tmp_path / "model_weight.pth"
    torch.save(state, path)
    with pytest.raises(DataError) as error:
        load_released(path, HALLO4_TINY_OVERRIDES)
    assert str(path) in str(error.value) and "shape" in str(error.value)


# --- 4. the converter ------------------------------------------------------------------------------------------------
def test_converted_folder_loads_to_the_same_model_and_holds_no_pickle(
    hallo4_release_file, wan_i2v_14b_dir, wav2vec2_base_960h_dir, batch, tmp_path
):
    out = convert(hallo4_release_file, tmp_path / "hallo4-prefalign", HALLO4_TINY_OVERRIDES)
    assert out == tmp_path / "hallo4-prefalign"
    assert [p.name for p in tmp_path.iterdir()] == ["hallo4-prefalign"]  # no temporary folder left beside it
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "transformer/config.json" in files
    assert any(f.startswith("transformer/") and f.endswith(".safetensors") for f in files)
    assert f"{MODULES_FOLDER}/{MODULES_FILE}" in files and f"{MODULES_FOLDER}/{MODULES_CONFIG}" in files
    assert all(f.endswith((".json", ".safetensors")) for f in files), files  # no .pth / .bin / .pt / .pkl
    modules_config = json.loads((out / MODULES_FOLDER / MODULES_CONFIG).read_text())
    assert (modules_config["text_len"], modules_config["audio_levels"], modules_config["audio_dim"]) == (16, 2, 32)

    released = tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, checkpoint=hallo4_release_file,
                           overrides=HALLO4_TINY_OVERRIDES).eval()
    converted = tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, pretrained=str(out)).eval()
    assert converted.backbone.config.vace_layers == released.backbone.config.vace_layers
    with torch.no_grad():
        cond = released.condition(batch)
        x, t = fixed_inputs(released)
        a, b = released(x, t, cond), converted(x, t, cond)
    assert a.shape == x.shape
    assert torch.equal(a, b)
    ours, theirs = converted.backbone.state_dict(), released.backbone.state_dict()
    assert ours.keys() == theirs.keys() and [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def release_width_file(tmp_path) -> str:
    """A tiny release whose speech MLP takes the release's 5 × 12 × 768 inputs (the CLI cannot set audio sizes)."""
    path = tmp_path / "download" / "model_weight.pth"
    path.parent.mkdir()
    torch.save(hallo4_state_dict({**HALLO4_TINY, "audio_levels": 12, "audio_dim": 768, "audio_hidden": 4}), path)
    return str(path)


def test_convert_command_writes_a_folder_and_refuses_an_existing_one(tmp_path, capsys):
    from prefalign.cli import main

    checkpoint, out = release_width_file(tmp_path), tmp_path / "converted"
    main(["convert", "hallo4", "--checkpoint", checkpoint, "--out", str(out), "--num_attention_heads", "2"])
    assert f"wrote {out}" in capsys.readouterr().out
    transformer, modules = load_converted(out, "transformer", torch.float32)
    want_t, want_m = load_released(checkpoint, {"num_attention_heads": 2})
    assert transformer.config.num_attention_heads == 2
    for ours, theirs in ((transformer.state_dict(), want_t.state_dict()), (modules.state_dict(), want_m.state_dict())):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert modules.config["audio_levels"] == 12 and modules.config["audio_dim"] == 768  # the release's defaults

    before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(FileExistsError):
        main(["convert", "hallo4", "--checkpoint", checkpoint, "--out", str(out), "--num_attention_heads", "2"])
    assert sorted(str(p) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "download"]


def test_convert_command_without_the_audio_sizes_refuses_the_tiny_release(hallo4_release_file, tmp_path):
    """The tiny release's speech MLP takes 5 × 2 × 32 inputs, not the release's 5 × 12 × 768."""
    from prefalign.cli import main

    out = tmp_path / "converted"
    with pytest.raises(ValueError, match="speech MLP"):
        main(["convert", "hallo4", "--checkpoint", hallo4_release_file, "--out", str(out),
              "--num_attention_heads", "2"])
    assert list(tmp_path.iterdir()) == []


def test_convert_command_takes_every_size_the_shapes_cannot_tell(hallo4_release_file, tmp_path, capsys):
    from prefalign.cli import main

    out = tmp_path / "converted"
    main(["convert", "hallo4", "--checkpoint", hallo4_release_file, "--out", str(out), "--num_attention_heads", "2",
          "--vace_layers", "[0, 2]", "--text_len", "16", "--audio_window", "5", "--audio_levels", "2",
          "--audio_dim", "32"])
    assert f"wrote {out}" in capsys.readouterr().out
    transformer, modules = load_converted(out, "transformer", torch.float32)
    assert transformer.config.vace_layers == [0, 2] and modules.text_len == 16
    assert (modules.config["audio_levels"], modules.config["audio_dim"]) == (2, 32)


def test_a_safetensors_file_under_a_pth_name_is_read_by_its_bytes(hallo4_release_file, tmp_path):
    path = tmp_path / "model_weight.pth"
    save_file(torch.load(hallo4_release_file, weights_only=True), str(path))
    transformer, _ = load_released(path, HALLO4_TINY_OVERRIDES)
    reference, _ = load_released(hallo4_release_file, HALLO4_TINY_OVERRIDES)
    assert all(torch.equal(a, b) for a, b in zip(transformer.state_dict().values(), reference.state_dict().values()))


def test_an_unknown_override_is_refused_with_the_allowed_ones(hallo4_release_file):
    with pytest.raises(DataError, match="not Hallo4 settings; allowed: .*audio_levels") as error:
        load_released(hallo4_release_file, {**HALLO4_TINY_OVERRIDES, "num_heads": 2})
    assert hallo4_release_file in str(error.value)


def test_a_failed_conversion_leaves_nothing_behind(hallo4_release_file, tmp_path):
    bad = tmp_path / "model_weight.pth"
    data = Path(hallo4_release_file).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError):
        convert(bad, tmp_path / "out" / "hallo4", HALLO4_TINY_OVERRIDES)
    assert [p.name for p in tmp_path.iterdir()] == ["model_weight.pth"]
    # A failure after the temporary folder exists (a text encoder folder without a model) removes it.
    (tmp_path / "no-encoder").mkdir()
    with pytest.raises((OSError, ValueError)):
        convert(hallo4_release_file, tmp_path / "out", HALLO4_TINY_OVERRIDES, text_encoder=str(tmp_path / "no-encoder"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_weight.pth", "no-encoder"]


# --- 5. refusals ---------------------------------------------------------------------------------------------------
def _plain_wan(tmp_path):
    state = {k: v for k, v in hallo4_state_dict(HALLO4_TINY).items()
             if not (k.startswith(("vace_", "audio_proj", "pose_proj")) or ".audio_cross_" in k
                     or ".condition_cross_" in k)}  # fmt: skip
    assert "blocks.0.self_attn.q.weight" in state and not any("vace" in k or "audio" in k for k in state)
    torch.save(state, tmp_path / "wan2.1.pth")
    return tmp_path / "wan2.1.pth", "vace_patch_embedding"


def _vace_without_audio(tmp_path):
    state = {k: v for k, v in hallo4_state_dict(HALLO4_TINY).items() if "audio_" not in k}
    assert "vace_patch_embedding.weight" in state and "pose_proj.proj.weight" in state
    torch.save(state, tmp_path / "vace.pth")
    return tmp_path / "vace.pth", "audio_proj"


def _diffusers_layout(tmp_path, wan_dir):
    state = {}
    for shard in sorted(Path(wan_dir, "transformer").glob("*.safetensors")):
        state.update(load_file(str(shard)))
    assert "condition_embedder.text_embedder.linear_1.weight" in state
    save_file(state, str(tmp_path / "transformer.safetensors"))
    return tmp_path / "transformer.safetensors", "diffusers-layout"


def _truncated(tmp_path, release):
    data = Path(release).read_bytes()
    (tmp_path / "model_weight.pth").write_bytes(data[: len(data) // 2])
    return tmp_path / "model_weight.pth", "truncated"


def _corrupt_header(tmp_path, release):
    path = tmp_path / "model_weight.safetensors"
    save_file(torch.load(release, weights_only=True), str(path))
    data = bytearray(path.read_bytes())
    data[8:40] = b"!" * 32  # the JSON header
    path.write_bytes(bytes(data))
    return path, None


class RunsCode:
    """Unpickling this runs a shell command (what ``weights_only`` must refuse)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


REFUSALS = ["plain-wan2.1", "vace-without-audio", "diffusers-layout", "truncated-pth", "pickle-with-code",
            "corrupt-safetensors-header", "missing-file", "directory"]


@pytest.mark.parametrize("case", REFUSALS)
def test_files_that_are_not_a_hallo4_release_are_refused_naming_the_file(case, tmp_path, hallo4_release_file,
                                                                       wan_i2v_14b_dir):
    marker = tmp_path / "pwned"
    phrase = None
    if case == "plain-wan2.1":
        path, phrase = _plain_wan(tmp_path)
    elif case == "vace-without-audio":
        path, phrase = _vace_without_audio(tmp_path)
    elif case == "diffusers-layout":
        path, phrase = _diffusers_layout(tmp_path, wan_i2v_14b_dir)
    elif case == "truncated-pth":
        path, phrase = _truncated(tmp_path, hallo4_release_file)
    elif case == "pickle-with-code":
        path, phrase = tmp_path / "model_weight.pth", "refused"
        state = torch.load(hallo4_release_file, weights_only=True)
        state["patch_embedding.bias"] = RunsCode(marker)
        torch.save(state, path)
    elif case == "corrupt-safetensors-header":
        path, phrase = _corrupt_header(tmp_path, hallo4_release_file)
    elif case == "missing-file":
        path, phrase = tmp_path / "nowhere" / "model_weight.pth", "not found"
    else:
        path, phrase = tmp_path / "a-folder.pth", "a folder"
        path.mkdir()
    with pytest.raises(DataError) as error:
        load_released(path, HALLO4_TINY_OVERRIDES)
    assert str(path) in str(error.value)
    if phrase is not None:
        assert phrase in str(error.value)
    assert not marker.exists()  # no code of the file ran


def test_refusals_reach_the_denoiser_as_data_errors(tmp_path, wan_i2v_14b_dir, wav2vec2_base_960h_dir):
    path, _ = _vace_without_audio(tmp_path)
    with pytest.raises(DataError) as error:
        tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, checkpoint=str(path), overrides=HALLO4_TINY_OVERRIDES)
    assert str(path) in str(error.value)


# --- 6. LoRA -------------------------------------------------------------------------------------------------------
def test_lora_adapts_the_default_targets_and_the_reference_is_the_loaded_model(
    hallo4_dir, wan_i2v_14b_dir, wav2vec2_base_960h_dir, plain, plain_cond
):
    from prefalign.lora import LoraSettings
    from prefalign.module import AlignmentModule
    from prefalign.processes import FlowMatching

    torch.manual_seed(0)
    denoiser = tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, pretrained=hallo4_dir)
    module = AlignmentModule(denoiser, FlowMatching(), lora=LoraSettings(rank=4))
    adapted = {name for name, m in module.denoiser.backbone.named_modules() if hasattr(m, "lora_A")}
    for name in ("hallo4.blocks.0.audio_cross_attn.q", "hallo4.blocks.3.condition_cross_attn.o",
                 "vace_blocks.0.attn1.to_q", "blocks.2.ffn.net.0.proj", "vace_blocks.1.ffn.net.2"):
        assert name in adapted, name
    for target in Hallo4Denoiser.default_lora_targets:
        assert any(name.endswith(target) for name in adapted), target
    # 4 main blocks × 6 + 2 VACE blocks × 6 + 4 × 8 Hallo4 projections; not the text cross-attention.
    assert len(adapted) == 4 * 6 + 2 * 6 + 4 * 8
    assert not any(".attn2." in name for name in adapted)
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)

    g = torch.Generator().manual_seed(3)
    for name, param in module.named_parameters():
        if "lora_B" in name:
            param.data = 0.1 * torch.randn(param.shape, generator=g)
    x, t = fixed_inputs(plain)
    with torch.no_grad():
        want = plain(x, t, plain_cond)
        adapted_pred = module.denoiser(x, t, plain_cond)
        with module.reference() as ref:
            reference_pred = ref(x, t, plain_cond)
        again = module.denoiser(x, t, plain_cond)  # adapters back on after the reference
    assert (adapted_pred - want).abs().max() > 1e-3
    assert torch.equal(reference_pred, want)
    assert torch.equal(again, adapted_pred)


def test_gradient_checkpointing_keeps_the_prediction_and_the_gradients(
    hallo4_dir, wan_i2v_14b_dir, wav2vec2_base_960h_dir, plain_cond, monkeypatch
):
    """The blocks are recomputed in backward with their speech and skeleton tokens (the hooks' inputs)."""
    import torch.utils.checkpoint

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(args[2])  # (run, block, speech tokens, motion tokens, ...)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    whole = tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, pretrained=hallo4_dir).train()
    recomputed = tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, pretrained=hallo4_dir,
                             gradient_checkpointing=True).train()
    x, t = fixed_inputs(whole)
    a, b = whole(x, t, plain_cond), recomputed(x, t, plain_cond)
    assert len(calls) == 4 + 2  # every main and VACE block of the checkpointed model, none of the other
    assert all(tokens is not None for tokens in calls)  # each carried its speech tokens
    assert torch.equal(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    grads = dict(whole.backbone.named_parameters())
    for name, param in recomputed.backbone.named_parameters():
        assert param.grad is not None and torch.equal(param.grad, grads[name].grad), name
    assert recomputed.backbone.hallo4.blocks[2].audio_cross_attn.q.weight.grad.abs().sum() > 0
    assert recomputed.backbone.hallo4.blocks[2].condition_cross_attn.q.weight.grad.abs().sum() > 0


# --- 7. one DPO and one GRPO step through Lightning -----------------------------------------------------------------
def _fit_one_step(module, train, num_frames):
    from prefalign.data.datamodule import PortraitDataModule

    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    recorder = Recorder()
    trainer = quiet_trainer(max_steps=1, callbacks=[recorder])
    trainer.fit(module, datamodule=PortraitDataModule(train=str(train), batch_size=2, num_frames=num_frames,
                                                      val_fraction=0.0))
    assert trainer.global_step == 1
    moved = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    return recorder.rows, moved


def test_one_dpo_step_on_pairs_trains_the_adapters(hallo4_dir, wan_i2v_14b_dir, wav2vec2_base_960h_dir, tmp_path):
    from prefalign.algorithms.dpo import DiffusionDPO
    from prefalign.data.synthetic import write_dataset
    from prefalign.lora import LoraSettings
    from prefalign.module import AlignmentModule
    from prefalign.processes import FlowMatching

    pairs = write_dataset(tmp_path, num_clips=4, seed=5, rejected=("shift",))
    torch.manual_seed(0)
    denoiser = tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, pretrained=hallo4_dir)
    module = AlignmentModule(denoiser, FlowMatching(), algorithm=DiffusionDPO(beta=500.0), lora=LoraSettings(rank=4))
    rows, moved = _fit_one_step(module, pairs, FRAMES)
    loss = rows[0]["train/loss"]
    assert math.isfinite(loss)
    assert abs(loss - math.log(2)) < 1e-5  # the policy is the reference at the first step (LoRA B = 0)
    assert math.isfinite(rows[0]["train/error_win"]) and math.isfinite(rows[0]["train/error_lose"])
    assert any("lora_B" in n for n in moved)
    assert any("hallo4.blocks" in n and "lora_B" in n for n in moved)  # the speech/skeleton attentions train too


def test_one_grpo_step_trains_the_adapters(hallo4_dir, wan_i2v_14b_dir, wav2vec2_base_960h_dir, talkingshapes):
    from prefalign.algorithms.grpo import GRPO
    from prefalign.lora import LoraSettings
    from prefalign.module import AlignmentModule
    from prefalign.processes import FlowMatching
    from prefalign.rewards import SyncExpert

    torch.manual_seed(0)
    denoiser = tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, pretrained=hallo4_dir)
    grpo = GRPO(SyncExpert(), group_size=2, num_steps=2, train_fraction=1.0)
    module = AlignmentModule(denoiser, FlowMatching(), algorithm=grpo, lora=LoraSettings(rank=4))
    rows, moved = _fit_one_step(module, talkingshapes, FRAMES)
    row = rows[0]
    assert math.isfinite(row["train/policy_loss"]) and math.isfinite(row["train/reward"])
    assert row["train/trained_steps"] == 2 and row["train/ratio"] == 1.0
    assert any("lora_B" in n for n in moved)


# --- 8. the skeleton -------------------------------------------------------------------------------------------------
def test_whole_body_skeleton_draws_openpose_limb_colours_on_black():
    height, width = 64, 128
    pose = torch.empty(1, 1, 133, 2)
    pose[..., :] = torch.tensor([64.5 / width, 56.5 / height])  # every point not placed below: under the neck
    pose[0, 0, 6] = torch.tensor([40.5 / width, 32.5 / height])  # COCO 6, the right shoulder
    pose[0, 0, 5] = torch.tensor([88.5 / width, 32.5 / height])  # COCO 5, the left shoulder: the neck is at x 64.5
    frame = render_skeleton(pose, height, width)[0, 0]
    assert frame.shape == (3, height, width)

    def colour(row, column):
        return frame[:, row, column]

    dim = lambda rgb: torch.tensor([int(c * 0.6) for c in rgb], dtype=torch.float32) / 255  # noqa: E731
    full = lambda rgb: torch.tensor(rgb, dtype=torch.float32) / 255  # noqa: E731
    torch.testing.assert_close(colour(32, 52), torch.tensor([153.0, 0.0, 0.0]) / 255)  # neck → right shoulder
    torch.testing.assert_close(colour(32, 52), dim(OPENPOSE_COLORS[0]))
    torch.testing.assert_close(colour(32, 76), dim(OPENPOSE_COLORS[1]))  # neck → left shoulder: (153, 51, 0)
    torch.testing.assert_close(colour(32, 64), full(OPENPOSE_COLORS[1]))  # the neck's joint, at full colour
    torch.testing.assert_close(colour(32, 40), full(OPENPOSE_COLORS[2]))  # the right shoulder's joint
    assert frame[:, :28].abs().sum() == 0  # above the shoulders: black
    assert frame[:, :, :36].abs().sum() == 0 and frame[:, :, 93:].abs().sum() == 0
    assert ((frame > 0).any(0)).float().mean() < 0.1


def test_other_keypoint_counts_draw_one_dot_per_keypoint_and_nothing_outside_the_frame():
    import colorsys

    size = 64
    centres = [(8 + 16 * (i % 4), 16 + 32 * (i // 4)) for i in range(8)]  # pixel columns, rows
    pose = torch.tensor([[(c + 0.5) / size, (r + 0.5) / size] for c, r in centres])[None, None]
    frame = render_skeleton(pose, size, size)[0, 0]
    colours = [torch.tensor([int(255 * c) for c in colorsys.hsv_to_rgb(i / 8, 1.0, 1.0)]) / 255 for i in range(8)]
    assert len({tuple(c.tolist()) for c in colours}) == 8
    drawn = frame.flatten(1).T  # [pixels, 3]
    lit = drawn[(drawn > 0).any(1)]
    assert {tuple(c) for c in lit.tolist()} == {tuple(c.tolist()) for c in colours}  # 8 distinct colours, no other
    rows, columns = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for (column, row), rgb in zip(centres, colours):
        torch.testing.assert_close(frame[:, row, column], rgb)
        where = (frame == rgb[:, None, None]).all(0)
        distance = ((rows[where] - row) ** 2 + (columns[where] - column) ** 2).float().sqrt()
        assert distance.max() <= 2  # a dot around its keypoint only

    outside = pose.clone()
    outside[0, 0, 3] = torch.tensor([1.4, -0.3])
    frame = render_skeleton(outside, size, size)[0, 0]
    lit = {tuple(c) for c in frame.flatten(1).T.tolist() if any(c)}
    assert lit == {tuple(c.tolist()) for i, c in enumerate(colours) if i != 3}
    alone = render_skeleton(torch.tensor([[[[1.3, 0.5]], [[-0.2, 1.2]]]]), size, size)
    assert alone.shape == (1, 2, 3, size, size) and alone.abs().sum() == 0


def test_condition_encodes_each_rendered_skeleton_frame_alone(plain, plain_cond, batch):
    pose = plain_cond["pose"]
    assert pose.shape == (2, 16, FRAMES, 4, 4)
    frames = render_skeleton(batch["pose"], 32, 32)
    with torch.no_grad():
        alone = torch.stack([torch.cat([plain.codec.encode(frames[b, t][None, None]) for t in range(FRAMES)], dim=2)[0]
                             for b in range(2)])
    torch.testing.assert_close(pose, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pose[:, :, 0], pose[:, :, 8])  # the skeleton moves
    # The other conditions: the reference latent, VACE context (1 + 5 latent frames), speech per video frame.
    assert plain_cond["reference"].shape == (2, 16, 1, 4, 4) and plain_cond["vace"].shape == (2, 96, 6, 4, 4)
    assert plain_cond["audio"].shape == (2, FRAMES, 2, 32)


def test_without_pose_the_skeleton_is_the_black_frames_latent(hallo4_dir, wan_i2v_14b_dir, wav2vec2_base_960h_dir,
                                                              batch):
    denoiser = tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, pretrained=hallo4_dir, pose_keypoints=None)
    assert "pose" not in denoiser.required_fields
    without = {k: v for k, v in batch.items() if k != "pose"}
    with torch.no_grad():
        cond = denoiser.condition(without)
        black = denoiser.codec.encode(torch.zeros(1, 1, 3, 32, 32))
    assert cond["pose"].shape == (2, 16, FRAMES, 4, 4)
    assert torch.equal(cond["pose"], black.expand(2, -1, FRAMES, -1, -1))
    # The skeleton-conditioned denoiser refuses a batch without pose.
    with pytest.raises(DataError, match="pose"):
        tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, pretrained=hallo4_dir).condition(without)


# --- 9. speech ------------------------------------------------------------------------------------------------------
def process_audio_emb(audio_emb: torch.Tensor) -> torch.Tensor:
    """Hallo4's rule for one clip ``[T, ...]``: frame i's window is frames i-2..i+2, clamped to the clip."""
    windows = []
    for i in range(audio_emb.shape[0]):
        windows.append(torch.stack([audio_emb[max(min(i + j, audio_emb.shape[0] - 1), 0)] for j in range(-2, 3)]))
    return torch.stack(windows)


def test_speech_windows_follow_hallo4s_process_audio_emb():
    features = torch.randn(3, 7, 2, 4)
    windows = speech_windows(features, 5)
    assert windows.shape == (3, 7, 5, 2, 4)
    for b in range(3):
        assert torch.equal(windows[b], process_audio_emb(features[b]))
    assert torch.equal(windows[0, 0, :3], features[0, :1].expand(3, -1, -1))  # the first frame repeated
    assert torch.equal(windows[0, 6, 2:], features[0, 6:].expand(3, -1, -1))  # the last frame repeated
    one = speech_windows(features[:, :1], 5)
    assert torch.equal(one, features[:, :1, None].expand(-1, -1, 5, -1, -1))


def test_features_rate_wav2vec2_interpolates_the_cnn_features_to_the_frames(wav2vec2_base_960h_dir):
    torch.manual_seed(0)
    encoder = Wav2Vec2AudioEncoder(pretrained=wav2vec2_base_960h_dir, resample="features").eval()
    assert encoder.num_levels == 3
    frames, fps = 13, 25.0
    audio = torch.randn(2, 13 * 640 + 500)  # longer than the clip: cropped to its 13 frames
    got = encoder(audio, frames, fps)
    assert got.shape == (2, frames, 3, 32)

    model = encoder.model
    clip = audio[:, : frames * 640]
    clip = (clip - clip.mean(-1, keepdim=True)) / torch.sqrt(clip.var(-1, keepdim=True, unbiased=False) + 1e-7)
    with torch.no_grad():
        features = model.feature_extractor(clip)  # [B, C, 50 Hz]
        assert features.shape[-1] == (frames * 640 - 400) // 320 + 1
        features = F.interpolate(features, size=frames, mode="linear", align_corners=True).transpose(1, 2)
        hidden, _ = model.feature_projection(features)
        hidden = model.encoder.layer_norm(hidden + model.encoder.pos_conv_embed(hidden))
        levels = [hidden]
        for layer in model.encoder.layers:
            hidden = layer(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            levels.append(hidden)
    want = torch.stack(levels, dim=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    chosen = Wav2Vec2AudioEncoder(pretrained=wav2vec2_base_960h_dir, layers=[1, 2], resample="features").eval()
    torch.testing.assert_close(chosen(audio, frames, fps), want[:, :, 1:], rtol=1e-5, atol=1e-5)


# --- 10. classifier-free guidance ---------------------------------------------------------------------------------
def test_dropped_samples_get_no_speech_and_the_negative_prompt(hallo4_dir, plain, plain_cond):
    stored = load_file(os.path.join(hallo4_dir, MODULES_FOLDER, TEXT_FILE))
    assert stored["prompt"].shape == (6, 32) and stored["negative"].shape == (11, 32)
    prompt, negative = padded(stored["prompt"], 16), padded(stored["negative"], 16)
    assert torch.equal(plain.text[0], prompt) and torch.equal(plain.negative_text[0], negative)

    keep = torch.tensor([True, False])
    out = plain.drop_conditions(plain_cond, keep)
    assert torch.equal(out["audio"][0], plain_cond["audio"][0])
    assert torch.equal(out["audio"][1], torch.zeros_like(plain_cond["audio"][1]))
    assert out["text"].shape == (2, 16, 32)
    assert torch.equal(out["text"][0], prompt) and torch.equal(out["text"][1], negative)
    for key in ("reference", "vace", "pose"):  # structural conditions stay
        assert torch.equal(out[key], plain_cond[key])
    everything = plain.drop_conditions(plain_cond, torch.tensor([False, False]))
    assert torch.equal(everything["text"], negative.expand(2, -1, -1)) and not everything["audio"].any()
    nothing = plain.drop_conditions(plain_cond, torch.tensor([True, True]))
    assert torch.equal(nothing["text"], prompt.expand(2, -1, -1))
    assert torch.equal(nothing["audio"], plain_cond["audio"])
    # The unconditional prediction is another one, and a dropped sample's does not depend on its speech.
    x, t = fixed_inputs(plain)
    with torch.no_grad():
        conditional = plain(x, t, plain_cond)
        unconditional = plain(x, t, out)
        noisy_speech = plain(x, t, plain.drop_conditions({**plain_cond, "audio": torch.randn_like(plain_cond["audio"])},
                                                         keep))
    assert torch.equal(unconditional[0], conditional[0])
    assert not torch.allclose(unconditional[1], conditional[1])
    assert torch.equal(noisy_speech[1], unconditional[1])


# --- 11. text embeddings -----------------------------------------------------------------------------------------
def _text_case(case, path):
    if case == "no-prompt":
        save_file({"negative": torch.zeros(3, 32)}, str(path))
        return "prompt"
    if case == "wrong-width":
        save_file({"prompt": torch.zeros(3, 31)}, str(path))
        return "(3, 31)"
    if case == "three-dimensional":
        save_file({"prompt": torch.zeros(1, 3, 32)}, str(path))
        return "prompt"
    if case == "more-tokens-than-text_len":
        save_file({"prompt": torch.zeros(5, 32), "negative": torch.zeros(17, 32)}, str(path))
        return "negative"
    if case == "oversized":
        save_file({"prompt": torch.zeros(3, 32), "padding": torch.zeros(300_000)}, str(path))
        return "larger"
    if case == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
        return "cannot read"
    return "not found"  # missing


@pytest.mark.parametrize("case", ["no-prompt", "wrong-width", "three-dimensional", "more-tokens-than-text_len",
                                  "oversized", "corrupt", "missing"])
def test_bad_text_embedding_files_are_refused_naming_the_file(case, tmp_path):
    path = tmp_path / "text_embedding.safetensors"
    phrase = _text_case(case, path)
    with pytest.raises(DataError) as error:
        read_text_embedding(path, text_dim=32, text_len=16)
    assert str(path) in str(error.value) and phrase in str(error.value)


def test_a_good_text_embedding_file_is_read(tmp_path):
    path = tmp_path / "text_embedding.safetensors"
    prompt = torch.randn(16, 32, dtype=torch.bfloat16)
    save_file({"prompt": prompt}, str(path))
    got, negative = read_text_embedding(path, text_dim=32, text_len=16)
    assert got.dtype == torch.float32 and torch.equal(got, prompt.float())
    assert negative.shape == (0, 32)  # no negative: an empty context (zeros once padded)


def test_embed_prompts_gives_one_embedding_per_prompt_trimmed_to_its_tokens(umt5_dir):
    from transformers import AutoTokenizer, UMT5EncoderModel

    prompts = ["a person is talking", "talking", "a person is talking in a quiet room"]
    out = embed_prompts(umt5_dir, prompts, text_len=16)
    assert [tuple(e.shape) for e in out] == [(5, 32), (2, 32), (9, 32)]  # the words and </s>
    assert all(e.dtype == torch.float32 and torch.isfinite(e).all() for e in out)
    tokenizer = AutoTokenizer.from_pretrained(umt5_dir, subfolder="tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(umt5_dir, subfolder="text_encoder").eval()
    tokens = tokenizer(prompts[0], return_tensors="pt")
    with torch.no_grad():
        alone = encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state[0]
    torch.testing.assert_close(out[0], alone, rtol=1e-5, atol=1e-5)  # the padding changes nothing
    torch.testing.assert_close(embed_prompts(umt5_dir, prompts[:1], text_len=8)[0], out[0], rtol=1e-5, atol=1e-5)
    assert embed_prompts(umt5_dir, prompts[2:], text_len=4)[0].shape == (4, 32)  # truncated to text_len


def test_text_encoder_embeds_the_prompts_at_load_and_in_the_converted_folder(
    umt5_dir, hallo4_release_file, wan_i2v_14b_dir, wav2vec2_base_960h_dir, tmp_path
):
    prompt, negative = embed_prompts(umt5_dir, ["a person is talking", WAN_NEGATIVE_PROMPT], 16)
    denoiser = tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, checkpoint=hallo4_release_file,
                           overrides=HALLO4_TINY_OVERRIDES, text_encoder=umt5_dir)
    assert torch.equal(denoiser.text[0], padded(prompt, 16))
    assert torch.equal(denoiser.negative_text[0], padded(negative, 16))
    out = convert(hallo4_release_file, tmp_path / "converted", HALLO4_TINY_OVERRIDES, text_encoder=umt5_dir)
    stored = load_file(str(out / MODULES_FOLDER / TEXT_FILE))
    assert torch.equal(stored["prompt"], prompt) and torch.equal(stored["negative"], negative)
    loaded = tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, pretrained=str(out))
    assert torch.equal(loaded.text, denoiser.text) and torch.equal(loaded.negative_text, denoiser.negative_text)


def test_a_text_encoder_overrides_the_converted_folders_text(umt5_dir, hallo4_dir, wan_i2v_14b_dir,
                                                             wav2vec2_base_960h_dir):
    prompt = embed_prompts(umt5_dir, ["a person is talking"], 16)[0]
    denoiser = tiny_hallo4(wan_i2v_14b_dir, wav2vec2_base_960h_dir, pretrained=hallo4_dir, text_encoder=umt5_dir)
    assert torch.equal(denoiser.text[0], padded(prompt, 16))
