"""Shared fixtures: no network, tiny real models, a small TalkingShapes dataset written to disk."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from prefalign.data.synthetic import TalkingShapesConfig, write_dataset  # noqa: E402
from prefalign.denoisers import MelAudioEncoder, PixelCodec, WanDenoiser  # noqa: E402

# Tiny checkpoints in the real on-disk layouts (tests/layouts.py), as session fixtures for every test module.
from layouts import hallo4_dir, hallo4_release_file, svd_xt_dir, wan_i2v_14b_dir, wav2vec2_base_960h_dir  # noqa: E402, F401

TINY_WAN = dict(
    patch_size=(1, 1, 1),
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=16,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    rope_max_seq_len=32,
)


#: ``tiny_wan()`` as a recipe's ``model.denoiser`` entry (YAML-safe: lists, not tuples).
TINY_WAN_RECIPE = {
    "class_path": "prefalign.denoisers.WanDenoiser",
    "init_args": {
        "codec": {"class_path": "prefalign.denoisers.PixelCodec"},
        "audio_encoder": {"class_path": "prefalign.denoisers.MelAudioEncoder"},
        "config": dict(TINY_WAN, patch_size=list(TINY_WAN["patch_size"])),
        "audio_heads": 2,
    },
}


def tiny_wan(**kwargs) -> WanDenoiser:
    """A 2-block Wan DiT at 32x32 pixels through the pixel codec, with mel audio conditioning."""
    torch.manual_seed(0)
    options = dict(codec=PixelCodec(), audio_encoder=MelAudioEncoder(), config=TINY_WAN, audio_heads=2)
    options.update(kwargs)
    return WanDenoiser(**options)


@pytest.fixture(scope="session")
def talkingshapes(tmp_path_factory) -> Path:
    """A 12-clip TalkingShapes dataset (17 frames, 32x32, 25 fps) in the real data schema."""
    out = tmp_path_factory.mktemp("talkingshapes")
    return write_dataset(out, num_clips=12, seed=0, cfg=TalkingShapesConfig())


@pytest.fixture
def clip_batch(talkingshapes):
    """One decoded batch of 4 clips from the dataset on disk."""
    from prefalign.data.datamodule import PortraitDataModule

    dm = PortraitDataModule(train=str(talkingshapes), val_fraction=0.25, batch_size=4, num_frames=17)
    return next(iter(dm.train_dataloader()))


def quiet_trainer(**kwargs):
    """A CPU Trainer without logger, checkpoints, progress bar, summary or validation (tests that fit a few steps)."""
    import lightning as L

    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0)
    options.update(kwargs)
    return L.Trainer(**options)
