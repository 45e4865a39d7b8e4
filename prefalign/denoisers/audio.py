"""Speech conditioning: audio encoders that give features per video frame, and per-block audio cross-attention.

Each latent frame attends only to the audio of its own video frames (a window of ``window`` frames around
each of them), as Hallo4 and ReFree-S2V inject speech; a learnable level selector per block mixes the
encoder's levels (ReFree-S2V's multi-level speech representation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prefalign.data.errors import DataError


class AudioEncoder(nn.Module):
    """Audio ``[B, S]`` at ``sample_rate`` → features ``[B, T, L, D]``: per video frame, ``L`` levels of ``D`` features."""

    sample_rate: int = 16000
    num_levels: int = 1
    feature_dim: int = 1

    def forward(self, audio: torch.Tensor, num_frames: int, fps: float) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def frame_aligned(audio: torch.Tensor, num_frames: int, samples_per_frame: float) -> torch.Tensor:
        """Crop or zero-pad audio to exactly ``num_frames`` frames (the data module checks real length mismatches)."""
        need = round(num_frames * samples_per_frame)
        if audio.shape[-1] >= need:
            return audio[..., :need]
        return F.pad(audio, (0, need - audio.shape[-1]))


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """Triangular HTK-mel filters, ``[n_fft // 2 + 1, n_mels]``."""
    f_max = f_max or sample_rate / 2

    def to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = torch.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = hz[:-2], hz[1:-1], hz[2:]
    rise = (freqs[:, None] - lower) / (centre - lower)
    fall = (upper - freqs[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rise, fall), min=0.0)


class MelAudioEncoder(AudioEncoder):
    """A weight-free log-mel encoder: ``hops_per_frame`` mel frames per video frame, flattened to one feature vector.

    Args:
        sample_rate (int): audio sample rate in Hz.
        n_mels (int): mel bands.
        hops_per_frame (int): mel frames per video frame (4 at 25 fps is a 10 ms hop at 16 kHz).
        n_fft (int): FFT size.
    """

    def __init__(self, sample_rate: int = 16000, n_mels: int = 40, hops_per_frame: int = 4, n_fft: int = 512):
        super().__init__()
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.hops_per_frame = hops_per_frame
        self.n_fft = n_fft
        self.num_levels = 1
        self.feature_dim = n_mels * hops_per_frame
        self.register_buffer("filters", mel_filterbank(n_fft, n_mels, sample_rate), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, audio: torch.Tensor, num_frames: int, fps: float) -> torch.Tensor:
        samples_per_frame = self.sample_rate / fps
        hop = samples_per_frame / self.hops_per_frame
        if hop != int(hop):
            raise DataError(
                f"{self.sample_rate} Hz at {fps} fps does not split into {self.hops_per_frame} hops per frame",
                field="audio",
            )
        audio = self.frame_aligned(audio.float(), num_frames, samples_per_frame)
        spec = torch.stft(audio, self.n_fft, hop_length=int(hop), window=self.window, center=True, return_complex=True)
        power = spec.abs().pow(2).transpose(1, 2)  # [B, hops, freqs]
        logmel = torch.log10(power @ self.filters + 1e-6)
        logmel = logmel[:, : num_frames * self.hops_per_frame]
        feats = logmel.reshape(audio.shape[0], num_frames, 1, self.feature_dim)
        return (feats + 3.0) / 3.0  # log10 power of speech spans roughly [-6, 3]: bring it near unit scale


class AudioCrossAttention(nn.Module):
    """Cross-attention from the video tokens of one latent frame to that frame's audio tokens; zero output at init."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"audio attention: dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden: torch.Tensor, audio: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
        """``hidden [B, F*S, dim]`` (frame-major tokens), ``audio [B, F, K, dim]`` → the residual to add."""
        b, n, d = hidden.shape
        f = num_latent_frames
        h = self.heads
        x = self.norm(hidden.float()).type_as(hidden).reshape(b * f, n // f, d)
        a = audio.reshape(b * f, audio.shape[2], d).type_as(hidden)
        q = self.to_q(x).unflatten(-1, (h, d // h)).transpose(1, 2)
        k = self.to_k(a).unflatten(-1, (h, d // h)).transpose(1, 2)
        v = self.to_v(a).unflatten(-1, (h, d // h)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.to_out(out).reshape(b, n, d)


class AudioConditioning(nn.Module):
    """Turns per-frame audio features into per-latent-frame tokens and injects them after every backbone block.

    Args:
        feature_dim (int): the audio encoder's feature size ``D``.
        num_levels (int): the audio encoder's levels ``L`` (wav2vec2 layers, or 1 for mel).
        dim (int): the backbone's hidden size.
        num_blocks (int): backbone blocks that get an audio cross-attention and a level selector.
        heads (int): attention heads of the audio cross-attention.
        window (int): video frames of audio each frame sees (centred; Hallo4 uses 5).
        temporal_ratio (int): video frames per latent frame (the codec's).
    """

    def __init__(
        self, feature_dim: int, num_levels: int, dim: int, num_blocks: int, heads: int, window: int, temporal_ratio: int
    ):
        super().__init__()
        if window % 2 == 0:
            raise ValueError(f"audio window must be odd (centred on its frame), got {window}")
        self.window = window
        self.temporal_ratio = temporal_ratio
        self.proj = nn.Sequential(nn.Linear(feature_dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim))
        # Which of the latent frame's video frames, and which offset in the window, a token is.
        self.position = nn.Parameter(torch.randn(temporal_ratio, window, dim) * 0.02)
        # Level selectors: uniform softmax at init (ReFree-S2V).
        self.level_logits = nn.Parameter(torch.zeros(num_blocks, num_levels))
        self.attn = nn.ModuleList(AudioCrossAttention(dim, heads) for _ in range(num_blocks))

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, T, L, D]`` per video frame → ``[B, F, r*window, L, dim]`` per latent frame."""
        b, t, levels, _ = features.shape
        r, w = self.temporal_ratio, self.window
        x = self.proj(features)  # [B, T, L, dim]; linear in the level mix, so project each level once
        offsets = torch.arange(w, device=x.device) - w // 2
        index = (torch.arange(t, device=x.device)[:, None] + offsets).clamp(0, t - 1)  # [T, w]
        x = x[:, index]  # [B, T, w, L, dim]
        x = torch.cat([x[:, :1].expand(b, r - 1, *x.shape[2:]), x], dim=1)  # first frame fills its latent frame
        x = x.unflatten(1, (-1, r))  # [B, F, r, w, L, dim]
        x = x + self.position[:, :, None].to(x.dtype)
        return x.flatten(2, 3)

    def level_weights(self) -> torch.Tensor:
        return self.level_logits.softmax(dim=-1)

    def inject(self, block: int, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        weights = self.level_weights()[block].to(tokens.dtype)
        mixed = torch.einsum("bfkld,l->bfkd", tokens, weights)
        return hidden + self.attn[block](hidden, mixed, tokens.shape[1])
