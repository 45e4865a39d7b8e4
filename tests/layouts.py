"""Tiny checkpoints in the exact on-disk layout of the real ones, so that prefalign's real ``from_pretrained`` paths
run on them as they run on a user's download (file names, shards, variants, config keys, stored dtypes).

- ``wan_i2v_14b``: ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers``. ``model_index.json`` (``WanImageToVideoPipeline``, its
  seven components); ``transformer/``: the I2V config's keys as the Hub file has them (diffusers 0.33.0.dev0, no
  ``pos_embed_seq_len``), ``in_channels = 2·z_dim + 4 = 36``, weights stored in float32 and sharded
  (``diffusion_pytorch_model-0000k-of-0000N.safetensors`` + ``.index.json``; the real repo has 14 shards);
  ``vae/``: ``AutoencoderKLWan`` with the real ``z_dim``, ``latents_mean``/``latents_std``, strides (the config has
  no ``scale_factor_*`` keys, as the Hub file), float32, one file; ``scheduler/``: a ``UniPCMultistepScheduler``
  stand-in. Not written: ``text_encoder``, ``tokenizer``, ``image_encoder``, ``image_processor`` (prefalign loads
  only ``transformer`` and ``vae``), so a whole-pipeline ``DiffusionPipeline.from_pretrained`` would not load it.
- ``svd_xt``: ``stabilityai/stable-video-diffusion-img2vid-xt``. ``model_index.json`` and
  ``scheduler/scheduler_config.json`` as on the Hub; ``unet/`` and ``vae/`` each with the old-style config (diffusers
  0.24.0.dev0, the real key set) and both ``diffusion_pytorch_model.safetensors`` (float32) and
  ``diffusion_pytorch_model.fp16.safetensors``. Not written: ``image_encoder``, ``feature_extractor`` and the
  original single-file ``svd_xt*.safetensors`` at the root.
- ``wav2vec2_base_960h``: ``facebook/wav2vec2-base-960h``. A ``Wav2Vec2ForCTC`` checkpoint: the 2021 config's keys
  (``feat_extract_norm: group``, the real CNN, so 50 features per second at 16 kHz), ``model.safetensors`` (float32)
  with the old weight-norm names of the positional convolution (``weight_g``/``weight_v``) and no
  ``masked_spec_embed``, as the Hub file holds them; ``preprocessor_config.json``, ``feature_extractor_config.json``,
  ``vocab.json``, ``tokenizer_config.json``, ``special_tokens_map.json``. Only safetensors (the real repo also has
  ``pytorch_model.bin`` and ``tf_model.h5``; prefalign must not need them).

- ``hallo4_release``: ``fudan-generative-ai/hallo4``'s ``hallo4/model_weight.pth``: one ``torch.save`` zip of a
  plain state dict with Hallo4's own key names (the original Wan layout: ``blocks.{i}.self_attn.q``, ``modulation``,
  ``vace_blocks.{j}.before_proj``, ``audio_proj.proj1``, ...; ``hallo4_state_dict`` lists every pattern and the
  line of their code it comes from, and ``tests/test_hallo4.py`` checks the list against the state dict their code
  makes). Stored in float32 (the release's dtype is not documented; the loader casts to the recipe's). Sized to
  the tiny Wan VAE (16 latent channels, spatial ratio 8: VACE takes 2·16 + 64 = 96 channels) and the tiny
  wav2vec2 (2 levels of 32). Not written: ``Wan2.1_Encoders/`` (prefalign takes Wan's VAE and umT5 from a diffusers
  folder) and ``audio_separator/``.

Each function writes into ``root`` and returns the path to pass as ``pretrained``; the session fixtures build each
layout once per test session, whichever test module imports them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# --- Wan2.1 I2V 14B 480P ------------------------------------------------------------------------------------------
#: The I2V transformer config (its keys exactly; real values: 40 heads × 128, ffn 13824, 40 layers, text_dim 4096,
#: freq_dim 256, image_dim 1280, added_kv_proj_dim 5120 = the model width).
WAN_I2V_TRANSFORMER = {
    "added_kv_proj_dim": 32,
    "attention_head_dim": 16,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 64,
    "freq_dim": 32,
    "image_dim": 24,
    "in_channels": 36,
    "num_attention_heads": 2,
    "num_layers": 2,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 16,
}
#: Wan2.1's VAE config keys; real values except base_dim (96) and num_res_blocks (2).
WAN_VAE = {
    "attn_scales": [],
    "base_dim": 8,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "latents_mean": [
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ],
    "latents_std": [
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916,
    ],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}  # fmt: skip
WAN_MODEL_INDEX = {
    "_class_name": "WanImageToVideoPipeline",
    "_diffusers_version": "0.33.0.dev0",
    "image_encoder": ["transformers", "CLIPVisionModel"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
#: Small enough that the tiny transformer (≈190 KB in float32) is written in several shards.
WAN_SHARD_SIZE = "64KB"

# --- Stable Video Diffusion img2vid-xt -----------------------------------------------------------------------------
SVD_CONVERTED_FROM = "/home/suraj_huggingface_co/.cache/huggingface/hub/models--diffusers--svd-xt/snapshots/"
SVD_SNAPSHOT = "9703ded20c957c340781ee710b75660826deb487"
#: The UNet config's keys (real: 4 blocks of 320..1280 channels, 2 layers each, heads 5..20, cross-attention 1024,
#: added time embedding 256 × 3 = 768). num_frames, sample_size and the 4+4 latent channels are the real values.
SVD_UNET = {
    "addition_time_embed_dim": 8,
    "block_out_channels": [32, 64],
    "cross_attention_dim": 16,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "in_channels": 8,
    "layers_per_block": 1,
    "num_attention_heads": [2, 4],
    "num_frames": 25,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 24,
    "sample_size": 96,
    "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
}
#: The VAE config's keys; four blocks as the real one (spatial ratio 8), 32 channels instead of 128..512.
SVD_VAE = {
    "block_out_channels": [32, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
SVD_MODEL_INDEX = {
    "_class_name": "StableVideoDiffusionPipeline",
    "_diffusers_version": "0.24.0.dev0",
    "_name_or_path": "diffusers/svd-xt",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
    "vae": ["diffusers", "AutoencoderKLTemporalDecoder"],
}
SVD_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "trained_betas": None,
    "use_karras_sigmas": True,
}

# --- wav2vec2-base-960h ---------------------------------------------------------------------------------------------
#: The 2021 config's keys; the real CNN (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2: a 400-sample field, a
#: 320-sample hop) and the real dropouts, at tiny widths (real: 512 CNN channels, 768 hidden, 12 layers × 12 heads,
#: 3072 intermediate, 128-wide positional convolution).
WAV2VEC2_BASE_960H = {
    "_name_or_path": "facebook/wav2vec2-base-960h",
    "activation_dropout": 0.1,
    "apply_spec_augment": True,
    "architectures": ["Wav2Vec2ForCTC"],
    "attention_dropout": 0.1,
    "bos_token_id": 1,
    "codevector_dim": 256,
    "contrastive_logits_temperature": 0.1,
    "conv_bias": False,
    "conv_dim": [16, 16, 16, 16, 16, 16, 16],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "ctc_loss_reduction": "sum",
    "ctc_zero_infinity": False,
    "diversity_loss_weight": 0.1,
    "do_stable_layer_norm": False,
    "eos_token_id": 2,
    "feat_extract_activation": "gelu",
    "feat_extract_dropout": 0.0,
    "feat_extract_norm": "group",
    "feat_proj_dropout": 0.1,
    "feat_quantizer_dropout": 0.0,
    "final_dropout": 0.1,
    "gradient_checkpointing": False,
    "hidden_act": "gelu",
    "hidden_dropout": 0.1,
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "layerdrop": 0.1,
    "mask_feature_length": 10,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_prob": 0.05,
    "model_type": "wav2vec2",
    "num_attention_heads": 2,
    "num_codevector_groups": 2,
    "num_codevectors_per_group": 320,
    "num_conv_pos_embedding_groups": 16,
    "num_conv_pos_embeddings": 16,
    "num_feat_extract_layers": 7,
    "num_hidden_layers": 2,
    "num_negatives": 100,
    "pad_token_id": 0,
    "proj_codevector_dim": 256,
    "transformers_version": "4.7.0.dev0",
    "vocab_size": 32,
}
WAV2VEC2_PREPROCESSOR = {
    "do_normalize": True,
    "feature_size": 1,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": False,
    "sampling_rate": 16000,
}
WAV2VEC2_VOCAB = {
    "<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "E": 5, "T": 6, "A": 7, "O": 8, "N": 9, "I": 10, "H": 11,
    "S": 12, "R": 13, "D": 14, "L": 15, "U": 16, "M": 17, "W": 18, "C": 19, "F": 20, "G": 21, "Y": 22, "P": 23,
    "B": 24, "V": 25, "K": 26, "'": 27, "X": 28, "J": 29, "Q": 30, "Z": 31,
}  # fmt: skip
WAV2VEC2_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
WAV2VEC2_TOKENIZER = {
    "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "do_lower_case": False,
    "return_attention_mask": False, "do_normalize": True,
}  # fmt: skip


# --- Hallo4 ---------------------------------------------------------------------------------------------------------
#: The tiny release's sizes (the real: dim 1536, 12 heads, ffn 8960, 30 layers, 15 VACE blocks, text 4096, freq 256,
#: speech MLP 5 × 12 × 768 → 512 → 32 tokens). heads, audio levels and audio width are what `overrides` must say.
HALLO4_TINY = {
    "dim": 32, "heads": 2, "ffn": 64, "layers": 4, "vace_blocks": 2, "in_channels": 16, "vace_channels": 96,
    "text_dim": 32, "freq_dim": 32, "out_channels": 16, "patch": (1, 2, 2), "audio_window": 5, "audio_levels": 2,
    "audio_dim": 32, "audio_hidden": 32, "audio_tokens": 4, "pose_channels": 16,
}  # fmt: skip
#: ``Hallo4Denoiser(overrides=...)`` for the tiny release (sizes its shapes cannot tell).
HALLO4_TINY_OVERRIDES = {"num_attention_heads": 2, "vace_layers": [0, 2], "text_len": 16, "audio_levels": 2,
                         "audio_dim": 32}  # fmt: skip


def hallo4_state_dict(sizes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with every key name and shape of Hallo4's ``VaceWanModel`` (audio and skeleton on), at
    ``sizes`` (``HALLO4_TINY``'s keys). Where each comes from in their code (fudan-generative-vision/hallo4,
    vace/models/wan/modules/):

    - wan_model.py ``WanModel.__init__``: ``patch_embedding`` (Conv3d in→dim, kernel = patch), ``text_embedding.{0,2}``
      (Linear text_dim→dim, GELU, Linear dim→dim), ``time_embedding.{0,2}`` (Linear freq_dim→dim, SiLU, Linear),
      ``time_projection.1`` (SiLU, Linear dim→6·dim), ``head`` (``Head``: ``head.head`` Linear dim→prod(patch)·out,
      ``head.modulation`` [1, 2, dim]; its ``norm`` has no weights). ``freqs`` is a plain attribute: not saved.
    - wan_model.py ``WanAttentionBlock``: ``modulation`` [1, 6, dim]; ``self_attn`` and ``cross_attn``
      (``WanSelfAttention``/``WanT2VCrossAttention``: ``q k v o`` Linear dim→dim, ``norm_q norm_k`` ``WanRMSNorm``
      weight [dim]); ``norm3`` (``cross_attn_norm=True``: affine LayerNorm); ``ffn.{0,2}`` (Linear dim→ffn, GELU,
      Linear ffn→dim); ``norm1``/``norm2`` have no weights. With ``enable_skeleton_cross_attn``:
      ``condition_cross_norm`` + ``condition_cross_attn``; with ``enable_aduio_cross_attn``: ``audio_cross_norm`` +
      ``audio_cross_attn`` (the same classes).
    - model.py ``VaceWanModel.__init__``: ``blocks`` (``BaseWanAttentionBlock``: the above, with both additions),
      ``vace_blocks`` (``VaceWanAttentionBlock``: a plain block, ``before_proj`` Linear dim→dim in block 0 only,
      ``after_proj`` Linear dim→dim in each), ``vace_patch_embedding`` (Conv3d vace_in→dim), ``pose_proj``
      (pose_proj.py ``PoseProjector``, ``patch_size_t=None``: ``proj`` Conv2d in→dim/4 kernel patch[1], ``norm``
      LayerNorm dim/4), ``audio_proj`` (audio_proj.py ``AudioProjModel``: ``proj1`` Linear window·levels·width→
      hidden, ``proj2`` hidden→hidden, ``proj3`` hidden→tokens·dim, ``norm`` LayerNorm dim).
    """
    g = torch.Generator().manual_seed(seed)
    z = sizes
    d, f, p = z["dim"], z["ffn"], tuple(z["patch"])
    shapes: dict[str, tuple] = {}

    def linear(name: str, fan_in: int, fan_out: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (fan_out, fan_in), (fan_out,)

    def norm(name: str, width: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (width,)
        if bias:
            shapes[f"{name}.bias"] = (width,)

    def attention(name: str) -> None:
        for part in "qkvo":
            linear(f"{name}.{part}", d, d)
        norm(f"{name}.norm_q", d, bias=False)
        norm(f"{name}.norm_k", d, bias=False)

    def block(name: str, extras: bool) -> None:
        shapes[f"{name}.modulation"] = (1, 6, d)
        attention(f"{name}.self_attn")
        attention(f"{name}.cross_attn")
        norm(f"{name}.norm3", d)
        linear(f"{name}.ffn.0", d, f)
        linear(f"{name}.ffn.2", f, d)
        if extras:
            norm(f"{name}.condition_cross_norm", d)
            attention(f"{name}.condition_cross_attn")
            norm(f"{name}.audio_cross_norm", d)
            attention(f"{name}.audio_cross_attn")

    shapes["patch_embedding.weight"], shapes["patch_embedding.bias"] = (d, z["in_channels"], *p), (d,)
    linear("text_embedding.0", z["text_dim"], d)
    linear("text_embedding.2", d, d)
    linear("time_embedding.0", z["freq_dim"], d)
    linear("time_embedding.2", d, d)
    linear("time_projection.1", d, 6 * d)
    for i in range(z["layers"]):
        block(f"blocks.{i}", extras=True)
    linear("head.head", d, z["out_channels"] * p[0] * p[1] * p[2])
    shapes["head.modulation"] = (1, 2, d)
    for j in range(z["vace_blocks"]):
        block(f"vace_blocks.{j}", extras=False)
        if j == 0:
            linear(f"vace_blocks.{j}.before_proj", d, d)
        linear(f"vace_blocks.{j}.after_proj", d, d)
    shapes["vace_patch_embedding.weight"] = (d, z["vace_channels"], *p)
    shapes["vace_patch_embedding.bias"] = (d,)
    shapes["pose_proj.proj.weight"], shapes["pose_proj.proj.bias"] = (d // 4, z["pose_channels"], p[1], p[2]), (d // 4,)
    norm("pose_proj.norm", d // 4)
    linear("audio_proj.proj1", z["audio_window"] * z["audio_levels"] * z["audio_dim"], z["audio_hidden"])
    linear("audio_proj.proj2", z["audio_hidden"], z["audio_hidden"])
    linear("audio_proj.proj3", z["audio_hidden"], z["audio_tokens"] * d)
    norm("audio_proj.norm", d)

    state = {}
    for key, shape in shapes.items():
        if len(shape) >= 2 and not key.endswith("modulation"):
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            state[key] = torch.randn(shape, generator=g) / fan_in**0.5
        elif key.endswith("modulation"):
            state[key] = 0.2 * torch.randn(shape, generator=g)
        elif key.endswith(".weight"):  # norms
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


def hallo4_release(root: Path | str) -> str:
    """Write a tiny ``fudan-generative-ai/hallo4`` download into ``root``; returns the ``model_weight.pth`` path."""
    path = Path(root) / "hallo4" / "model_weight.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(hallo4_state_dict(HALLO4_TINY), path)
    return str(path)


def hallo4_converted(root: Path | str) -> str:
    """The tiny release converted by ``prefalign convert hallo4`` (with a random text embedding, as
    ``--text_encoder`` would write one); returns the folder (``pretrained`` for ``Hallo4Denoiser``)."""
    from prefalign.denoisers.hallo4 import TEXT_FILE, convert, write_text_embedding

    root = Path(root)
    release = hallo4_release(root / "download")
    out = convert(release, root / "hallo4-prefalign", HALLO4_TINY_OVERRIDES)
    g = torch.Generator().manual_seed(1)
    text_dim = HALLO4_TINY["text_dim"]
    write_text_embedding(out / "hallo4" / TEXT_FILE, torch.randn(6, text_dim, generator=g),
                         torch.randn(11, text_dim, generator=g))
    return str(out)


def write_json(path: Path, content: dict, compact: bool = False) -> None:
    """A JSON file as the Hub repos hold them: diffusers/transformers configs indented and key-sorted, the 2021
    tokenizer files on one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(content) if compact else json.dumps(content, indent=2, sort_keys=True) + "\n"
    path.write_text(text)


def wan_i2v_14b(root: Path | str) -> str:
    """Write a tiny ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` into ``root`` (see the module docstring)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    root = Path(root)
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**WAN_I2V_TRANSFORMER)  # float32: the dtype the real shards hold
    transformer.save_pretrained(root / "transformer", max_shard_size=WAN_SHARD_SIZE)
    header = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0"}
    write_json(root / "transformer" / "config.json", {**header, **WAN_I2V_TRANSFORMER})

    AutoencoderKLWan(**WAN_VAE).save_pretrained(root / "vae")
    write_json(root / "vae" / "config.json", {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0.dev0",
                                              **WAN_VAE})
    # Stand-in: Wan's flow-matching UniPC with the 480P shift.
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).save_pretrained(
        root / "scheduler"
    )
    write_json(root / "model_index.json", WAN_MODEL_INDEX)
    return str(root)


def svd_xt(root: Path | str) -> str:
    """Write a tiny ``stabilityai/stable-video-diffusion-img2vid-xt`` into ``root`` (see the module docstring)."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

    root = Path(root)
    torch.manual_seed(0)
    for name, cls, config in (("unet", UNetSpatioTemporalConditionModel, SVD_UNET),
                              ("vae", AutoencoderKLTemporalDecoder, SVD_VAE)):
        model = cls(**config)
        model.save_pretrained(root / name)  # diffusion_pytorch_model.safetensors, float32
        model.to(torch.float16).save_pretrained(root / name, variant="fp16")  # the same weights in float16
        header = {"_class_name": cls.__name__, "_diffusers_version": "0.24.0.dev0",
                  "_name_or_path": f"{SVD_CONVERTED_FROM}{SVD_SNAPSHOT}/{name}"}
        write_json(root / name / "config.json", {**header, **config})
    write_json(root / "scheduler" / "scheduler_config.json", SVD_SCHEDULER)
    write_json(root / "model_index.json", SVD_MODEL_INDEX)
    return str(root)


def wav2vec2_base_960h(root: Path | str) -> str:
    """Write a tiny ``facebook/wav2vec2-base-960h`` into ``root`` (see the module docstring)."""
    from safetensors.torch import load_file, save_file
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    root = Path(root)
    torch.manual_seed(0)
    config = {k: v for k, v in WAV2VEC2_BASE_960H.items() if not k.startswith("_") and k != "transformers_version"}
    Wav2Vec2ForCTC(Wav2Vec2Config(**config)).save_pretrained(root)
    # The Hub file was converted from a 2021 pytorch_model.bin: torch's old weight-norm names, and no
    # masked_spec_embed (the 960h checkpoint was saved without it).
    weights = load_file(root / "model.safetensors")
    renamed = {}
    for key, value in weights.items():
        if key == "wav2vec2.masked_spec_embed":
            continue
        key = key.replace("parametrizations.weight.original0", "weight_g")
        renamed[key.replace("parametrizations.weight.original1", "weight_v")] = value.contiguous()
    save_file(renamed, root / "model.safetensors", metadata={"format": "pt"})
    write_json(root / "config.json", WAV2VEC2_BASE_960H)
    for name in ("preprocessor_config.json", "feature_extractor_config.json"):
        write_json(root / name, WAV2VEC2_PREPROCESSOR)
    write_json(root / "vocab.json", WAV2VEC2_VOCAB, compact=True)
    write_json(root / "special_tokens_map.json", WAV2VEC2_SPECIAL_TOKENS, compact=True)
    write_json(root / "tokenizer_config.json", WAV2VEC2_TOKENIZER, compact=True)
    return str(root)


_built: dict[tuple[str, str], str] = {}


def _once(factory: pytest.TempPathFactory, write) -> str:
    """Build a layout once per session even when several test modules import its fixture (each import registers
    the fixture anew in that module)."""
    key = (str(factory.getbasetemp()), write.__name__)
    if key not in _built:
        _built[key] = write(factory.mktemp(write.__name__, numbered=False))
    return _built[key]


@pytest.fixture(scope="session")
def wan_i2v_14b_dir(tmp_path_factory) -> str:
    """A tiny Wan2.1-I2V-14B-480P-Diffusers folder (``pretrained`` for ``WanDenoiser`` / ``WanVAECodec``)."""
    return _once(tmp_path_factory, wan_i2v_14b)


@pytest.fixture(scope="session")
def svd_xt_dir(tmp_path_factory) -> str:
    """A tiny stable-video-diffusion-img2vid-xt folder (``pretrained`` for ``SVDDenoiser`` / ``SVDVAECodec``)."""
    return _once(tmp_path_factory, svd_xt)


@pytest.fixture(scope="session")
def hallo4_release_file(tmp_path_factory) -> str:
    """A tiny ``hallo4/model_weight.pth`` (``checkpoint`` for ``Hallo4Denoiser``, with ``HALLO4_TINY_OVERRIDES``)."""
    return _once(tmp_path_factory, hallo4_release)


@pytest.fixture(scope="session")
def hallo4_dir(tmp_path_factory) -> str:
    """The tiny release converted (``pretrained`` for ``Hallo4Denoiser``)."""
    return _once(tmp_path_factory, hallo4_converted)


@pytest.fixture(scope="session")
def wav2vec2_base_960h_dir(tmp_path_factory) -> str:
    """A tiny wav2vec2-base-960h folder (``pretrained`` for ``Wav2Vec2AudioEncoder``)."""
    return _once(tmp_path_factory, wav2vec2_base_960h)
