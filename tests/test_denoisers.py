"""The portrait denoiser on a tiny real Wan DiT: codec, audio conditioning, zero-init, hooks, checkpointing."""

import copy

import torch

from prefalign.denoisers import PixelCodec
from prefalign.denoisers.audio import MelAudioEncoder

from conftest import tiny_wan


def test_pixel_codec_is_lossless_and_wan_shaped():
    codec = PixelCodec(temporal_ratio=4, spatial_ratio=4)
    video = torch.rand(2, 17, 3, 32, 32)
    latents = codec.encode(video)
    assert latents.shape == (2, 3 * 4 * 16, 5, 8, 8)  # 4n+1 frames -> n+1 latent frames, like Wan's VAE
    assert torch.allclose(codec.decode(latents), video, atol=1e-6)
    # Latent frame k>0 holds frames 4k-3..4k: changing frame 5 touches latent frame 2 only.
    changed = video.clone()
    changed[:, 5] = 0
    diff = (codec.encode(changed) - latents).abs().sum(dim=(0, 1, 3, 4))
    assert diff[2] > 0 and diff[[0, 1, 3, 4]].sum() == 0


def test_codec_rejects_wrong_frame_counts():
    import pytest

    from prefalign.data.errors import DataError

    with pytest.raises(DataError, match=r"4·n\+1"):
        PixelCodec().encode(torch.rand(1, 16, 3, 32, 32))


def test_mel_features_follow_loudness():
    encoder = MelAudioEncoder()
    t = torch.arange(17 * 640) / 16000
    tone = torch.sin(2 * torch.pi * 200 * t)
    gate = (torch.arange(17) % 2 == 0).float().repeat_interleave(640)  # loud on even frames only
    feats = encoder((tone * gate)[None], num_frames=17, fps=25)
    assert feats.shape == (1, 17, 1, 160)
    energy = feats[0, :, 0].mean(dim=-1)
    assert (energy[2:15:2] > energy[3:16:2]).all()


def test_forward_backward_with_reference_and_audio(clip_batch):
    denoiser = tiny_wan()
    x0 = denoiser.encode_video(clip_batch["video"])
    cond = denoiser.condition(clip_batch)
    pred = denoiser(torch.randn_like(x0), torch.full((4,), 500.0), cond)
    assert pred.shape == x0.shape
    pred.pow(2).mean().backward()
    attn = denoiser.audio_conditioning.attn[0]
    assert attn.to_out.weight.grad.abs().sum() > 0  # the zero-initialised output learns
    assert denoiser.backbone.patch_embedding.weight.grad.abs().sum() > 0


def test_new_audio_modules_start_at_zero_output(clip_batch):
    """Fresh conditioning leaves the backbone's prediction unchanged: same output with or without audio."""
    denoiser = tiny_wan()
    x0 = denoiser.encode_video(clip_batch["video"])
    cond = denoiser.condition(clip_batch)
    x_t, t = torch.randn_like(x0), torch.full((4,), 300.0)
    with_audio = denoiser(x_t, t, cond)
    without = denoiser(x_t, t, {k: v for k, v in cond.items() if k != "audio"})
    torch.testing.assert_close(with_audio, without, rtol=0, atol=0)


def test_audio_reaches_the_output_once_trained(clip_batch):
    denoiser = tiny_wan()
    for attn in denoiser.audio_conditioning.attn:
        torch.nn.init.normal_(attn.to_out.weight, std=0.1)
    x0 = denoiser.encode_video(clip_batch["video"])
    cond = denoiser.condition(clip_batch)
    x_t, t = torch.randn_like(x0), torch.full((4,), 300.0)
    silent = denoiser.drop_conditions(cond, torch.zeros(4, dtype=torch.bool))
    assert (denoiser(x_t, t, cond) - denoiser(x_t, t, silent)).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_gradients(clip_batch):
    plain = tiny_wan()
    for attn in plain.audio_conditioning.attn:
        torch.nn.init.normal_(attn.to_out.weight, std=0.1)
    checkpointed = tiny_wan(gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x0 = plain.encode_video(clip_batch["video"])
    x_t, t = torch.randn_like(x0), torch.full((4,), 300.0)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        cond = model.condition(clip_batch)
        out = model(x_t, t, cond)
        # Another forward with other conditions before backward must not leak into the recomputation.
        model(x_t, t, model.drop_conditions(cond, torch.zeros(4, dtype=torch.bool)))
        out.pow(2).mean().backward()
        grads.append(model.audio_conditioning.proj[0].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_deepcopy_hooks_point_at_the_copy(clip_batch):
    original = tiny_wan()
    for attn in original.audio_conditioning.attn:
        torch.nn.init.normal_(attn.to_out.weight, std=0.1)
    clone = copy.deepcopy(original)
    x0 = original.encode_video(clip_batch["video"])
    cond = original.condition(clip_batch)
    x_t, t = torch.randn_like(x0), torch.full((4,), 300.0)
    before = clone(x_t, t, cond)
    with torch.no_grad():
        for attn in original.audio_conditioning.attn:
            attn.to_out.weight.zero_()  # changing the original must not change the copy
    torch.testing.assert_close(clone(x_t, t, cond), before)


def test_from_pretrained_round_trip(tmp_path, clip_batch):
    """The real loading path: save a tiny Wan transformer, load it back by folder with from_pretrained."""
    built = tiny_wan()
    built.backbone.save_pretrained(tmp_path / "transformer")
    loaded = tiny_wan(config=None, pretrained=str(tmp_path))
    loaded.audio_conditioning.load_state_dict(built.audio_conditioning.state_dict())
    x0 = built.encode_video(clip_batch["video"])
    cond = built.condition(clip_batch)
    x_t, t = torch.randn_like(x0), torch.full((4,), 700.0)
    torch.testing.assert_close(loaded(x_t, t, cond), built(x_t, t, cond))


def test_wan_vae_codec_from_pretrained_has_the_codec_interface(tmp_path):
    """The real diffusers VAE behind the same interface: a tiny AutoencoderKLWan saved and loaded back."""
    from diffusers import AutoencoderKLWan

    from prefalign.denoisers import WanVAECodec

    config = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                  latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    torch.manual_seed(0)
    AutoencoderKLWan(**config).save_pretrained(tmp_path / "vae")
    codec = WanVAECodec(pretrained=str(tmp_path), subfolder="vae")
    assert (codec.temporal_ratio, codec.spatial_ratio, codec.latent_channels) == (4, 8, 4)
    assert not any(p.requires_grad for p in codec.parameters())
    video = torch.rand(1, 9, 3, 16, 16)
    latents = codec.encode(video)
    assert latents.shape == (1, 4, 3, 2, 2)
    decoded = codec.decode(latents)
    assert decoded.shape == video.shape and 0 <= decoded.min() and decoded.max() <= 1
    denoiser = tiny_wan(codec=codec)
    pred = denoiser(torch.randn_like(latents), torch.full((1,), 500.0),
                    denoiser.condition({"video": video, "audio": torch.randn(1, 9 * 640), "reference": video[:, 0]}))
    assert pred.shape == latents.shape
