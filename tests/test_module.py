"""AlignmentModule: LoRA vs full weights, the reference policy, the SFT loss, sampling, weight files."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from prefalign.algorithms import SFT, Algorithm
from prefalign.data.errors import DataError
from prefalign.module import AlignmentModule, LoraSettings, SamplingSettings, load_denoiser_weights
from prefalign.processes import Diffusion, FlowMatching

from conftest import tiny_wan


def train_steps(module, batch, steps, lr=1e-3):
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = module.algorithm.loss(module, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def fixed_inputs(module, batch):
    x0 = module.denoiser.encode_video(batch["video"])
    torch.manual_seed(1)
    return torch.randn_like(x0), torch.full((x0.shape[0],), 400.0), module.denoiser.condition(batch)


@pytest.mark.parametrize("process", [FlowMatching(), Diffusion(prediction="v")], ids=["flow", "diffusion"])
def test_sft_loss_falls_and_weights_move(clip_batch, process):
    torch.manual_seed(0)
    module = AlignmentModule(tiny_wan(), process, algorithm=SFT())
    before = copy.deepcopy(module.denoiser.state_dict())
    losses = train_steps(module, clip_batch, 40)
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    after = module.denoiser.state_dict()
    assert not torch.equal(before["backbone.proj_out.weight"], after["backbone.proj_out.weight"])
    assert not torch.equal(
        before["audio_conditioning.attn.0.to_out.weight"], after["audio_conditioning.attn.0.to_out.weight"]
    )


def test_lora_trains_adapters_and_new_modules_only():
    module = AlignmentModule(tiny_wan(), FlowMatching(), lora=LoraSettings(rank=4))
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("denoiser.audio_conditioning.") for n in names)
    assert any("lora_" in n for n in names)
    frozen = LoraSettings(rank=4, train_new_modules=False)
    names = [n for n, p in AlignmentModule(tiny_wan(), FlowMatching(), lora=frozen).named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


def test_lora_reference_is_the_bare_base_model_exactly(clip_batch):
    base = tiny_wan()
    bare = copy.deepcopy(base)
    module = AlignmentModule(base, FlowMatching(), lora=LoraSettings(rank=4))
    x_t, t, cond = fixed_inputs(module, clip_batch)
    expected = bare(x_t, t, cond)
    train_steps(module, clip_batch, 3, lr=1e-2)  # adapters and the audio modules move
    with module.reference() as reference:
        torch.testing.assert_close(reference(x_t, t, cond), expected, rtol=0, atol=0)
    assert (module.denoiser(x_t, t, cond) - expected).abs().max() > 1e-4  # the policy did change
    # The reference adds no parameters: the adapters are switched off, not copied.
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.denoiser.parameters())


def test_full_finetuning_reference_is_a_frozen_copy(clip_batch):
    module = AlignmentModule(tiny_wan(), FlowMatching())
    module.refresh_reference()
    x_t, t, cond = fixed_inputs(module, clip_batch)
    start = module.denoiser(x_t, t, cond).detach()
    train_steps(module, clip_batch, 3, lr=1e-2)
    with module.reference() as reference:
        torch.testing.assert_close(reference(x_t, t, cond), start)
        assert not any(p.requires_grad for p in reference.parameters())
    assert module._reference.codec is module.denoiser.codec  # frozen parts are shared, not copied
    module.refresh_reference()
    with module.reference() as reference:
        torch.testing.assert_close(reference(x_t, t, cond), module.denoiser(x_t, t, cond))


def test_generate_gives_videos_for_the_conditions(clip_batch):
    module = AlignmentModule(tiny_wan(), FlowMatching(), sampling=SamplingSettings(num_steps=3))
    video = module.generate(clip_batch, num_frames=17)
    assert video.shape == clip_batch["video"].shape and 0 <= video.min() and video.max() <= 1
    torch.testing.assert_close(module.generate(clip_batch, num_frames=17), video)  # seeded
    guided = module.generate(clip_batch, 17, SamplingSettings(num_steps=3, guidance_scale=2.0))
    assert guided.shape == video.shape


def test_missing_field_fails_at_setup_naming_field_and_algorithm():
    class NeedsRejected(Algorithm):
        required_fields = ("video", "rejected")

    with pytest.raises(DataError, match="NeedsRejected algorithm needs the field 'rejected'") as error:
        NeedsRejected().check_fields({"video", "audio", "reference"}, "pairs.jsonl")
    assert "pairs.jsonl" in str(error.value) and "field 'rejected'" in str(error.value)


def test_init_weights_round_trip_and_errors(tmp_path, clip_batch):
    trained = tiny_wan()
    with torch.no_grad():
        for attn in trained.audio_conditioning.attn:
            attn.to_out.weight.normal_()
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, path)
    module = AlignmentModule(tiny_wan(), FlowMatching(), init_weights=str(path))
    x_t, t, cond = fixed_inputs(module, clip_batch)
    torch.testing.assert_close(module.denoiser(x_t, t, cond), trained(x_t, t, cond))

    with pytest.raises(DataError, match="not found") as error:
        load_denoiser_weights(tiny_wan(), str(tmp_path / "missing.safetensors"))
    assert "model.init_weights" in str(error.value)
    save_file({"not.a.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(DataError, match="do not belong to this denoiser"):
        load_denoiser_weights(tiny_wan(), str(tmp_path / "other.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="cannot read weights"):
        load_denoiser_weights(tiny_wan(), str(tmp_path / "corrupt.safetensors"))
