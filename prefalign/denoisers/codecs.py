"""Codecs map pixel videos to the latents a backbone denoises and back: a lossless pixel codec, Wan's and SVD's VAEs."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from prefalign.data.errors import DataError


class Codec(nn.Module):
    """The codec contract, shared by every backbone.

    Videos are ``[B, T, 3, H, W]`` floats in [0, 1] (the framework's pixel layout); latents are
    ``[B, C, F, h, w]`` as diffusers video models take them. Like Wan's VAE, the first frame is
    encoded on its own and every further ``temporal_ratio`` frames become one latent frame, so a
    clip has ``T = temporal_ratio * n + 1`` frames and ``F = n + 1`` latent frames.
    """

    temporal_ratio: int = 1
    spatial_ratio: int = 1
    latent_channels: int = 3

    def num_latent_frames(self, num_frames: int) -> int:
        r = self.temporal_ratio
        if num_frames < 1 or (num_frames - 1) % r:
            raise DataError(
                f"{num_frames} frames cannot be encoded: this codec takes {r}·n+1 frames (e.g. {r * 4 + 1})",
                field="video",
            )
        return (num_frames - 1) // r + 1

    def num_frames(self, num_latent_frames: int) -> int:
        return (num_latent_frames - 1) * self.temporal_ratio + 1

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        s = self.spatial_ratio
        if height % s or width % s:
            raise DataError(f"frame size {height}x{width} is not divisible by the codec's {s}", field="video")
        return height // s, width // s

    def pool_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A pixel mask ``[B, T, H, W]`` → ``[B, 1, F, h, w]``: a latent pixel is in if any pixel it encodes is."""
        b, t, h, w = mask.shape
        r, s = self.temporal_ratio, self.spatial_ratio
        f = self.num_latent_frames(t)
        hh, ww = self.latent_size(h, w)
        m = torch.cat([mask[:, :1].expand(b, r - 1, h, w), mask], dim=1).float()
        return m.reshape(b, f, r, hh, s, ww, s).amax(dim=(2, 4, 6)).unsqueeze(1)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelCodec(Codec):
    """A lossless, weight-free codec: space-time-to-depth of the pixels scaled to [-1, 1].

    It has the same interface and compression ratios as a video VAE, so the demo and the tests
    exercise every shape a real backbone sees, without weights. The first frame is replicated
    ``temporal_ratio`` times to fill its latent frame, as Wan's causal VAE treats it.

    Args:
        temporal_ratio (int): frames folded into one latent frame.
        spatial_ratio (int): pixels folded into one latent pixel along each side.
    """

    def __init__(self, temporal_ratio: int = 4, spatial_ratio: int = 4):
        super().__init__()
        self.temporal_ratio = temporal_ratio
        self.spatial_ratio = spatial_ratio
        self.latent_channels = 3 * temporal_ratio * spatial_ratio**2

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = video.shape
        f = self.num_latent_frames(t)
        hh, ww = self.latent_size(h, w)
        r, s = self.temporal_ratio, self.spatial_ratio
        x = video * 2 - 1
        x = torch.cat([x[:, :1].expand(b, r - 1, c, h, w), x], dim=1)  # [B, r*F, C, H, W]
        x = x.reshape(b, f, r, c, hh, s, ww, s)
        x = x.permute(0, 2, 3, 5, 7, 1, 4, 6)  # [B, r, C, s, s, F, h, w]
        return x.reshape(b, r * c * s * s, f, hh, ww)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, f, hh, ww = latents.shape
        r, s = self.temporal_ratio, self.spatial_ratio
        x = latents.reshape(b, r, 3, s, s, f, hh, ww).permute(0, 5, 1, 2, 6, 3, 7, 4)
        x = x.reshape(b, f, r, 3, hh * s, ww * s)
        # The first latent frame holds r copies of frame 0: their mean is the best estimate of it.
        first = x[:, 0].mean(dim=1, keepdim=True)
        video = torch.cat([first, x[:, 1:].flatten(1, 2)], dim=1)
        return ((video + 1) / 2).clamp(0, 1)


class VAECodec(Codec):
    """A codec around a frozen diffusers VAE (``self.vae``), loaded with ``from_pretrained`` or built from a config."""

    vae: nn.Module

    def load_vae(self, vae_class, pretrained, subfolder, config, torch_dtype: str) -> None:
        if (pretrained is None) == (config is None):
            name = type(self).__name__
            raise ValueError(f"{name} needs exactly one of `pretrained` (a Hub id or folder) or `config`")
        dtype = getattr(torch, torch_dtype)
        if pretrained is not None:
            vae = vae_class.from_pretrained(pretrained, subfolder=subfolder, torch_dtype=dtype)
        else:
            vae = vae_class(**config).to(dtype)
        self.vae = vae.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: never in training mode
        return self


class WanVAECodec(VAECodec):
    """Wan's causal video VAE (diffusers ``AutoencoderKLWan``), frozen, with its latent normalisation.

    Args:
        pretrained (str | None): Hub id or local folder of a diffusers checkpoint, e.g.
            ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers``; loaded with ``from_pretrained``.
        subfolder (str | None): the VAE's subfolder inside ``pretrained``.
        config (dict | None): build a (tiny) VAE from these ``AutoencoderKLWan`` arguments instead.
        torch_dtype (str): weights' dtype, e.g. ``float32`` or ``bfloat16``.
        sample (bool): encode to a posterior sample instead of its mode.
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        subfolder: Optional[str] = "vae",
        config: Optional[dict] = None,
        torch_dtype: str = "float32",
        sample: bool = False,
    ):
        super().__init__()
        import diffusers

        self.load_vae(diffusers.AutoencoderKLWan, pretrained, subfolder, config, torch_dtype)
        cfg = self.vae.config
        self.temporal_ratio = cfg.scale_factor_temporal or 2 ** sum(cfg.temperal_downsample)
        self.spatial_ratio = cfg.scale_factor_spatial or 2 ** len(cfg.temperal_downsample)
        self.latent_channels = cfg.z_dim
        self.sample = sample
        shape = (1, cfg.z_dim, 1, 1, 1)
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std).view(shape), persistent=False)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.num_latent_frames(video.shape[1])
        self.latent_size(*video.shape[-2:])
        x = (video * 2 - 1).permute(0, 2, 1, 3, 4).to(self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample() if self.sample else dist.mode()
        return ((z.float() - self.mean) / self.std).to(video.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents.float() * self.std + self.mean).to(self.vae.dtype)
        x = self.vae.decode(z).sample.float()
        return ((x.permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)


class SVDVAECodec(VAECodec):
    """Stable Video Diffusion's VAE (diffusers ``AutoencoderKLTemporalDecoder``), frozen: frames are encoded one by
    one (temporal ratio 1) and decoded together by its temporal decoder; latents are scaled by ``scaling_factor``.

    Args:
        pretrained (str | None): Hub id or local folder of a diffusers checkpoint, e.g.
            ``stabilityai/stable-video-diffusion-img2vid-xt``; loaded with ``from_pretrained``.
        subfolder (str | None): the VAE's subfolder inside ``pretrained``.
        config (dict | None): build a (tiny) VAE from these ``AutoencoderKLTemporalDecoder`` arguments instead.
        torch_dtype (str): weights' dtype, e.g. ``float32`` or ``bfloat16``.
        sample (bool): encode to a posterior sample instead of its mode.
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        subfolder: Optional[str] = "vae",
        config: Optional[dict] = None,
        torch_dtype: str = "float32",
        sample: bool = False,
    ):
        super().__init__()
        import diffusers

        self.load_vae(diffusers.AutoencoderKLTemporalDecoder, pretrained, subfolder, config, torch_dtype)
        cfg = self.vae.config
        self.temporal_ratio = 1
        self.spatial_ratio = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = cfg.latent_channels
        self.scaling_factor = cfg.scaling_factor
        self.sample = sample

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.num_latent_frames(video.shape[1])
        self.latent_size(*video.shape[-2:])
        b, t = video.shape[:2]
        x = (video * 2 - 1).flatten(0, 1).to(self.vae.dtype)  # the encoder sees single images
        dist = self.vae.encode(x).latent_dist
        z = dist.sample() if self.sample else dist.mode()
        z = z.unflatten(0, (b, t)).transpose(1, 2)  # [B, C, F, h, w]
        return (z.float() * self.scaling_factor).to(video.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, f = latents.shape[:3]
        z = (latents.float() / self.scaling_factor).transpose(1, 2).flatten(0, 1).to(self.vae.dtype)
        x = self.vae.decode(z, num_frames=f).sample.float()  # its temporal layers mix the f frames of each clip
        return ((x.unflatten(0, (b, f)) + 1) / 2).clamp(0, 1)
