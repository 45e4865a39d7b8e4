"""Speech conditioning: audio encoders that give features per video frame, and per-block audio cross-attention.

Each latent frame attends only to the audio of its own video frames (a window of ``window`` frames around
each of them), as Hallo4 and ReFree-S2V inject speech; a learnable level selector per block mixes the
encoder's levels (ReFree-S2V's multi-level speech representation).
"""

from __future__ import annotations

import contextlib
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


def mel_filterbank(
    n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
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
    """Cross-attention from the video tokens of one latent frame to that frame's audio tokens; zero output at init.

    Args:
        dim (int): the block's hidden size (queries and output).
        token_dim (int): the audio tokens' size (keys and values are projected from it).
        heads (int): attention heads.
    """

    def __init__(self, dim: int, token_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"audio attention: dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(token_dim, dim)
        self.to_v = nn.Linear(token_dim, dim)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """``hidden [B, F, S, dim]`` (the S video tokens of each latent frame), ``audio [B, F, K, token_dim]``
        → the residual to add, ``[B, F, S, dim]``."""
        b, f, s, d = hidden.shape
        h = self.heads
        # In this module's dtype (float32 when trained over a bf16 base; autocast, where on, still computes in bf16).
        dtype = self.to_q.weight.dtype
        x = self.norm(hidden.float()).to(dtype).reshape(b * f, s, d)
        a = audio.reshape(b * f, audio.shape[2], audio.shape[3]).to(dtype)
        q = self.to_q(x).unflatten(-1, (h, d // h)).transpose(1, 2)
        k = self.to_k(a).unflatten(-1, (h, d // h)).transpose(1, 2)
        v = self.to_v(a).unflatten(-1, (h, d // h)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.to_out(out).reshape(b, f, s, d).to(hidden.dtype)


class AudioConditioning(nn.Module):
    """Turns per-frame audio features into per-latent-frame tokens and injects them after every backbone block.

    A latent frame's tokens are the local windows of its ``temporal_ratio`` video frames (phonetic detail) and,
    with ``pooled_token``, one utterance-level token pooled over the whole clip (prosody), as ReFree-S2V's
    multi-level speech representation has it. Each block mixes the encoder's levels with its own softmax
    selector (uniform at init) and cross-attends to the mix.

    Args:
        feature_dim (int): the audio encoder's feature size ``D``.
        num_levels (int): the audio encoder's levels ``L`` (wav2vec2 layers, or 1 for mel).
        dims (list[int]): hidden size of each backbone block that gets an audio cross-attention and a selector
            (all equal in a DiT; per resolution in a UNet).
        heads (int): attention heads of the audio cross-attention.
        window (int): video frames of audio each frame sees (centred; Hallo4 uses 5).
        temporal_ratio (int): video frames per latent frame (the codec's).
        pooled_token (bool): add the clip-level pooled (prosodic) token to every latent frame's tokens.
        token_dim (int | None): size of the audio tokens; defaults to the largest block size.
    """

    def __init__(
        self,
        feature_dim: int,
        num_levels: int,
        dims: list[int],
        heads: int,
        window: int,
        temporal_ratio: int,
        pooled_token: bool = False,
        token_dim: int | None = None,
    ):
        super().__init__()
        if window % 2 == 0:
            raise ValueError(f"audio window must be odd (centred on its frame), got {window}")
        token_dim = token_dim or max(dims)
        self.window = window
        self.temporal_ratio = temporal_ratio
        self.proj = nn.Sequential(
            nn.Linear(feature_dim, token_dim), nn.GELU(), nn.Linear(token_dim, token_dim), nn.LayerNorm(token_dim)
        )
        # Which of the latent frame's video frames, and which offset in the window, a token is.
        self.position = nn.Parameter(torch.randn(temporal_ratio, window, token_dim) * 0.02)
        self.pooled = nn.Parameter(torch.randn(token_dim) * 0.02) if pooled_token else None
        # Level selectors: uniform softmax at init (ReFree-S2V).
        self.level_logits = nn.Parameter(torch.zeros(len(dims), num_levels))
        self.attn = nn.ModuleList(AudioCrossAttention(dim, token_dim, heads) for dim in dims)

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, T, L, D]`` per video frame → ``[B, F, K, L, token_dim]`` per latent frame, ``K = r·window (+1)``."""
        b, t, levels, _ = features.shape
        r, w = self.temporal_ratio, self.window
        x = self.proj(features.to(self.position.dtype))  # [B, T, L, dim]; linear in the level mix, so project each level once
        offsets = torch.arange(w, device=x.device) - w // 2
        index = (torch.arange(t, device=x.device)[:, None] + offsets).clamp(0, t - 1)  # [T, w]
        local = x[:, index]  # [B, T, w, L, dim]
        local = torch.cat([local[:, :1].expand(b, r - 1, *local.shape[2:]), local], dim=1)  # frame 0 fills its group
        local = local.unflatten(1, (-1, r))  # [B, F, r, w, L, dim]
        local = (local + self.position[:, :, None].to(x.dtype)).flatten(2, 3)
        if self.pooled is None:
            return local
        pooled = x.mean(dim=1) + self.pooled.to(x.dtype)  # [B, L, dim]: the whole utterance
        pooled = pooled[:, None, None].expand(b, local.shape[1], 1, *pooled.shape[1:])
        return torch.cat([local, pooled], dim=2)

    def level_weights(self) -> torch.Tensor:
        return self.level_logits.softmax(dim=-1)

    def inject(self, block: int, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Add block ``block``'s audio attention to ``hidden [B, F, S, dim]`` (tokens grouped by latent frame)."""
        weights = self.level_weights()[block].to(tokens.dtype)
        mixed = torch.einsum("bfkld,l->bfkd", tokens, weights)
        return hidden + self.attn[block](hidden, mixed)


class Wav2Vec2AudioEncoder(AudioEncoder):
    """Every hidden layer of a wav2vec2 model, resampled from its 50 Hz feature rate to the video frames.

    ReFree-S2V's multi-level speech representation (and Hallo's audio features): level 0 is the transformer's
    input (the CNN features, projected, plus the positional convolution), level ``k`` the output of transformer
    layer ``k``; the per-block level selectors of ``AudioConditioning`` choose among them. Features are
    interpolated linearly in time so that video frame ``f`` gets the features at the centre of its span
    ``[f/fps, (f+1)/fps)``, each wav2vec2 feature being placed at the centre of its receptive field.

    Frozen (the default in ``PortraitDenoiser``) the model runs without a graph and always in eval mode, so
    dropout never acts; trained (``train_audio_encoder``) it follows the module's train/eval mode. LayerDrop and
    SpecAugment are switched off in both cases: they change which features a level holds (with LayerDrop a
    skipped layer loses its level), not just how noisy they are.

    Args:
        pretrained (str | None): Hub id or local folder of a wav2vec2 checkpoint (``Wav2Vec2Model.from_pretrained``),
            e.g. ``facebook/wav2vec2-base-960h``.
        config (dict | None): ``Wav2Vec2Config`` arguments to build a randomly initialised model (tests).
        layers (list[int] | None): the levels to keep, indices into ``0..num_hidden_layers`` (negative ones count
            from the end); ``None`` keeps all ``num_hidden_layers + 1``.
        normalize (bool): normalise each clip to zero mean and unit variance, as ``Wav2Vec2FeatureExtractor``
            does for the checkpoints that expect it (``do_normalize`` in their preprocessor config).
        torch_dtype (str): the model's weights' dtype (``float32``, ``bfloat16``).
        resample (str): where the 50 Hz features meet the video's frame rate: ``"hidden"`` (above: every level is
            interpolated to the frames' centres) or ``"features"`` (Hallo's and Hallo4's way: the CNN features are
            linearly interpolated to the frame count, ends aligned, and the transformer runs at the frame rate;
            use it with a model trained so, e.g. ``Hallo4Denoiser`` with ``layers: [1, ..., 12]``).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict | None = None,
        layers: list[int] | None = None,
        normalize: bool = True,
        torch_dtype: str = "float32",
        resample: str = "hidden",
    ):
        super().__init__()
        import transformers
        from packaging.version import Version
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        if (pretrained is None) == (config is None):
            raise ValueError("Wav2Vec2AudioEncoder needs exactly one of `pretrained` (a Hub id or folder) or `config`")
        if resample not in ("hidden", "features"):
            raise ValueError(f"Wav2Vec2AudioEncoder resample must be 'hidden' or 'features', got {resample!r}")
        self.resample = resample
        dtype = getattr(torch, torch_dtype)
        if pretrained is not None:
            # transformers 4.56 renamed `torch_dtype` to `dtype` and 5.x warns on the old name.
            key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
            self.model = Wav2Vec2Model.from_pretrained(pretrained, **{key: dtype})
        else:
            self.model = Wav2Vec2Model(Wav2Vec2Config(**config)).to(dtype)
        cfg = self.model.config
        cfg.layerdrop = 0.0
        cfg.apply_spec_augment = False
        if getattr(self.model, "masked_spec_embed", None) is not None:
            # Unused without SpecAugment; a trainable parameter that never gets a gradient stalls DDP.
            self.model.masked_spec_embed.requires_grad_(False)
        self.model.eval()

        total = cfg.num_hidden_layers + 1
        if layers is not None:
            if not layers or any(not -total <= i < total for i in layers):
                raise ValueError(
                    f"audio encoder layers {layers} must be a non-empty list of indices into 0..{total - 1}"
                )
            layers = [i % total for i in layers]
        self.layers = layers
        self.normalize = normalize
        self.sample_rate = 16000
        self.num_levels = total if layers is None else len(layers)
        self.feature_dim = cfg.hidden_size
        # The CNN's hop and receptive field in samples (320 and 400 for every released wav2vec2).
        self.stride = math.prod(cfg.conv_stride)
        self.receptive_field = 1
        hop = 1
        for kernel, stride in zip(cfg.conv_kernel, cfg.conv_stride):
            self.receptive_field += (kernel - 1) * hop
            hop *= stride

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    def train(self, mode: bool = True) -> Wav2Vec2AudioEncoder:
        super().train(mode)
        self.model.train(mode and self.trainable)
        return self

    def forward(self, audio: torch.Tensor, num_frames: int, fps: float) -> torch.Tensor:
        if audio.dim() != 2:
            raise DataError(f"audio must be mono, [batch, samples]; got shape {tuple(audio.shape)}", field="audio")
        samples_per_frame = self.sample_rate / fps
        need = round(num_frames * samples_per_frame)
        rf, ms = self.receptive_field, 1000 * self.receptive_field / self.sample_rate
        if audio.shape[-1] < rf:
            raise DataError(
                f"the audio has {audio.shape[-1]} samples; wav2vec2 needs at least {rf} ({ms:g} ms at "
                f"{self.sample_rate} Hz) for one feature",
                field="audio",
            )
        if need < rf:
            raise DataError(
                f"{num_frames} frames at {fps:g} fps span {need} samples of audio; wav2vec2 needs at least {rf} "
                f"({ms:g} ms at {self.sample_rate} Hz) for one feature",
                field="audio",
            )
        audio = audio[..., :need].float()
        if self.normalize:  # as Wav2Vec2FeatureExtractor: before padding, so padding is the mean
            variance = audio.var(dim=-1, keepdim=True, unbiased=False)
            audio = (audio - audio.mean(dim=-1, keepdim=True)) / torch.sqrt(variance + 1e-7)
        audio = self.frame_aligned(audio, num_frames, samples_per_frame)

        trainable = self.trainable
        mode = self.training and trainable
        if self.model.training != mode:  # requires_grad may have changed since the last train()
            self.model.train(mode)
        weight = next(self.model.parameters())
        with contextlib.nullcontext() if trainable else torch.no_grad():
            audio = audio.to(device=weight.device, dtype=weight.dtype)
            if self.resample == "features":
                return self.frame_rate_levels(audio, num_frames)
            out = self.model(audio, output_hidden_states=True)
            hidden = out.hidden_states if self.layers is None else [out.hidden_states[i] for i in self.layers]
            hidden = torch.stack(hidden, dim=2).float()  # [B, N, L, D] at the feature rate
            return self.to_frames(hidden, num_frames, samples_per_frame)

    def frame_rate_levels(self, audio: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``resample="features"``: the CNN features interpolated to ``num_frames`` (linear, first and last aligned)
        by a hook on the feature encoder, so that the model projects and encodes them at that rate → the kept
        levels ``[B, T, L, D]``."""

        def to_frame_rate(module, args, features):  # [B, C, N] at 50 Hz → [B, C, T]
            return F.interpolate(features, size=num_frames, mode="linear", align_corners=True)

        handle = self.model.feature_extractor.register_forward_hook(to_frame_rate)
        try:
            out = self.model(audio, output_hidden_states=True)
        finally:
            handle.remove()
        levels = out.hidden_states if self.layers is None else [out.hidden_states[i] for i in self.layers]
        return torch.stack(levels, dim=2).float()

    def to_frames(self, hidden: torch.Tensor, num_frames: int, samples_per_frame: float) -> torch.Tensor:
        """Features ``[B, N, L, D]`` at the CNN's rate → ``[B, T, L, D]`` at the video frames' centres."""
        n = hidden.shape[1]
        centres = (torch.arange(num_frames, device=hidden.device, dtype=torch.float64) + 0.5) * samples_per_frame
        position = ((centres - self.receptive_field / 2) / self.stride).clamp(0, n - 1)
        lower = position.floor().long()
        upper = (lower + 1).clamp(max=n - 1)
        w = (position - lower).to(hidden.dtype)[None, :, None, None]
        return hidden[:, lower] * (1 - w) + hidden[:, upper] * w
