"""Issue 3 on the DiT family: temporal motion modulation, Wan I2V and T2V checkpoints through from_pretrained,
zero-init on a pretrained backbone, LoRA's reference with the new modules."""

import pytest
import torch

from prefalign.data.errors import DataError
from prefalign.denoisers import PixelCodec
from prefalign.denoisers.motion import MotionModulation, render_keypoints
from prefalign.lora import LoraSettings
from prefalign.module import AlignmentModule
from prefalign.processes import FlowMatching

from conftest import TINY_WAN, tiny_wan

C, R = PixelCodec().latent_channels, 4  # 192 latent channels, 4 frames per latent frame


def randomise(module: torch.nn.Module) -> None:
    """Give zero-initialised output projections random weights (what training would do)."""
    torch.manual_seed(3)
    for name, param in module.named_parameters():
        if param.abs().sum() == 0:
            torch.nn.init.normal_(param, std=0.1)


def test_keypoint_maps_peak_at_the_keypoint():
    pose = torch.tensor([[[[8.5 / 32, 12.5 / 16], [0.9, 0.1]]]])  # [B=1, T=1, K=2, 2]: pixel (row 12, col 8)
    maps = render_keypoints(pose, 16, 32, sigma=1.0)
    assert maps.shape == (1, 1, 2, 16, 32)
    peak = maps[0, 0, 0].flatten().argmax()
    assert (peak // 32, peak % 32) == (12, 8)
    assert maps[0, 0, 1].flatten().argmax() // 32 == 1


def test_frames_inside_a_latent_group_are_kept_apart():
    """Channel stacking carries every frame: swapping two frames of one latent group changes that group's token."""
    torch.manual_seed(0)
    motion = MotionModulation(num_keypoints=8, dim=32, temporal_ratio=4, stride=4)
    randomise(motion)
    pose = torch.rand(2, 17, 8, 2)
    tokens = motion(pose, 32, 32)
    assert tokens.shape == (2, 32, 5, 8, 8)
    swapped = pose.clone()
    swapped[:, [5, 6]] = pose[:, [6, 5]]  # frames 5 and 6 both belong to latent frame 2 (frames 5..8)
    changed = (motion(swapped, 32, 32) - tokens).abs().amax(dim=(0, 1, 3, 4))
    assert changed[2] > 1e-3
    assert changed[[0, 1, 3, 4]].max() == 0
    # The first latent frame is frame 0 alone (replicated), as a causal video VAE encodes it.
    moved = pose.clone()
    moved[:, 0] += 0.1
    assert (motion(moved, 32, 32) - tokens)[:, :, 0].abs().max() > 1e-3


def test_motion_with_one_frame_per_latent_frame():
    motion = MotionModulation(num_keypoints=8, dim=16, temporal_ratio=1, stride=8)
    randomise(motion)
    pose = torch.rand(1, 6, 8, 2)
    tokens = motion(pose, 32, 32)
    assert tokens.shape == (1, 16, 6, 4, 4)
    later = pose.clone()
    later[:, 3] = 0.5
    changed = (motion(later, 32, 32) - tokens).abs().amax(dim=(0, 1, 3, 4))
    assert changed[3] > 0 and changed[[0, 1, 2, 4, 5]].max() == 0


def test_pose_errors_name_the_field():
    motion = MotionModulation(num_keypoints=8, dim=32, temporal_ratio=4, stride=4)
    with pytest.raises(DataError, match="keypoints") as error:
        motion(torch.rand(1, 17, 5, 2), 32, 32)
    assert error.value.field == "pose"
    with pytest.raises(DataError, match=r"4·n\+1"):
        motion(torch.rand(1, 16, 8, 2), 32, 32)


def test_wan_with_reference_audio_and_pose_forward_backward(clip_batch):
    denoiser = tiny_wan(pose_keypoints=8)
    assert denoiser.required_fields == ("reference", "audio", "pose")
    x0 = denoiser.encode_video(clip_batch["video"])
    cond = denoiser.condition(clip_batch)
    x_t, t = torch.randn_like(x0), torch.full((4,), 500.0)
    pred = denoiser(x_t, t, cond)
    # Zero-init: fresh motion and audio modules leave the prediction exactly as without them.
    bare = denoiser(x_t, t, {"reference": cond["reference"], "num_frames": 17})
    torch.testing.assert_close(pred, bare, rtol=0, atol=0)
    pred.pow(2).mean().backward()
    assert denoiser.motion.proj.weight.grad.abs().sum() > 0
    assert denoiser.audio_conditioning.attn[1].to_out.weight.grad.abs().sum() > 0
    # Once trained, the skeleton reaches the output.
    randomise(denoiser.motion)
    still = {**cond, "pose": cond["pose"][:, :1].expand_as(cond["pose"])}
    assert (denoiser(x_t, t, cond) - denoiser(x_t, t, still)).abs().max() > 1e-4


def test_a_skeleton_denoiser_needs_pose(clip_batch):
    denoiser = tiny_wan(pose_keypoints=8)
    with pytest.raises(DataError, match="no pose") as error:
        denoiser.condition({k: v for k, v in clip_batch.items() if k != "pose"})
    assert error.value.field == "pose"


def i2v_config() -> dict:
    """A tiny Wan2.1-I2V-shaped transformer: reference channels + mask, CLIP image context and added K/V."""
    return dict(TINY_WAN, in_channels=2 * C + R, out_channels=C, image_dim=24, added_kv_proj_dim=32)


def test_wan_i2v_checkpoint_loads_and_starts_unchanged(tmp_path, clip_batch):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    WanTransformer3DModel(**i2v_config()).save_pretrained(tmp_path / "transformer")
    denoiser = tiny_wan(config=None, pretrained=str(tmp_path), pose_keypoints=8)
    assert denoiser.layout == "i2v" and denoiser.text.shape[1] == 512
    bare = WanTransformer3DModel.from_pretrained(tmp_path, subfolder="transformer")

    x0 = denoiser.encode_video(clip_batch["video"])
    cond = denoiser.condition(clip_batch)
    x_t, t = torch.randn_like(x0), torch.full((4,), 600.0)
    # Wan's own I2V input: noise, a mask on the first latent frame, the reference then grey frames, encoded.
    grey = torch.full_like(clip_batch["video"][:, 1:], 0.5)
    condition = denoiser.codec.encode(torch.cat([clip_batch["reference"][:, None], grey], dim=1))
    mask = torch.zeros_like(x0[:, :R])
    mask[:, :, 0] = 1
    expected = bare(
        torch.cat([x_t, mask, condition], dim=1), t, torch.zeros(4, 512, 16),
        encoder_hidden_states_image=torch.zeros(4, 257, 24), return_dict=False,
    )[0]  # fmt: skip
    pred = denoiser(x_t, t, cond)
    torch.testing.assert_close(pred, expected, rtol=0, atol=0)
    pred.pow(2).mean().backward()
    assert denoiser.motion.proj.weight.grad.abs().sum() > 0


def test_wan_t2v_checkpoint_is_widened_without_changing_it(tmp_path, clip_batch):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    WanTransformer3DModel(**dict(TINY_WAN, in_channels=C, out_channels=C)).save_pretrained(tmp_path / "transformer")
    denoiser = tiny_wan(config=None, pretrained=str(tmp_path))
    assert denoiser.layout == "concat" and denoiser.backbone.config.in_channels == 2 * C
    bare = WanTransformer3DModel.from_pretrained(tmp_path, subfolder="transformer")
    x0 = denoiser.encode_video(clip_batch["video"])
    x_t, t = torch.randn_like(x0), torch.full((4,), 600.0)
    expected = bare(x_t, t, torch.zeros(4, 1, 16), return_dict=False)[0]
    torch.testing.assert_close(denoiser(x_t, t, denoiser.condition(clip_batch)), expected, rtol=1e-5, atol=1e-6)
    assert "backbone.patch_embedding" in denoiser.new_modules()


def test_wan_rejects_a_checkpoint_of_other_channels(tmp_path):
    from diffusers import WanTransformer3DModel

    WanTransformer3DModel(**dict(TINY_WAN, in_channels=20, out_channels=C)).save_pretrained(tmp_path / "transformer")
    with pytest.raises(ValueError, match="20 input channels"):
        tiny_wan(config=None, pretrained=str(tmp_path))


@pytest.mark.parametrize("layout", ["t2v", "pose"])
def test_lora_reference_is_the_base_model_with_new_modules(tmp_path, clip_batch, layout):
    """After training steps that move the adapters, the motion module and a widened patch embedding,
    ``reference()`` is still the bare starting model, exactly."""
    from diffusers import WanTransformer3DModel

    if layout == "t2v":
        torch.manual_seed(0)
        WanTransformer3DModel(**dict(TINY_WAN, in_channels=C, out_channels=C)).save_pretrained(tmp_path / "transformer")
        denoiser = tiny_wan(config=None, pretrained=str(tmp_path), pose_keypoints=8)
    else:
        denoiser = tiny_wan(pose_keypoints=8)
    module = AlignmentModule(denoiser, FlowMatching(), lora=LoraSettings(rank=4))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any(n.startswith("denoiser.motion.") for n in trainable)
    assert ("denoiser.backbone.patch_embedding.weight" in trainable) == (layout == "t2v")
    x0 = denoiser.encode_video(clip_batch["video"])
    cond = denoiser.condition(clip_batch)
    x_t, t = torch.randn_like(x0), torch.full((4,), 400.0)
    with torch.no_grad():
        start = denoiser(x_t, t, cond)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        loss, _ = module.algorithm.loss(module.policy, clip_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert (denoiser(x_t, t, cond) - start).abs().max() > 1e-4
    with module.reference() as reference:
        torch.testing.assert_close(reference(x_t, t, cond), start, rtol=0, atol=0)


def test_chunked_generation_of_three_windows_joins_its_chunks(clip_batch):
    """A video 3× the model's window, made chunk by chunk: each chunk starts with the previous chunk's last
    frames, and what it generates after them depends on them."""
    from prefalign.sampling import SamplingSettings, generate, sample_clip_latents

    torch.manual_seed(0)
    denoiser = tiny_wan(pose_keypoints=8)
    randomise(denoiser)
    module = AlignmentModule(denoiser, FlowMatching())
    settings = SamplingSettings(num_steps=3, chunk_frames=17, motion_frames=5)
    long = {
        "reference": clip_batch["reference"][:2],
        "audio": clip_batch["audio"][:2].repeat(1, 3),
        "pose": clip_batch["pose"][:2].repeat(1, 3, 1, 1),
    }
    chunks = generate(module.denoiser, module.denoiser, module.process, long, 51, settings)[0]
    assert len(chunks) == 4 and all(c.shape == (2, 17, 3, 32, 32) for c in chunks)  # 17 + 3·12 ≥ 51 frames
    for before, after in zip(chunks, chunks[1:]):
        torch.testing.assert_close(after[:, :5], before[:, -5:], rtol=0, atol=1e-6)
        assert (after[:, 5:] - before[:, -5:-4]).abs().mean() > 0  # and then it moves on
    video = module.generate(long, 51, settings)
    assert video.shape == (2, 51, 3, 32, 32)
    torch.testing.assert_close(video[:, 12:17], chunks[1][:, :5])
    torch.testing.assert_close(video[:, 17:29], chunks[1][:, 5:])

    # The frames after the given ones are conditioned on them: another tail gives another continuation.
    part = {"reference": long["reference"], "audio": long["audio"][:, : 17 * 640], "pose": long["pose"][:, :17]}
    tails = [denoiser.codec.encode(chunks[0][:, -5:]), denoiser.codec.encode(torch.rand(2, 5, 3, 32, 32))]
    outs = [denoiser.decode(sample_clip_latents(denoiser, denoiser, module.process, part, 17,
                                                torch.Generator().manual_seed(1), settings.num_steps, known=known))
            for known in tails]
    assert (outs[0][:, 5:] - outs[1][:, 5:]).abs().max() > 1e-3


def test_chunk_settings_are_checked(clip_batch):
    from prefalign.sampling import SamplingSettings, generate

    module = AlignmentModule(tiny_wan(), FlowMatching())
    denoiser, process = module.denoiser, module.process
    with pytest.raises(DataError, match=r"4·n\+1"):
        generate(denoiser, denoiser, process, clip_batch, 40, SamplingSettings(num_steps=2, chunk_frames=16))
    with pytest.raises(ValueError, match="motion_frames"):
        generate(denoiser, denoiser, process, clip_batch, 40,
                 SamplingSettings(num_steps=2, chunk_frames=17, motion_frames=17))


def test_wan_lora_defaults_adapt_self_attention_and_feed_forward_and_all_learn(clip_batch):
    module = AlignmentModule(tiny_wan(), FlowMatching(), lora=LoraSettings(rank=4))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in module.named_parameters() if ".lora_A" in n}
    assert len(adapted) == 6 * 2  # six projections in each of the two blocks
    assert not any(".attn2." in name for name in adapted)
    # One step from the zero-initialised B: every adapter's B gets a gradient.
    loss, _ = module.algorithm.loss(module.policy, clip_batch)
    loss.backward()
    for name, param in module.named_parameters():
        if ".lora_B" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
