"""Portrait denoisers: diffusers video backbones with reference, speech and skeleton conditioning."""

from prefalign.denoisers.audio import AudioEncoder, MelAudioEncoder, Wav2Vec2AudioEncoder
from prefalign.denoisers.base import PortraitDenoiser
from prefalign.denoisers.codecs import Codec, PixelCodec, SVDVAECodec, WanVAECodec
from prefalign.denoisers.hallo4 import Hallo4Denoiser
from prefalign.denoisers.svd import SVDDenoiser
from prefalign.denoisers.wan import WanDenoiser

__all__ = [
    "AudioEncoder",
    "Codec",
    "Hallo4Denoiser",
    "MelAudioEncoder",
    "PixelCodec",
    "PortraitDenoiser",
    "SVDDenoiser",
    "SVDVAECodec",
    "WanDenoiser",
    "WanVAECodec",
    "Wav2Vec2AudioEncoder",
]
