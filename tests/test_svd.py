"""The UNet family on a tiny real SVD UNet and VAE: loading through from_pretrained, SVD's conditioning layout,
zero-init, audio and skeleton in the UNet's frame-folded layout, LoRA targets, checkpointing, training runs."""

from pathlib import Path

import pytest
import torch

from prefalign.denoisers import MelAudioEncoder, PixelCodec, SVDDenoiser, SVDVAECodec
from prefalign.denoisers.base import CheckpointWithConditions
from prefalign.lora import LoraSettings
from prefalign.module import AlignmentModule
from prefalign.processes import Diffusion

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "demo" / "sft_svd.yaml"

# TalkingShapes' 17 frames of 32x32 through a per-frame pixel codec: 17 latent frames of 8x8 with 48 channels.
CODEC = {"temporal_ratio": 1, "spatial_ratio": 4}
C = PixelCodec(**CODEC).latent_channels
TINY_UNET = {
    "down_block_types": ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    "up_block_types": ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    "block_out_channels": (32, 64),
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
    "layers_per_block": 1,
    "cross_attention_dim": 16,
    "num_attention_heads": (2, 4),
    "num_frames": 17,
}
TINY_VAE = {
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "block_out_channels": (32, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
}


def save_unet(folder: Path, latent_channels: int = C, **overrides) -> Path:
    """A tiny SVD UNet written the way a diffusers SVD checkpoint holds it (``<folder>/unet``)."""
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    config = {**TINY_UNET, "in_channels": 2 * latent_channels, "out_channels": latent_channels, **overrides}
    UNetSpatioTemporalConditionModel(**config).save_pretrained(folder / "unet")
    return folder


def svd(pretrained: Path, **kwargs) -> SVDDenoiser:
    torch.manual_seed(1)
    options = {
        "codec": PixelCodec(**CODEC),
        "audio_encoder": MelAudioEncoder(),
        "pretrained": str(pretrained),
        "audio_heads": 2,
        "pose_keypoints": 8,
    }
    return SVDDenoiser(**{**options, **kwargs})


def bare_unet(pretrained: Path):
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel.from_pretrained(pretrained, subfolder="unet")


def bare_prediction(unet, x_t: torch.Tensor, t: torch.Tensor, reference: torch.Tensor, fps: float = 25.0):
    """SVD's own call: [B, F, 2C, h, w] (noisy latents, then the reference latent on every frame), a zero image
    embedding and the added time ids (fps − 1, motion bucket 127, noise augmentation 0.02)."""
    b, _, f = x_t.shape[:3]
    sample = torch.cat([x_t, reference.expand(-1, -1, f, -1, -1)], dim=1).transpose(1, 2)
    time_ids = torch.tensor([[fps - 1, 127.0, 0.02]]).expand(b, 3)
    out = unet(sample, t, torch.zeros(b, 1, 16), time_ids, return_dict=False)[0]
    return out.transpose(1, 2)


def randomise(module: torch.nn.Module) -> None:
    """Give zero-initialised output projections random weights (what training would do)."""
    torch.manual_seed(3)
    for param in module.parameters():
        if param.abs().sum() == 0:
            torch.nn.init.normal_(param, std=0.1)


def inputs(denoiser: SVDDenoiser, batch: dict, t: float = 500.0):
    x0 = denoiser.encode_video(batch["video"])
    torch.manual_seed(2)
    return torch.randn_like(x0), torch.full((x0.shape[0],), t), denoiser.condition(batch)


def test_pretrained_unet_with_reference_audio_and_pose(tmp_path, clip_batch):
    """Loaded by folder with from_pretrained; fresh conditioning leaves SVD's own prediction exactly unchanged;
    backward reaches the zero-initialised outputs; once trained, audio and skeleton reach the prediction."""
    folder = save_unet(tmp_path)
    denoiser = svd(folder)
    assert denoiser.required_fields == ("reference", "audio", "pose")
    # One audio attention per spatio-temporal transformer, in forward order: down (32), mid (64), up (32, 32).
    assert [attn.to_q.in_features for attn in denoiser.audio_conditioning.attn] == [32, 64, 32, 32]
    x_t, t, cond = inputs(denoiser, clip_batch)
    assert cond["reference"].shape == (4, C, 1, 8, 8)
    pred = denoiser(x_t, t, cond)
    expected = bare_prediction(bare_unet(folder), x_t, t, cond["reference"])
    torch.testing.assert_close(pred, expected, rtol=0, atol=0)

    pred.pow(2).mean().backward()
    assert denoiser.motion.proj.weight.grad.abs().sum() > 0
    for attn in denoiser.audio_conditioning.attn:
        assert attn.to_out.weight.grad.abs().sum() > 0

    randomise(denoiser.audio_conditioning)
    randomise(denoiser.motion)
    with torch.no_grad():
        pred = denoiser(x_t, t, cond)
        silent = denoiser.drop_conditions(cond, torch.zeros(4, dtype=torch.bool))
        still = {**cond, "pose": cond["pose"][:, :1].expand_as(cond["pose"])}
        assert (pred - denoiser(x_t, t, silent)).abs().max() > 1e-4
        assert (pred - denoiser(x_t, t, still)).abs().max() > 1e-4


def test_audio_and_motion_follow_the_frame_folded_layout(tmp_path):
    """The UNet's hidden states are [B·F, C, h, w]: row b·F + f must get latent frame f's audio and motion."""
    denoiser = SVDDenoiser(PixelCodec(**CODEC), MelAudioEncoder(), config=TINY_UNET, audio_heads=2, pose_keypoints=8)
    randomise(denoiser.audio_conditioning)
    b, f = 2, 5
    torch.manual_seed(0)
    tokens = denoiser.audio_conditioning.tokens(torch.randn(b, f, 1, 160))
    hidden = torch.randn(b * f, 32, 4, 4)
    out = denoiser.inject_audio(0, hidden, tokens)
    changed = tokens.clone()
    changed[1, 3] += 1.0  # sample 1, latent frame 3
    moved = (denoiser.inject_audio(0, hidden, changed) - out).abs().amax(dim=(1, 2, 3))
    assert moved[1 * f + 3] > 0 and moved.sum() == moved[1 * f + 3]

    motion = torch.zeros(b, 32, f, 4, 4)
    motion[1, :, 3] = 1.0
    added = denoiser.add_motion(torch.zeros(b * f, 32, 4, 4), motion)
    assert added[1 * f + 3].eq(1).all() and added.sum() == added[1 * f + 3].sum()


def test_unet_of_other_channels_is_refused(tmp_path):
    save_unet(tmp_path / "t2v", in_channels=C)  # a UNet without the reference channels
    with pytest.raises(ValueError, match=f"takes {C} input channels.*must be {2 * C}"):
        svd(tmp_path / "t2v")
    save_unet(tmp_path / "other", latent_channels=4)
    with pytest.raises(ValueError, match=f"predicts 4 channels but the codec's latents have {C}"):
        svd(tmp_path / "other")


def test_svd_vae_codec_from_pretrained_gives_svds_reference_latent(tmp_path):
    """The real diffusers VAE behind the codec interface; the reference goes in as SVD's pipeline gives it: the
    unscaled latent mode of the image, while the denoised latents are scaled by scaling_factor."""
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(0)
    AutoencoderKLTemporalDecoder(**TINY_VAE).save_pretrained(tmp_path / "vae")
    codec = SVDVAECodec(pretrained=str(tmp_path), subfolder="vae")
    assert (codec.temporal_ratio, codec.spatial_ratio, codec.latent_channels) == (1, 2, 4)
    assert codec.num_latent_frames(17) == 17
    assert not any(p.requires_grad for p in codec.parameters())
    video = torch.rand(2, 5, 3, 16, 16)
    latents = codec.encode(video)
    assert latents.shape == (2, 4, 5, 8, 8)
    vae = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path, subfolder="vae")
    raw = vae.encode(video[1, 2][None] * 2 - 1).latent_dist.mode()[0]
    torch.testing.assert_close(latents[1, :, 2], raw * 0.18215)
    decoded = codec.decode(latents)
    assert decoded.shape == video.shape and 0 <= decoded.min() and decoded.max() <= 1

    save_unet(tmp_path, latent_channels=4)
    denoiser = svd(tmp_path, codec=codec, audio_encoder=None, pose_keypoints=None)
    reference = video[:, 0]
    torch.testing.assert_close(
        denoiser.encode_reference(reference, 5)[:, :, 0], vae.encode(reference * 2 - 1).latent_dist.mode()
    )
    pred = denoiser(
        torch.randn_like(latents), torch.full((2,), 500.0), denoiser.condition({"video": video, "reference": reference})
    )
    assert pred.shape == latents.shape


def test_default_lora_targets_adapt_every_attention_and_feed_forward(tmp_path, clip_batch):
    """Each default target exists in the UNet, every adapter learns (none sits on the zero-context cross-attention),
    and only adapters and the new conditioning modules train."""
    from peft.tuners.lora import LoraLayer

    denoiser = svd(save_unet(tmp_path))
    module = AlignmentModule(denoiser, Diffusion(prediction="v"), lora=LoraSettings(rank=4))
    adapted = [name for name, m in denoiser.backbone.named_modules() if isinstance(m, LoraLayer)]
    for target in SVDDenoiser.default_lora_targets:
        assert any(name.endswith("." + target) for name in adapted), target
    assert not any(".attn2." in name for name in adapted)
    # 4 transformers x (spatial: attn1 4 + ff 2; temporal: attn1 4 + ff 2 + ff_in 2).
    assert len(adapted) == 4 * 14
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith(("denoiser.audio_conditioning.", "denoiser.motion.")) for n in trainable)
    x_t, t, cond = inputs(denoiser, clip_batch)
    denoiser(x_t, t, cond).pow(2).mean().backward()
    for name, param in denoiser.backbone.named_parameters():
        if "lora_B" in name:
            assert param.grad.abs().sum() > 0, name


def test_lora_reference_is_the_bare_pretrained_unet(tmp_path, clip_batch):
    """After training steps move the adapters and the new modules, reference() is SVD's own prediction, exactly."""
    folder = save_unet(tmp_path)
    denoiser = svd(folder)
    module = AlignmentModule(denoiser, Diffusion(prediction="v"), lora=LoraSettings(rank=4))
    x_t, t, cond = inputs(denoiser, clip_batch)
    with torch.no_grad():
        expected = bare_prediction(bare_unet(folder), x_t, t, cond["reference"])
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        loss, _ = module.algorithm.loss(module.policy, clip_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert (denoiser(x_t, t, cond) - expected).abs().max() > 1e-4
    with module.reference() as reference:
        torch.testing.assert_close(reference(x_t, t, cond), expected, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, clip_batch):
    folder = save_unet(tmp_path)
    plain = svd(folder)
    randomise(plain.audio_conditioning)
    randomise(plain.motion)
    checkpointed = svd(folder, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert all(
        m.gradient_checkpointing for m in checkpointed.backbone.modules() if hasattr(m, "gradient_checkpointing")
    )
    assert isinstance(checkpointed.backbone.down_blocks[0]._gradient_checkpointing_func, CheckpointWithConditions)
    x_t, t, cond = inputs(plain, clip_batch)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        out = model(x_t, t, cond)
        # Another forward with other conditions before backward must not leak into the recomputation.
        model(x_t, t, model.drop_conditions(cond, torch.zeros(4, dtype=torch.bool)))
        out.pow(2).mean().backward()
        grads.append({
            "audio": model.audio_conditioning.proj[0].weight.grad.clone(),
            "motion": model.motion.patchify[0].weight.grad.clone(),
            "unet": model.backbone.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.grad.clone(),
        })  # fmt: skip
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_sft_steps_with_the_lightning_trainer(tmp_path, talkingshapes):
    import lightning as L

    from prefalign.data.datamodule import PortraitDataModule

    denoiser = svd(save_unet(tmp_path))
    module = AlignmentModule(denoiser, Diffusion(prediction="v"))
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    data = PortraitDataModule(train=str(talkingshapes), val_fraction=0.0, batch_size=2, num_frames=17)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    after = denoiser.state_dict()
    for key in ("backbone.conv_out.weight", "audio_conditioning.attn.0.to_out.weight", "motion.proj.weight"):
        assert not torch.equal(before[key], after[key]), key


def test_demo_recipe_fits(talkingshapes, tmp_path, monkeypatch):
    """The SVD demo recipe through the CLI for 2 steps on the fixture data (no validation, no loggers)."""
    from prefalign.cli import main

    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", str(RECIPE), "--trainer.max_steps", "2", "--data.train", str(talkingshapes),
        "--data.val", str(talkingshapes), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
    ])  # fmt: skip
    assert len(list(tmp_path.rglob("last.ckpt"))) == 1
