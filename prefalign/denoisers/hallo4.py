"""Hallo4 (Cui et al., SIGGRAPH Asia 2025, arXiv 2505.23525) as a portrait denoiser, from its released weights.

The released model (``fudan-generative-ai/hallo4`` on the Hub, ``hallo4/model_weight.pth``) is a Wan2.1-1.3B
text-to-video DiT with VACE context blocks, fine-tuned with three additions in every main block:

- **speech**: wav2vec2's 12 hidden layers per video frame, in windows of 5 frames, projected by an MLP to 32
  tokens per frame; the tokens of the 4 frames a latent frame covers form its context, and a cross-attention
  after the text cross-attention adds them to that latent frame's tokens;
- **skeleton**: each frame of a rendered skeleton video, VAE-encoded on its own, is patchified to ``dim / 4``
  channels; 4 frames stack into one ``dim``-sized token per patch, and a cross-attention whose queries are these
  tokens and whose keys and values are the frame's (normalised, modulated) video tokens is added to the
  feed-forward's input;
- **reference**: through VACE, as the first latent frame of the context (the mask says "keep"), and as the first
  latent frame of the denoised sequence, restored to the reference's latent at every step.

The backbone is diffusers' ``WanVACETransformer3DModel`` (the Wan blocks' keys are renamed to diffusers', so
LoRA targets are those of the other Wan backbones); Hallo4's modules are ours (``Hallo4Modules``), attached as
the backbone's child ``hallo4`` and hooked into its blocks, with Hallo4's own key names. The order of every
addition, norm and modulation is Hallo4's; the forward equals the released code's on the same weights (see
``tests/test_hallo4.py`` and its reference fixture, made by running Hallo4's code).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from prefalign.data.errors import DataError
from prefalign.denoisers.audio import AudioEncoder
from prefalign.denoisers.base import CheckpointWithConditions, PortraitDenoiser
from prefalign.denoisers.codecs import Codec
from prefalign.denoisers.skeleton import render_skeleton

#: The released model's transformer (Wan2.1 VACE 1.3B) in diffusers' ``WanVACETransformer3DModel`` arguments.
RELEASED_TRANSFORMER = {
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "vace_layers": list(range(0, 30, 2)),
    "vace_in_channels": 96,
}  # fmt: skip
#: The released model's Hallo4 modules (``Hallo4Modules`` arguments; ``dim`` and ``eps`` follow the transformer).
RELEASED_MODULES = {
    "audio_window": 5, "audio_levels": 12, "audio_dim": 768, "audio_hidden": 512, "audio_tokens": 32,
    "pose_channels": 16, "frames_per_latent": 4, "text_len": 512,
}  # fmt: skip
#: Largest checkpoint accepted (the released file is 5.6 GB in float32; the bound stops a runaway read).
MAX_CHECKPOINT_BYTES = 64 * 2**30
#: Hallo4's prompt at inference, and Wan's negative prompt, which Hallo4's guidance uses (``sample_neg_prompt``).
PROMPT = "a person is talking"
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
MODULES_FOLDER, MODULES_FILE, MODULES_CONFIG = "hallo4", "hallo4_modules.safetensors", "config.json"
TEXT_FILE = "text_embedding.safetensors"


# --- Hallo4's modules ------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Wan's RMS norm: normalised in float32, cast back, then scaled (the order matters in bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """Layer norm computed in float32 and cast back (Wan's ``WanLayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class CrossAttention(nn.Module):
    """Wan's cross-attention: queries from ``x``, keys and values from ``context``, RMS-normed queries and keys."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Hallo4 attention: dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, h = x.shape[0], self.heads
        q = self.norm_q(self.q(x)).unflatten(-1, (h, -1)).transpose(1, 2)
        k = self.norm_k(self.k(context)).unflatten(-1, (h, -1)).transpose(1, 2)
        v = self.v(context).unflatten(-1, (h, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.o(out.transpose(1, 2).flatten(2).reshape(b, -1, q.shape[1] * q.shape[3]))


class BlockModules(nn.Module):
    """What Hallo4 adds to one main block: the audio and the skeleton cross-attention, each after its norm."""

    def __init__(self, dim: int, heads: int, eps: float, audio: bool, pose: bool):
        super().__init__()
        if audio:
            self.audio_cross_norm = FP32LayerNorm(dim, eps=eps, elementwise_affine=True)
            self.audio_cross_attn = CrossAttention(dim, heads, eps)
        if pose:
            self.condition_cross_norm = FP32LayerNorm(dim, eps=eps, elementwise_affine=True)
            self.condition_cross_attn = CrossAttention(dim, heads, eps)


class AudioProjection(nn.Module):
    """Speech windows ``[B, T, window, levels, D]`` (``T = 4n+1`` frames) → context tokens ``[B, n+1, 4·K, dim]``.

    Each frame's window goes through a 3-layer MLP to ``K`` tokens (layer-normed); the first frame is repeated
    ``frames_per_latent`` times, as the causal VAE encodes it, and every ``frames_per_latent`` frames' tokens
    become one latent frame's context."""

    def __init__(self, window: int, levels: int, channels: int, hidden: int, dim: int, tokens: int, frames_per_latent: int):
        super().__init__()
        self.tokens, self.dim, self.frames_per_latent = tokens, dim, frames_per_latent
        self.proj1 = nn.Linear(window * levels * channels, hidden)
        self.proj2 = nn.Linear(hidden, hidden)
        self.proj3 = nn.Linear(hidden, tokens * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        r = self.frames_per_latent
        x = torch.cat([windows[:, :1].expand(-1, r, *windows.shape[2:]), windows[:, 1:]], dim=1)
        b, t = x.shape[:2]
        x = torch.relu(self.proj1(x.reshape(b * t, -1)))
        x = torch.relu(self.proj2(x))
        x = self.norm(self.proj3(x).reshape(b * t, self.tokens, self.dim))
        return x.reshape(b, t // r, r * self.tokens, self.dim)


class PoseProjection(nn.Module):
    """Skeleton latents ``[B, C, T, h, w]`` (each frame VAE-encoded alone) → tokens ``[B, n+1, (h/p)(w/p), dim]``:
    a patchifying convolution to ``dim / 4`` channels per frame, layer-normed, 4 frames stacked on channels."""

    def __init__(self, channels: int, dim: int, patch: int, frames_per_latent: int):
        super().__init__()
        if dim % frames_per_latent:
            raise ValueError(f"Hallo4 pose projection: dim {dim} is not divisible by {frames_per_latent}")
        self.frames_per_latent = frames_per_latent
        self.proj = nn.Conv2d(channels, dim // frames_per_latent, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim // frames_per_latent)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        r = self.frames_per_latent
        x = torch.cat([latents[:, :, :1].expand(-1, -1, r - 1, -1, -1), latents], dim=2)
        b, c, t, h, w = x.shape
        x = self.proj(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = self.norm(x.flatten(2).transpose(1, 2))  # [B·T, patches, dim / r]
        x = x.reshape(b, t // r, r, x.shape[1], x.shape[2])
        return x.permute(0, 1, 3, 2, 4).flatten(3)  # the r frames' channels side by side


class Hallo4Modules(nn.Module):
    """Hallo4's speech and skeleton modules: the projections and, per main block, the two cross-attentions.

    Args:
        dim, heads, eps, num_blocks, patch: the transformer's hidden size, heads, norm epsilon, main blocks and
            spatial patch size.
        audio_window, audio_levels, audio_dim: video frames per speech window, wav2vec2 levels and their width.
        audio_hidden, audio_tokens: the speech MLP's width and the tokens it makes per frame.
        pose_channels: the skeleton latents' channels (the VAE's); ``0``: no skeleton path.
        frames_per_latent: video frames per latent frame (the VAE's temporal ratio, 4).
        text_len: the text context's length (embeddings are zero-padded to it, as Wan does).
        audio (bool): whether the model has the speech path.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        eps: float,
        num_blocks: int,
        patch: int,
        audio_window: int = 5,
        audio_levels: int = 12,
        audio_dim: int = 768,
        audio_hidden: int = 512,
        audio_tokens: int = 32,
        pose_channels: int = 16,
        frames_per_latent: int = 4,
        text_len: int = 512,
        audio: bool = True,
    ):
        super().__init__()
        self.config = {
            "audio_window": audio_window, "audio_levels": audio_levels, "audio_dim": audio_dim,
            "audio_hidden": audio_hidden, "audio_tokens": audio_tokens, "pose_channels": pose_channels,
            "frames_per_latent": frames_per_latent, "text_len": text_len, "audio": audio,
        }  # fmt: skip
        self.audio_window, self.text_len, self.frames_per_latent = audio_window, text_len, frames_per_latent
        self.audio_proj = (
            AudioProjection(audio_window, audio_levels, audio_dim, audio_hidden, dim, audio_tokens, frames_per_latent)
            if audio else None
        )  # fmt: skip
        self.pose_proj = PoseProjection(pose_channels, dim, patch, frames_per_latent) if pose_channels else None
        self.blocks = nn.ModuleList(
            BlockModules(dim, heads, eps, audio=audio, pose=bool(pose_channels)) for _ in range(num_blocks)
        )

    def audio_context(self, windows: torch.Tensor) -> torch.Tensor:
        """Speech windows ``[B, T, window, levels, D]`` → per latent frame tokens, a zero frame first (the
        reference's)."""
        tokens = self.audio_proj(windows)
        return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)

    def pose_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        tokens = self.pose_proj(latents)
        return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)


class Float64Timesteps(nn.Module):
    """Wan's sinusoidal timestep embedding (cos, then sin), computed in float64 as the released code does."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        position = t.to(torch.float64)
        freqs = torch.pow(10000, -torch.arange(half, device=t.device, dtype=torch.float64) / half)
        angles = torch.outer(position, freqs)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


# --- the released checkpoint's layout ----------------------------------------------------------------------------
#: Released (original Wan) names → diffusers' ``WanVACETransformer3DModel`` names. Hallo4's own modules keep theirs.
_RENAMES = (
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^(vace_)?blocks\.(\d+)\.modulation$", r"\1blocks.\2.scale_shift_table"),
    (r"^(vace_)?blocks\.(\d+)\.self_attn\.([qkv])\.", r"\1blocks.\2.attn1.to_\3."),
    (r"^(vace_)?blocks\.(\d+)\.self_attn\.o\.", r"\1blocks.\2.attn1.to_out.0."),
    (r"^(vace_)?blocks\.(\d+)\.self_attn\.norm_([qk])\.", r"\1blocks.\2.attn1.norm_\3."),
    (r"^(vace_)?blocks\.(\d+)\.cross_attn\.([qkv])\.", r"\1blocks.\2.attn2.to_\3."),
    (r"^(vace_)?blocks\.(\d+)\.cross_attn\.o\.", r"\1blocks.\2.attn2.to_out.0."),
    (r"^(vace_)?blocks\.(\d+)\.cross_attn\.norm_([qk])\.", r"\1blocks.\2.attn2.norm_\3."),
    (r"^(vace_)?blocks\.(\d+)\.norm3\.", r"\1blocks.\2.norm2."),  # Wan's cross-attention norm is diffusers' norm2
    (r"^(vace_)?blocks\.(\d+)\.ffn\.0\.", r"\1blocks.\2.ffn.net.0.proj."),
    (r"^(vace_)?blocks\.(\d+)\.ffn\.2\.", r"\1blocks.\2.ffn.net.2."),
    (r"^vace_blocks\.(\d+)\.before_proj\.", r"vace_blocks.\1.proj_in."),
    (r"^vace_blocks\.(\d+)\.after_proj\.", r"vace_blocks.\1.proj_out."),
    (r"^(patch_embedding|vace_patch_embedding)\.", r"\1."),
)
#: Hallo4's own tensors (kept under ``hallo4.``).
_OWN = re.compile(r"^(audio_proj|pose_proj)\.|^blocks\.\d+\.(audio_cross_norm|audio_cross_attn|condition_cross_norm|condition_cross_attn)\.")


def split_released(state: dict[str, torch.Tensor], path: str) -> tuple[dict, dict]:
    """A released state dict → (diffusers transformer tensors, Hallo4 module tensors); a key that is neither
    raises a ``DataError`` naming the file."""
    transformer, own, unknown = {}, {}, []
    for key, value in state.items():
        if _OWN.match(key):
            own[key] = value
            continue
        for pattern, replacement in _RENAMES:
            new, count = re.subn(pattern, replacement, key)
            if count:
                transformer[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise DataError(f"{len(unknown)} tensors are not of Hallo4's layout, e.g. {unknown[:4]}", path=path,
                        field="checkpoint")
    return transformer, own


def read_released(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a released Hallo4 file (``model_weight.pth`` / ``.ckpt``: a torch zip, read with
    ``weights_only``, so no code is unpickled; or ``.safetensors``), checked to be of Hallo4's layout."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError("a folder, not a checkpoint file (a folder of `prefalign convert hallo4` is `pretrained`)",
                        path=path, field="checkpoint")
    if not path.is_file():
        raise DataError("Hallo4 checkpoint not found", path=path, field="checkpoint")
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise DataError(f"{size} bytes: larger than any Hallo4 checkpoint ({MAX_CHECKPOINT_BYTES} at most)", path=path,
                        field="checkpoint")
    with open(path, "rb") as handle:
        head = handle.read(9)
    is_safetensors = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size
    if not is_safetensors and not head.startswith((b"PK\x03\x04", b"\x80")):  # a torch zip, or its legacy pickle
        raise DataError("neither a torch checkpoint (zip or pickle) nor safetensors", path=path, field="checkpoint")
    try:
        if is_safetensors:  # by its bytes, whatever its name says
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch and safetensors raise many types for a bad file
        text = str(error)
        if "Weights only load failed" in text or "weights_only" in text:
            reason = "it is a pickle that would run code (or hold objects that are not tensors): refused"
        elif "zip" in text.lower() or "truncat" in text.lower() or "EOF" in text or "header" in text.lower():
            reason = f"it is damaged or truncated ({type(error).__name__}: {text.splitlines()[0][:160]})"
        else:
            reason = f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"
        raise DataError(f"cannot read the Hallo4 checkpoint: {reason}", path=path, field="checkpoint") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # as Hallo4's own loader accepts it
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise DataError("not a state dict of tensors", path=path, field="checkpoint")
    markers = ("vace_patch_embedding.weight", "blocks.0.self_attn.q.weight", "patch_embedding.weight")
    missing = [key for key in markers if key not in state]
    if missing:
        hint = ""
        if any(key.startswith(("condition_embedder.", "blocks.0.attn1.")) for key in state):
            hint = " (a diffusers-layout model: give it as `pretrained`, a folder of `prefalign convert hallo4`)"
        raise DataError(f"not a Hallo4 checkpoint: no {missing}{hint}", path=path, field="checkpoint")
    if not any(key.startswith("audio_proj.") for key in state):
        raise DataError("not a Hallo4 checkpoint: it has VACE but no audio projection (audio_proj.*): a plain "
                        "Wan2.1 VACE model?", path=path, field="checkpoint")
    return state


def released_config(state: dict[str, torch.Tensor], overrides: Optional[dict] = None) -> tuple[dict, dict]:
    """(transformer arguments, module arguments) of a released state dict: every size its shapes tell, the rest
    (heads, VACE layer positions, text length, speech window and levels) from the release, unless overridden."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(RELEASED_TRANSFORMER) - set(RELEASED_MODULES))
    if unknown:
        raise ValueError(f"overrides {unknown} are not Hallo4 settings; allowed: "
                         f"{sorted(set(RELEASED_TRANSFORMER) | set(RELEASED_MODULES))}")
    transformer = {**RELEASED_TRANSFORMER}
    modules = {**RELEASED_MODULES}
    patch = state["patch_embedding.weight"]
    dim = patch.shape[0]
    num_layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    num_vace = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"vace_blocks\.(\d+)\.", k)))
    head_dim = dim // overrides.get("num_attention_heads", max(1, dim // 128))
    transformer.update(
        patch_size=list(patch.shape[2:]),
        in_channels=patch.shape[1],
        num_attention_heads=dim // head_dim,
        attention_head_dim=head_dim,
        out_channels=state["head.head.weight"].shape[0] // math.prod(patch.shape[2:]),
        text_dim=state["text_embedding.0.weight"].shape[1],
        freq_dim=state["time_embedding.0.weight"].shape[1],
        ffn_dim=state["blocks.0.ffn.0.weight"].shape[0],
        num_layers=num_layers,
        cross_attn_norm="blocks.0.norm3.weight" in state,
        vace_layers=list(range(0, num_layers, 2))[:num_vace],
        vace_in_channels=state["vace_patch_embedding.weight"].shape[1],
    )
    proj1 = state.get("audio_proj.proj1.weight")
    modules["audio"] = proj1 is not None
    if proj1 is not None:
        modules["audio_hidden"] = proj1.shape[0]
        modules["audio_tokens"] = state["audio_proj.proj3.weight"].shape[0] // dim
    pose = state.get("pose_proj.proj.weight")
    modules["pose_channels"] = 0 if pose is None else pose.shape[1]
    for key, value in overrides.items():
        (transformer if key in RELEASED_TRANSFORMER else modules)[key] = value
    if len(transformer["vace_layers"]) != num_vace:
        raise ValueError(f"vace_layers {transformer['vace_layers']} name {len(transformer['vace_layers'])} blocks; "
                         f"the checkpoint has {num_vace} VACE blocks")
    if proj1 is not None:
        width = modules["audio_window"] * modules["audio_levels"] * modules["audio_dim"]
        if proj1.shape[1] != width:
            raise ValueError(f"the checkpoint's speech MLP takes {proj1.shape[1]} inputs; audio_window × audio_levels "
                             f"× audio_dim = {width}")
    return transformer, modules


def build_modules(transformer_config: dict, modules_config: dict) -> Hallo4Modules:
    dim = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    return Hallo4Modules(
        dim=dim, heads=transformer_config["num_attention_heads"], eps=transformer_config["eps"],
        num_blocks=transformer_config["num_layers"], patch=transformer_config["patch_size"][1], **modules_config,
    )  # fmt: skip


def load_released(path: str | Path, overrides: Optional[dict] = None, dtype: Optional[torch.dtype] = torch.float32):
    """A released Hallo4 file → (diffusers ``WanVACETransformer3DModel``, ``Hallo4Modules``) in ``dtype`` (``None``:
    the file's own), every tensor used exactly once (a tensor without a place, or a place without a tensor, is an
    error naming the file)."""
    from diffusers import WanVACETransformer3DModel

    state = read_released(path)
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    try:
        transformer_config, modules_config = released_config(state, overrides)
    except ValueError as error:
        raise DataError(str(error), path=path, field="checkpoint") from None
    tensors, own = split_released(state, str(path))
    with torch.device("meta"):
        transformer = WanVACETransformer3DModel(**transformer_config)
        modules = build_modules(transformer_config, modules_config)
    for part, values, name in ((transformer, tensors, "transformer"), (modules, own, "Hallo4 modules")):
        shapes = {k: v.shape for k, v in part.state_dict().items()}
        missing, unexpected = sorted(set(shapes) - set(values)), sorted(set(values) - set(shapes))
        wrong = [f"{k} {tuple(values[k].shape)} vs {tuple(shapes[k])}"
                 for k in sorted(set(shapes) & set(values)) if values[k].shape != shapes[k]]  # fmt: skip
        if missing or unexpected or wrong:
            raise DataError(
                f"the checkpoint does not fit Hallo4's {name} (diffusers' names): missing {missing[:3]} "
                f"({len(missing)}), without a "
                f"place {unexpected[:3]} ({len(unexpected)}), other shapes {wrong[:2]} ({len(wrong)})",
                path=path, field="checkpoint",
            )
        part.load_state_dict({k: v.to(dtype) for k, v in values.items()}, strict=True, assign=True)
    transformer.rope = type(transformer.rope)(
        transformer_config["attention_head_dim"], tuple(transformer_config["patch_size"]), 1024
    )  # its buffers are not in the file: computed anew off the meta device
    return transformer.train(), modules


def convert(
    checkpoint: str | Path,
    out: str | Path,
    overrides: Optional[dict] = None,
    text_encoder: Optional[str] = None,
    prompt: str = PROMPT,
    negative_prompt: str = WAN_NEGATIVE_PROMPT,
) -> Path:
    """Write a released Hallo4 file as a folder that loads fast and without unpickling: ``transformer/``
    (diffusers' ``save_pretrained``, safetensors) and ``hallo4/`` (the modules' tensors and config, and with
    ``text_encoder`` the prompts' umT5 embeddings). ``Hallo4Denoiser(pretrained=out)`` loads it. ``out`` must not
    exist; the folder appears whole or not at all."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"{out} exists: give a new folder")
    transformer, modules = load_released(checkpoint, overrides, dtype=None)  # the file read once, kept in its dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same filesystem: the rename is atomic
    try:
        transformer.save_pretrained(work / "transformer", safe_serialization=True)
        folder = work / MODULES_FOLDER
        folder.mkdir()
        tensors = {k: v.contiguous() for k, v in modules.state_dict().items()}
        save_file(tensors, str(folder / MODULES_FILE), metadata={"source": Path(checkpoint).name})
        (folder / MODULES_CONFIG).write_text(json.dumps(modules.config, indent=2) + "\n")
        if text_encoder is not None:
            embedded = embed_prompts(text_encoder, [prompt, negative_prompt], modules.text_len)
            write_text_embedding(folder / TEXT_FILE, *embedded)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def convert_command(
    checkpoint: str,
    out: str,
    text_encoder: Optional[str] = None,
    prompt: str = PROMPT,
    negative_prompt: str = WAN_NEGATIVE_PROMPT,
    num_attention_heads: Optional[int] = None,
    vace_layers: Optional[list[int]] = None,
    text_len: Optional[int] = None,
    audio_window: Optional[int] = None,
    audio_levels: Optional[int] = None,
    audio_dim: Optional[int] = None,
) -> None:
    """Convert the released Hallo4 weights (``hallo4/model_weight.pth``) into a folder ``Hallo4Denoiser`` loads.

    Args:
        checkpoint: the released file (torch zip read with ``weights_only``, or safetensors; Wan's key names).
        out: the folder to write (must not exist): ``transformer/`` and ``hallo4/``.
        text_encoder: a Wan diffusers folder or Hub id with ``text_encoder/`` and ``tokenizer/`` (umT5): embed the
            prompt and negative prompt once into ``hallo4/text_embedding.safetensors``.
        prompt: the prompt Hallo4 is conditioned on.
        negative_prompt: the negative prompt of classifier-free guidance.
        num_attention_heads: the transformer's heads, if not the release's 128-wide heads (12 at 1.3B).
        vace_layers: the main blocks that take the VACE hints, if not every second one from 0.
        text_len: the text context's length, if not Wan's 512.
        audio_window: video frames per speech window, if not 5.
        audio_levels: wav2vec2 levels the speech MLP takes, if not 12.
        audio_dim: their width, if not 768.
    """
    given = {"num_attention_heads": num_attention_heads, "vace_layers": vace_layers, "text_len": text_len,
             "audio_window": audio_window, "audio_levels": audio_levels, "audio_dim": audio_dim}  # fmt: skip
    overrides = {key: value for key, value in given.items() if value is not None}
    folder = convert(checkpoint, out, overrides, text_encoder, prompt, negative_prompt)
    print(f"wrote {folder}")


def load_converted(folder: str | Path, subfolder: Optional[str], dtype: torch.dtype):
    """A folder written by :func:`convert` (local) → (transformer, modules)."""
    from diffusers import WanVACETransformer3DModel
    from safetensors.torch import load_file

    root = Path(folder).expanduser()
    transformer = WanVACETransformer3DModel.from_pretrained(str(root), subfolder=subfolder, torch_dtype=dtype)
    config_path, weights_path = root / MODULES_FOLDER / MODULES_CONFIG, root / MODULES_FOLDER / MODULES_FILE
    if not weights_path.is_file():
        raise DataError(f"no {MODULES_FOLDER}/{MODULES_FILE}: not a folder written by `prefalign convert hallo4`",
                        path=root, field="pretrained")
    config = read_json(config_path)
    cfg = transformer.config
    transformer_config = {
        "num_attention_heads": cfg.num_attention_heads, "attention_head_dim": cfg.attention_head_dim,
        "eps": cfg.eps, "num_layers": cfg.num_layers, "patch_size": list(cfg.patch_size),
    }  # fmt: skip
    try:
        modules = build_modules(transformer_config, config)
    except TypeError as error:
        raise DataError(f"unexpected module settings ({error})", path=config_path, field="hallo4") from None
    values = load_file(str(weights_path))
    result = modules.load_state_dict(values, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DataError(f"the Hallo4 modules do not fit: missing {result.missing_keys[:3]}, without a place "
                        f"{result.unexpected_keys[:3]}", path=weights_path, field="hallo4")
    return transformer.train(), modules.to(dtype)


def read_json(path: Path, limit: int = 2**20) -> dict:
    """A small JSON object from ``path`` (bounded read; a clear error naming the file)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    if len(data) > limit:
        raise DataError(f"larger than {limit} bytes: not a config", path=path)
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"not JSON ({error})", path=path) from None
    if not isinstance(value, dict):
        raise DataError("not a JSON object", path=path)
    return value


# --- the denoiser -----------------------------------------------------------------------------------------------
class Hallo4Denoiser(PortraitDenoiser):
    """The released Hallo4 (a Wan2.1 VACE 1.3B with speech and skeleton cross-attention) as a portrait denoiser.

    Its input is Hallo4's: the latents of the clip after one latent frame holding the reference image's latent
    (restored at every step; its prediction is dropped), the VACE context (the reference latent, then a kept-out
    grey video, with Hallo4's mask), the speech as wav2vec2's hidden layers per video frame, the skeleton as
    per-frame VAE latents of rendered skeleton images (black frames when the batch has no pose), and a text
    context (Hallo4 uses a fixed prompt, "a person is talking"; its umT5 embedding comes from a file or is
    computed once at load). Classifier-free guidance drops the speech, and the text becomes the negative prompt's.

    Exactly one of ``checkpoint``, ``pretrained``, ``config`` gives the weights.

    Args:
        codec (Codec): Wan2.1's VAE (``WanVAECodec``); its latents must be the transformer's channels.
        audio_encoder (AudioEncoder | None): wav2vec2 features per frame, Hallo4's way
            (``Wav2Vec2AudioEncoder(resample="features", layers=[1, ..., 12])``); required when the model has its
            speech path.
        checkpoint (str | None): the released file (``model_weight.pth``; torch zip or safetensors, original keys).
        pretrained (str | None): a folder written by ``prefalign convert hallo4``.
        subfolder (str): the transformer's subfolder in ``pretrained``.
        config (dict | None): build a random model (tests): ``transformer`` (``WanVACETransformer3DModel``
            arguments) and ``modules`` (``Hallo4Modules`` arguments besides the transformer's sizes).
        overrides (dict | None): with ``checkpoint``: sizes its shapes cannot tell (``num_attention_heads``,
            ``vace_layers``, ``text_len``, ``audio_window``, ``audio_levels``), default the release's.
        torch_dtype (str): weights' dtype.
        text_embedding (str | None): a safetensors file with ``prompt`` (and ``negative``) umT5 embeddings
            ``[tokens, text_dim]``; default ``<pretrained>/hallo4/text_embedding.safetensors`` when it exists.
        text_encoder (str | None): a Hub id or folder with ``text_encoder/`` and ``tokenizer/`` (umT5, e.g.
            ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``): embed ``prompt`` and ``negative_prompt`` once at load.
        prompt, negative_prompt (str): the texts to embed with ``text_encoder``.
        vace_scale (float): the VACE hints' scale (Hallo4's ``context_scale``, 1).
        gradient_checkpointing (bool): recompute blocks in backward.
        fps (float): the frame rate the speech is aligned to (25, Hallo4's).
        pose_keypoints (int | None): keypoints per frame of the batch's pose, rendered as skeleton images
            (133: DWPose whole-body; see ``skeleton.render_skeleton``); ``None`` feeds black skeleton frames.
    """

    # Self-attention and feed-forward of the main and VACE blocks, and the speech and skeleton cross-attentions.
    default_lora_targets = (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2",
        "audio_cross_attn.q", "audio_cross_attn.k", "audio_cross_attn.v", "audio_cross_attn.o",
        "condition_cross_attn.q", "condition_cross_attn.k", "condition_cross_attn.v", "condition_cross_attn.o",
    )  # fmt: skip

    def __init__(
        self,
        codec: Codec,
        audio_encoder: Optional[AudioEncoder] = None,
        checkpoint: Optional[str] = None,
        pretrained: Optional[str] = None,
        subfolder: str = "transformer",
        config: Optional[dict] = None,
        overrides: Optional[dict] = None,
        torch_dtype: str = "float32",
        text_embedding: Optional[str] = None,
        text_encoder: Optional[str] = None,
        prompt: str = PROMPT,
        negative_prompt: str = WAN_NEGATIVE_PROMPT,
        vace_scale: float = 1.0,
        gradient_checkpointing: bool = False,
        fps: float = 25.0,
        pose_keypoints: Optional[int] = None,
    ):
        super().__init__(codec, audio_encoder, fps=fps, pose_keypoints=pose_keypoints)
        from diffusers import WanVACETransformer3DModel

        if sum(x is not None for x in (checkpoint, pretrained, config)) != 1:
            raise ValueError("Hallo4Denoiser needs exactly one of `checkpoint` (the released file), `pretrained` (a "
                             "folder of `prefalign convert hallo4`) or `config`")
        dtype = getattr(torch, torch_dtype)
        self.pretrained = checkpoint or pretrained  # recorded in checkpoints and model cards
        if checkpoint is not None:
            backbone, modules = load_released(checkpoint, overrides, dtype)
        elif pretrained is not None:
            backbone, modules = load_converted(pretrained, subfolder, dtype)
        else:
            backbone = WanVACETransformer3DModel(**config["transformer"]).to(dtype)
            modules = build_modules(dict(backbone.config), dict(config.get("modules", {}))).to(dtype)
        cfg = backbone.config
        if cfg.out_channels != codec.latent_channels or cfg.in_channels != codec.latent_channels:
            raise ValueError(f"the Hallo4 transformer takes and predicts {cfg.in_channels}/{cfg.out_channels} "
                             f"channels but the codec's latents have {codec.latent_channels}")
        expected_vace = 2 * codec.latent_channels + codec.spatial_ratio**2
        if cfg.vace_in_channels != expected_vace:
            raise ValueError(f"the VACE context has {cfg.vace_in_channels} channels; with this codec it is "
                             f"{expected_vace} (2 × {codec.latent_channels} latents + {codec.spatial_ratio}² mask)")
        if modules.audio_proj is not None and audio_encoder is None:
            raise ValueError("this Hallo4 model has its speech path: give an audio_encoder (wav2vec2, Hallo4's way)")
        if modules.audio_proj is not None and audio_encoder is not None:
            got = (audio_encoder.num_levels, audio_encoder.feature_dim)
            want = (modules.config["audio_levels"], modules.config["audio_dim"])
            if got != want:
                raise ValueError(f"the audio encoder gives {got[0]} levels of {got[1]} features; this Hallo4 model "
                                 f"takes {want[0]} of {want[1]} (wav2vec2-base, layers 1..12)")
        if modules.frames_per_latent != codec.temporal_ratio:
            raise ValueError(f"Hallo4's modules group {modules.frames_per_latent} frames per latent frame; the codec "
                             f"{codec.temporal_ratio}")
        backbone.condition_embedder.timesteps_proj = Float64Timesteps(cfg.freq_dim)
        backbone.add_module("hallo4", modules)
        self.backbone = backbone
        self.vace_scale = vace_scale
        self.text_len = modules.text_len
        prompt_embedding, negative_embedding = self._text_embeddings(
            text_embedding, text_encoder, pretrained, prompt, negative_prompt, cfg.text_dim
        )
        self.register_buffer("text", prompt_embedding, persistent=False)
        self.register_buffer("negative_text", negative_embedding, persistent=False)
        self._grey_latent: dict = {}
        for index, block in enumerate(backbone.blocks):
            hook = _BlockHooks(self, index)
            block.norm2.register_forward_pre_hook(hook.keep_hidden)
            block.attn2.register_forward_hook(hook.add_speech)
            block.ffn.register_forward_pre_hook(hook.add_skeleton)
        if gradient_checkpointing:
            backbone.enable_gradient_checkpointing(CheckpointWithConditions(self))

    # --- text ----------------------------------------------------------------------------------------------------
    def _text_embeddings(self, path, encoder, pretrained, prompt, negative, text_dim) -> tuple[torch.Tensor, torch.Tensor]:
        if path is None and encoder is None and pretrained is not None and (Path(pretrained) / MODULES_FOLDER / TEXT_FILE).is_file():
            path = str(Path(pretrained) / MODULES_FOLDER / TEXT_FILE)
        if path is not None and encoder is not None:
            raise ValueError("give the text as text_embedding (a file) or text_encoder, not both")
        if path is not None:
            prompt_embedding, negative_embedding = read_text_embedding(path, text_dim, self.text_len)
        elif encoder is not None:
            prompt_embedding, negative_embedding = embed_prompts(encoder, [prompt, negative], self.text_len)
        else:  # no text: an all-zero context (tests, or a model trained without text)
            prompt_embedding = negative_embedding = torch.zeros(0, text_dim)
        return self._padded(prompt_embedding), self._padded(negative_embedding)

    def _padded(self, embedding: torch.Tensor) -> torch.Tensor:
        """``[tokens, text_dim]`` → ``[1, text_len, text_dim]`` with zeros after the tokens, as Wan pads its context."""
        out = embedding.new_zeros(1, self.text_len, embedding.shape[-1])
        out[0, : embedding.shape[0]] = embedding
        return out

    # --- conditions ---------------------------------------------------------------------------------------------
    @property
    def required_fields(self) -> tuple[str, ...]:
        fields = ("reference",)
        if self.audio_encoder is not None:
            fields += ("audio",)
        if self.pose_keypoints is not None:
            fields += ("pose",)
        return fields

    def new_modules(self) -> dict[str, nn.Module]:
        return {}  # every module is pretrained: LoRA adapts them (default_lora_targets)

    def condition(self, batch: dict, num_frames: Optional[int] = None) -> dict:
        """The reference latent and speech features (as every denoiser's), Hallo4's VACE context and the skeleton
        latents."""
        cond = super().condition(batch, num_frames)
        num_frames, reference = cond["num_frames"], batch["reference"]
        height, width = reference.shape[-2:]
        cond["vace"] = self.vace_context(cond["reference"], num_frames, height, width)
        if self.backbone.hallo4.pose_proj is not None:
            pose = batch.get("pose")
            if self.pose_keypoints is not None and pose is None:
                raise DataError("this denoiser is skeleton-conditioned (pose_keypoints) but the batch has no pose", field="pose")
            if pose is not None and pose.shape[1] != num_frames:
                raise DataError(f"pose has {pose.shape[1]} frames for a {num_frames}-frame video", field="pose")
            cond["pose"] = self.skeleton_latents(pose, reference.shape[0], num_frames, height, width)
        return cond

    def vace_context(self, reference: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
        """Hallo4's VACE context ``[B, 2C + s², 1 + F, h, w]``: the reference latent (beside zeros), then the
        latents of the kept-out (grey) video twice, and the mask (0 for the reference, 1 for the video)."""
        b = reference.shape[0]
        grey = self.grey_latent(num_frames, height, width, reference).expand(b, -1, -1, -1, -1)
        s2 = self.codec.spatial_ratio**2
        first = torch.cat([reference, torch.zeros_like(reference), reference.new_zeros(b, s2, 1, *reference.shape[-2:])], 1)
        rest = torch.cat([grey, grey, grey.new_ones(b, s2, *grey.shape[2:])], dim=1)
        return torch.cat([first, rest], dim=2)

    def grey_latent(self, num_frames: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """The codec's latent of an all-grey video (zero in [-1, 1]), computed once per size."""
        key = (num_frames, height, width, like.device, like.dtype)
        if key not in self._grey_latent:
            grey = torch.full((1, num_frames, 3, height, width), 0.5, device=like.device, dtype=like.dtype)
            self._grey_latent = {key: self.codec.encode(grey)}  # one size at a time: bounded memory
        return self._grey_latent[key]

    @torch.no_grad()
    def skeleton_latents(self, pose: Optional[torch.Tensor], batch: int, num_frames: int, height: int, width: int) -> torch.Tensor:
        """Skeleton frames (rendered from ``pose [B, T, K, 2]``; black without it), each VAE-encoded on its own,
        as Hallo4 encodes its skeleton video → ``[B, C, T, h, w]``."""
        device = self.text.device
        if pose is None:
            black = torch.zeros(1, 1, 3, height, width, device=device, dtype=self.text.dtype)
            latent = self.codec.encode(black)  # [1, C, 1, h, w]
            return latent.expand(batch, -1, num_frames, -1, -1)
        frames = render_skeleton(pose, height, width).to(self.text.dtype)  # [B, T, 3, H, W]
        latents = [self.codec.encode(chunk[:, None]) for chunk in frames.flatten(0, 1).split(16)]
        latents = torch.cat(latents, dim=0)  # [B·T, C, 1, h, w]
        return latents.reshape(batch, num_frames, *latents.shape[1:]).squeeze(3).transpose(1, 2)

    def chunk_inputs(self, batch: dict, start: int, size: int) -> dict:
        part = super().chunk_inputs(batch, start, size)
        if batch.get("pose") is None:
            part.pop("pose", None)
        return part

    def drop_conditions(self, cond: dict, keep: torch.Tensor) -> dict:
        """Classifier-free guidance's unconditional branch, as Hallo4 makes it: zero speech features and the
        negative prompt's text."""
        out = PortraitDenoiser.drop_conditions(cond, keep)
        text = cond.get("text", self.text).expand(keep.shape[0], -1, -1)
        mask = keep.view(-1, 1, 1).to(text.dtype)
        return {**out, "text": text * mask + self.negative_text.to(text.dtype) * (1 - mask)}

    # --- prediction ---------------------------------------------------------------------------------------------
    def forward(self, noisy_latents: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.backbone_forward(noisy_latents, t, cond)

    def backbone_forward(self, noisy_latents: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The clip's prediction: the reference latent goes first, as Hallo4 restores it at every step, and its
        own prediction is dropped."""
        b, dtype = noisy_latents.shape[0], noisy_latents.dtype
        x = torch.cat([cond["reference"].to(dtype), noisy_latents], dim=2)
        windows = None
        if self.backbone.hallo4.audio_proj is not None:
            if cond.get("audio") is None:
                raise DataError("Hallo4's speech path needs the audio features (cond['audio'])", field="audio")
            windows = speech_windows(cond["audio"], self.backbone.hallo4.audio_window)
        text = cond.get("text", self.text).expand(b, -1, -1)
        return self.released_forward(x, t, cond["vace"], text, windows, cond.get("pose"))[:, :, 1:]

    def released_forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        vace: torch.Tensor,
        text: torch.Tensor,
        audio_windows: Optional[torch.Tensor] = None,
        skeleton: Optional[torch.Tensor] = None,
        vace_scale: Optional[float] = None,
    ) -> torch.Tensor:
        """Hallo4's own forward (``VaceWanModel.forward``), batched: latents ``x [B, C, 1 + F, h, w]`` (reference
        frame first), timesteps ``t [B]`` in [0, 1000], the VACE context ``[B, 2C + s², 1 + F, h, w]``, the text
        context ``[B, text_len, text_dim]`` (zero-padded), speech windows ``[B, T, window, levels, D]`` and
        skeleton latents ``[B, C, T, h, w]`` for ``T = 4F - 3`` frames → the prediction ``[B, C, 1 + F, h, w]``."""
        modules = self.backbone.hallo4
        dtype = x.dtype
        speech = modules.audio_context(audio_windows.to(dtype)) if modules.audio_proj is not None else None
        skeleton_tokens = modules.pose_tokens(skeleton.to(dtype)) if modules.pose_proj is not None else None
        scale = self.vace_scale if vace_scale is None else vace_scale
        scales = x.new_full((len(self.backbone.config.vace_layers),), scale)
        self._audio_tokens, self._motion_tokens = speech, skeleton_tokens
        try:
            return self.backbone(
                x, t, text.to(dtype), control_hidden_states=vace.to(dtype), control_hidden_states_scale=scales,
                return_dict=False,
            )[0]
        finally:
            self._audio_tokens = self._motion_tokens = None


def speech_windows(features: torch.Tensor, window: int) -> torch.Tensor:
    """Speech features ``[B, T, levels, D]`` → each frame's window of ``window`` frames around it
    ``[B, T, window, levels, D]``, the clip's first and last frames repeated past its edges (as Hallo4's
    ``process_audio_emb``)."""
    t = features.shape[1]
    offsets = torch.arange(window, device=features.device) - window // 2
    index = (torch.arange(t, device=features.device)[:, None] + offsets).clamp(0, t - 1)
    return features[:, index]


class _BlockHooks:
    """Hallo4's additions inside main block ``index``: the speech cross-attention after the text cross-attention
    (the block's residual then holds text and speech), the skeleton cross-attention on the feed-forward's input.

    A callable object rather than closures, so that ``copy.deepcopy`` of a denoiser gives hooks on the copy."""

    def __init__(self, owner: Hallo4Denoiser, index: int):
        self.owner = owner
        self.index = index
        self.hidden: Optional[torch.Tensor] = None

    def _modules(self) -> BlockModules:
        return self.owner.backbone.hallo4.blocks[self.index]

    def keep_hidden(self, module, args):
        """Before the cross-attention norm: the residual stream, which the speech attention reads after text."""
        if self.owner._audio_tokens is not None:
            self.hidden = args[0]

    def add_speech(self, module, args, output):
        speech, hidden = self.owner._audio_tokens, self.hidden
        if speech is None:
            return output
        self.hidden = None
        m = self._modules()
        b, n, d = output.shape
        f = speech.shape[1]
        x = (hidden + output).type_as(output).reshape(b * f, n // f, d)  # the stream after the text attention
        residual = m.audio_cross_attn(m.audio_cross_norm(x), speech.reshape(b * f, -1, d).to(x.dtype))
        return output + residual.reshape(b, n, d)

    def add_skeleton(self, module, args):
        skeleton = self.owner._motion_tokens
        if skeleton is None:
            return None
        m = self._modules()
        x = args[0]
        b, n, d = x.shape
        f = skeleton.shape[1]
        frames = x.reshape(b * f, n // f, d)
        residual = m.condition_cross_attn(skeleton.reshape(b * f, -1, d).to(x.dtype), m.condition_cross_norm(frames))
        return (x + residual.reshape(b, n, d),) + tuple(args[1:])


# --- text ---------------------------------------------------------------------------------------------------------
def read_text_embedding(path: str | Path, text_dim: int, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompt`` (and optional ``negative``) embeddings ``[tokens, text_dim]`` from a safetensors file."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError("text embedding file not found", path=path, field="text_embedding")
    if path.stat().st_size > 2 * text_len * text_dim * 4 + 2**20:
        raise DataError("larger than two float32 text contexts", path=path, field="text_embedding")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            tensors = {key: handle.get_tensor(key) for key in keys & {"prompt", "negative"}}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types for a bad header
        raise DataError(f"cannot read the text embedding ({type(error).__name__}: {error})", path=path,
                        field="text_embedding") from None
    if "prompt" not in tensors:
        raise DataError(f"no 'prompt' tensor (it has {sorted(keys)})", path=path, field="text_embedding")
    for key, value in tensors.items():
        if value.dim() != 2 or value.shape[1] != text_dim or value.shape[0] > text_len:
            raise DataError(f"'{key}' is {tuple(value.shape)}; it must be [tokens ≤ {text_len}, {text_dim}]",
                            path=path, field="text_embedding")
    return tensors["prompt"].float(), tensors.get("negative", torch.zeros(0, text_dim)).float()


def embed_prompts(source: str, prompts: list[str], text_len: int) -> list[torch.Tensor]:
    """umT5 embeddings of ``prompts`` as Wan makes them: tokenised to ``text_len``, encoded, trimmed to the tokens
    (the model pads with zeros). ``source`` holds ``text_encoder/`` and ``tokenizer/`` (a Wan diffusers folder)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(source, subfolder="text_encoder").eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            tokens = tokenizer([prompt], padding="max_length", max_length=text_len, truncation=True,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")  # fmt: skip
            hidden = encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state[0]
            out.append(hidden[: int(tokens.attention_mask.sum())].float())
    return out


def write_text_embedding(path: str | Path, prompt: torch.Tensor, negative: torch.Tensor) -> None:
    """Save the ``prompt`` and ``negative`` embeddings that :func:`read_text_embedding` reads."""
    from safetensors.torch import save_file

    save_file({"prompt": prompt.contiguous(), "negative": negative.contiguous()}, str(path))
