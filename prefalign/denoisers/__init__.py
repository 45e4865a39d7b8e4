"""Portrait denoisers: diffusers video backbones with reference, speech and skeleton conditioning."""

from prefalign.denoisers.audio import AudioEncoder, MelAudioEncoder
from prefalign.denoisers.base import PortraitDenoiser
from prefalign.denoisers.codecs import Codec, PixelCodec, WanVAECodec
from prefalign.denoisers.wan import WanDenoiser

__all__ = ["AudioEncoder", "Codec", "MelAudioEncoder", "PixelCodec", "PortraitDenoiser", "WanDenoiser", "WanVAECodec"]
