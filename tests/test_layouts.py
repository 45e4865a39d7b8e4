"""The real checkpoints' on-disk layouts (tests/layouts.py) through prefalign's own loaders, configured as the real
recipes configure them (recipes/sft_wan_i2v.yaml, recipes/sft_svd.yaml): sharded float32 Wan I2V weights loaded in
bfloat16, SVD's fp16 variant, the 2021 wav2vec2-base-960h safetensors with its old weight-norm names."""

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from layouts import SVD_UNET, SVD_VAE, WAN_I2V_TRANSFORMER, WAN_VAE, WAV2VEC2_BASE_960H
from prefalign.denoisers import SVDDenoiser, SVDVAECodec, WanDenoiser, WanVAECodec, Wav2Vec2AudioEncoder

FRAMES, FPS, SR, SIZE, KEYPOINTS = 5, 25, 16000, 32, 133  # 133: DWPose whole-body, as the recipes
SHARD = re.compile(r"diffusion_pytorch_model-(\d{5})-of-(\d{5})\.safetensors")


def stored_dtypes(path: Path) -> set[str]:
    """The dtypes a safetensors file stores, as its header names them (F32, F16, BF16)."""
    with safe_open(path, framework="pt") as f:
        return {f.get_slice(key).get_dtype() for key in f.keys()}


def config(path: Path) -> dict:
    return json.loads(path.read_text())


def clip_batch(b: int = 2) -> dict:
    """Fields as the data module gives them: video [B,T,3,H,W], audio [B,S] at 16 kHz, reference, pose [B,T,K,2]."""
    g = torch.Generator().manual_seed(0)
    return {
        "video": torch.rand(b, FRAMES, 3, SIZE, SIZE, generator=g),
        "audio": 0.3 * torch.randn(b, FRAMES * SR // FPS, generator=g),
        "reference": torch.rand(b, 3, SIZE, SIZE, generator=g),
        "pose": torch.rand(b, FRAMES, KEYPOINTS, 2, generator=g),
    }


def recipe_options(pretrained: str, audio: str) -> dict:
    """The conditioning options both real recipes pass (audio_heads scaled to the tiny widths: 40 and 8 there)."""
    return {
        "audio_encoder": Wav2Vec2AudioEncoder(pretrained=audio),
        "pretrained": pretrained,
        "torch_dtype": "bfloat16",
        "pooled_audio_token": True,
        "audio_window": 5,
        "audio_heads": 2,
        "pose_keypoints": KEYPOINTS,
        "gradient_checkpointing": True,
    }


def predict_and_backward(denoiser, batch: dict) -> torch.Tensor:
    """One training-style step as under the recipes' ``precision: bf16-mixed`` (Lightning's bfloat16 autocast)."""
    torch.manual_seed(0)
    x0 = denoiser.encode_video(batch["video"])
    cond = denoiser.condition(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = denoiser(torch.randn_like(x0), torch.full((x0.shape[0],), 500.0), cond)
    assert pred.shape == x0.shape and torch.isfinite(pred).all()
    pred.float().pow(2).mean().backward()
    # The new modules are float32 over the bfloat16 base, and backward reaches them through the checkpointed blocks.
    for param in (denoiser.motion.proj.weight, denoiser.audio_conditioning.attn[-1].to_out.weight):
        assert param.dtype == torch.float32 and param.grad.abs().sum() > 0
    return x0


# --- Wan2.1 I2V 14B 480P ------------------------------------------------------------------------------------------
def test_wan_i2v_14b_files_are_the_real_layout(wan_i2v_14b_dir):
    root = Path(wan_i2v_14b_dir)
    index = config(root / "model_index.json")
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert set(index) - {"_class_name", "_diffusers_version"} == {
        "image_encoder", "image_processor", "scheduler", "text_encoder", "tokenizer", "transformer", "vae",
    }  # fmt: skip

    transformer = root / "transformer"
    shards = sorted(p.name for p in transformer.glob("*.safetensors"))
    assert len(shards) >= 2 and all(SHARD.fullmatch(name) for name in shards), shards
    assert {SHARD.fullmatch(name)[2] for name in shards} == {f"{len(shards):05d}"}
    weight_map = config(transformer / "diffusion_pytorch_model.safetensors.index.json")["weight_map"]
    assert set(weight_map.values()) == set(shards)
    assert not (transformer / "diffusion_pytorch_model.safetensors").exists()
    assert set().union(*(stored_dtypes(transformer / name) for name in shards)) == {"F32"}
    cfg = config(transformer / "config.json")
    assert set(cfg) == {"_class_name", "_diffusers_version", *WAN_I2V_TRANSFORMER}
    assert cfg["in_channels"] == 2 * WAN_VAE["z_dim"] + 4 and cfg["patch_size"] == [1, 2, 2]

    vae = root / "vae"
    assert sorted(p.name for p in vae.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert stored_dtypes(vae / "diffusion_pytorch_model.safetensors") == {"F32"}
    cfg = config(vae / "config.json")
    assert set(cfg) == {"_class_name", "_diffusers_version", *WAN_VAE} and "scale_factor_temporal" not in cfg
    assert len(cfg["latents_mean"]) == len(cfg["latents_std"]) == cfg["z_dim"] == 16


def test_wan_denoiser_loads_the_i2v_checkpoint_as_the_recipe(wan_i2v_14b_dir, wav2vec2_base_960h_dir):
    from diffusers import WanTransformer3DModel

    codec = WanVAECodec(pretrained=wan_i2v_14b_dir, subfolder="vae", torch_dtype="bfloat16")
    assert (codec.temporal_ratio, codec.spatial_ratio, codec.latent_channels) == (4, 8, 16)
    options = recipe_options(wan_i2v_14b_dir, wav2vec2_base_960h_dir)
    denoiser = WanDenoiser(codec=codec, subfolder="transformer", **options)
    assert denoiser.layout == "i2v" and not denoiser.widened
    assert tuple(denoiser.text.shape) == (1, 512, 16) and tuple(denoiser.image_context.shape) == (1, 257, 24)

    # torch_dtype=bfloat16 on float32 weights: diffusers keeps WanTransformer3DModel._keep_in_fp32_modules (matched on
    # a whole name component) in float32; the VAE has none.
    keep = WanTransformer3DModel._keep_in_fp32_modules
    dtypes = {name: p.dtype for name, p in denoiser.backbone.named_parameters()}
    print("Wan transformer parameter dtypes:", dict(Counter(str(d) for d in dtypes.values())))
    for name, dtype in dtypes.items():
        assert dtype == (torch.float32 if set(name.split(".")) & set(keep) else torch.bfloat16), name
    assert {p.dtype for p in codec.parameters()} == {torch.bfloat16}

    x0 = predict_and_backward(denoiser, clip_batch())
    assert x0.shape == (2, 16, 2, 4, 4)  # 5 frames of 32x32 → 2 latent frames of 4x4


# --- Stable Video Diffusion img2vid-xt -----------------------------------------------------------------------------
def test_svd_xt_files_are_the_real_layout(svd_xt_dir):
    root = Path(svd_xt_dir)
    assert config(root / "model_index.json")["_class_name"] == "StableVideoDiffusionPipeline"
    assert config(root / "scheduler" / "scheduler_config.json")["prediction_type"] == "v_prediction"
    for name, keys in (("unet", SVD_UNET), ("vae", SVD_VAE)):
        folder = root / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "config.json", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors",
        ]  # fmt: skip
        cfg = config(folder / "config.json")
        assert set(cfg) == {"_class_name", "_diffusers_version", "_name_or_path", *keys}
        assert cfg["_diffusers_version"] == "0.24.0.dev0"
        full = load_file(folder / "diffusion_pytorch_model.safetensors")
        half = load_file(folder / "diffusion_pytorch_model.fp16.safetensors")
        assert {t.dtype for t in full.values()} == {torch.float32}
        assert {t.dtype for t in half.values()} == {torch.float16}
        assert full.keys() == half.keys() and all(torch.equal(full[k].half(), half[k]) for k in full)


def test_svd_denoiser_loads_the_fp16_variant_as_the_recipe(svd_xt_dir, wav2vec2_base_960h_dir):
    codec = SVDVAECodec(pretrained=svd_xt_dir, subfolder="vae", torch_dtype="bfloat16")
    assert (codec.temporal_ratio, codec.spatial_ratio, codec.latent_channels) == (1, 8, 4)
    options = recipe_options(svd_xt_dir, wav2vec2_base_960h_dir)
    denoiser = SVDDenoiser(codec=codec, subfolder="unet", variant="fp16", **options)
    # The weights are the fp16 file's, in bfloat16: not the float32 file's (the two roundings differ on most tensors).
    loaded = denoiser.backbone.state_dict()
    half = load_file(Path(svd_xt_dir) / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    full = load_file(Path(svd_xt_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(loaded[k], half[k].to(torch.bfloat16)) for k in half)
    assert not all(torch.equal(loaded[k], full[k].to(torch.bfloat16)) for k in full)
    print("SVD UNet parameter dtypes:", dict(Counter(str(p.dtype) for p in denoiser.backbone.parameters())))

    x0 = predict_and_backward(denoiser, clip_batch())
    assert x0.shape == (2, 4, FRAMES, 4, 4)  # per-frame VAE: 5 latent frames of 4x4


# --- wav2vec2-base-960h ---------------------------------------------------------------------------------------------
def test_wav2vec2_base_960h_files_are_the_real_layout(wav2vec2_base_960h_dir):
    root = Path(wav2vec2_base_960h_dir)
    assert sorted(p.name for p in root.iterdir()) == [
        "config.json", "feature_extractor_config.json", "model.safetensors", "preprocessor_config.json",
        "special_tokens_map.json", "tokenizer_config.json", "vocab.json",
    ]  # fmt: skip
    assert config(root / "config.json") == WAV2VEC2_BASE_960H
    weights = load_file(root / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert {"wav2vec2.encoder.pos_conv_embed.conv.weight_g", "lm_head.weight"} <= weights.keys()
    assert "wav2vec2.masked_spec_embed" not in weights and not any("parametrizations" in k for k in weights)


def test_wav2vec2_audio_encoder_loads_the_960h_checkpoint(wav2vec2_base_960h_dir):
    from transformers import Wav2Vec2Processor

    encoder = Wav2Vec2AudioEncoder(pretrained=wav2vec2_base_960h_dir)
    # The old weight-norm names are loaded, not left at a fresh initialisation.
    weights = load_file(Path(wav2vec2_base_960h_dir) / "model.safetensors")
    conv = encoder.model.encoder.pos_conv_embed.conv
    loaded = {name: p for name, p in conv.named_parameters()}
    for index, old in enumerate(("weight_g", "weight_v")):
        saved = weights[f"wav2vec2.encoder.pos_conv_embed.conv.{old}"]
        torch.testing.assert_close(loaded[f"parametrizations.weight.original{index}"], saved, rtol=0, atol=0)
    # The real CNN: a 320-sample hop over a 400-sample field, 49 features for one second at 16 kHz (~50 Hz).
    assert (encoder.stride, encoder.receptive_field, encoder.num_levels, encoder.feature_dim) == (320, 400, 3, 32)
    with torch.no_grad():
        assert encoder.model(torch.randn(1, SR)).last_hidden_state.shape == (1, 49, 32)
    assert encoder.model.config.layerdrop == 0.0 and not encoder.model.config.apply_spec_augment
    feats = encoder(clip_batch()["audio"], FRAMES, FPS)
    assert feats.shape == (2, FRAMES, 3, 32) and torch.isfinite(feats).all()

    processor = Wav2Vec2Processor.from_pretrained(wav2vec2_base_960h_dir)
    assert processor.feature_extractor.sampling_rate == SR and processor.feature_extractor.do_normalize
    assert processor.tokenizer.decode([11, 5, 15, 15, 8]) == "HELO"  # CTC decoding merges repeats

