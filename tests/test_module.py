"""AlignmentModule: LoRA vs full weights, the reference policy, the SFT loss, sampling, weight files."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prefalign.algorithms import SFT, Algorithm
from prefalign.data.errors import DataError
from prefalign.lora import LoraSettings
from prefalign.module import AlignmentModule
from prefalign.sampling import SamplingSettings
from prefalign.weights import load_denoiser_weights
from prefalign.processes import Diffusion, FlowMatching

from conftest import tiny_wan


def train_steps(module, batch, steps, lr=1e-3):
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = module.algorithm.loss(module.policy, batch)
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


def trained_checkpoint(tmp_path, talkingshapes, lora, algorithm=None):
    """A 2-step fit's checkpoint (``trainer.save_checkpoint``), and the module that wrote it."""
    from prefalign.data.datamodule import PortraitDataModule

    from conftest import quiet_trainer

    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=algorithm or SFT(lr=1e-2), lora=lora)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, datamodule=PortraitDataModule(train=str(talkingshapes), val_fraction=0.0, batch_size=2,
                                                      num_frames=9))
    path = tmp_path / f"{'lora' if lora else 'full'}.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_a_new_run_starts_from_a_lora_checkpoint_with_it_as_the_reference(tmp_path, talkingshapes, clip_batch):
    from prefalign.algorithms import DiffusionDPO

    path, trained = trained_checkpoint(tmp_path, talkingshapes, LoraSettings(rank=4))
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=DiffusionDPO(), lora=LoraSettings(rank=4),
                             init_weights=str(path))
    x_t, t, cond = fixed_inputs(module, clip_batch)
    expected = trained.denoiser(x_t, t, cond)
    torch.testing.assert_close(module.denoiser(x_t, t, cond), expected)
    with module.reference() as reference:  # the loaded model, not the bare base
        torch.testing.assert_close(reference(x_t, t, cond), expected)
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())

    with pytest.raises(DataError, match="model.lora") as error:
        AlignmentModule(tiny_wan(), FlowMatching(), lora=LoraSettings(rank=8), init_weights=str(path))
    assert "rank 4" in str(error.value) and "lora.ckpt" in str(error.value)
    with pytest.raises(DataError, match="starts a LoRA run"):
        AlignmentModule(tiny_wan(), FlowMatching(), init_weights=str(path))


def test_a_new_run_starts_from_a_full_checkpoint(tmp_path, talkingshapes, clip_batch):
    path, trained = trained_checkpoint(tmp_path, talkingshapes, None)
    module = AlignmentModule(tiny_wan(), FlowMatching(), lora=LoraSettings(rank=4), init_weights=str(path))
    x_t, t, cond = fixed_inputs(module, clip_batch)
    torch.testing.assert_close(module.denoiser(x_t, t, cond), trained.denoiser(x_t, t, cond))
    (tmp_path / "junk.ckpt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(DataError, match="cannot read the checkpoint"):
        AlignmentModule(tiny_wan(), FlowMatching(), init_weights=str(tmp_path / "junk.ckpt"))


def test_resuming_a_checkpoint_of_another_algorithm_names_init_weights(tmp_path, talkingshapes):
    from prefalign.algorithms import DiffusionDPO
    from prefalign.data.datamodule import PortraitDataModule
    from prefalign.rewards import SyncExpert

    from conftest import quiet_trainer

    path, _ = trained_checkpoint(tmp_path, talkingshapes, LoraSettings(rank=4))
    module = AlignmentModule(tiny_wan(), FlowMatching(), lora=LoraSettings(rank=4),
                             algorithm=DiffusionDPO(reward=SyncExpert(), group_size=2, sample_steps=1))
    trainer = quiet_trainer(max_steps=3)
    with pytest.raises(ValueError, match="SFT run's.*--model.init_weights"):
        trainer.fit(module, datamodule=PortraitDataModule(train=str(talkingshapes), val_fraction=0.0, batch_size=2,
                                                          num_frames=9), ckpt_path=str(path))


def bf16_wan(tmp_path):
    """A tiny Wan checkpoint loaded as the recipes load Wan 14B: ``torch_dtype: bfloat16``, with the tensors
    diffusers keeps in fp32 (``_keep_in_fp32_modules``)."""
    from diffusers import WanTransformer3DModel

    from conftest import TINY_WAN
    from prefalign.denoisers import MelAudioEncoder, PixelCodec, WanDenoiser

    c = PixelCodec().latent_channels
    WanTransformer3DModel(**dict(TINY_WAN, in_channels=2 * c, out_channels=c)).save_pretrained(tmp_path / "transformer")
    return WanDenoiser(codec=PixelCodec(), audio_encoder=MelAudioEncoder(), pretrained=str(tmp_path),
                       torch_dtype="bfloat16", audio_heads=2)


@pytest.mark.parametrize("lora", [LoraSettings(rank=4), None], ids=["lora", "full"])
def test_trained_tensors_are_fp32_over_a_bf16_base(tmp_path, lora):
    module = AlignmentModule(bf16_wan(tmp_path), FlowMatching(), lora=lora)
    trained = [p for p in module.parameters() if p.requires_grad]
    frozen_backbone = [p for p in module.denoiser.backbone.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    if lora is not None:  # the base stays in the recipe's dtype
        assert frozen_backbone and {p.dtype for p in frozen_backbone} == {torch.bfloat16, torch.float32}
    with torch.no_grad():  # the reference snapshot of the new modules is fp32 too
        assert all(b.dtype == torch.float32 for b in getattr(module, "reference_snapshot", torch.nn.Module()).buffers())


def test_fsdp_units_hold_one_dtype_each(tmp_path):
    """FSDP flattens a unit's parameters into one tensor: the plan gives the adapters units of their own and casts
    the fp32-kept frozen tables of the bf16 blocks, and the root (codec, audio, new modules) is fp32."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from prefalign import sharding

    module = AlignmentModule(bf16_wan(tmp_path), FlowMatching(), lora=LoraSettings(rank=4))
    mixed = {(p.dtype, p.requires_grad) for p in module.denoiser.backbone.blocks[0].parameters()}
    assert len({dtype for dtype, _ in mixed}) == 2  # what FSDP refuses: "Must flatten tensors with uniform dtype"
    extra, cast = sharding.plan_units(module, (WanTransformerBlock,))
    assert {type(m).__name__ for m in extra} == {"Linear"} and all(p.requires_grad for m in extra for p in m.parameters())
    assert any("scale_shift_table" in name for name in cast)
    units = [module, *module.denoiser.backbone.blocks, *extra]
    inside = {id(m) for m in units}
    for unit in units:
        stack, own = [unit], []
        while stack:
            m = stack.pop()
            own += [p for p in m._parameters.values() if p is not None]
            stack += [c for c in m.children() if id(c) not in inside]
        assert len({p.dtype for p in own}) == 1, type(unit).__name__
    assert {p.dtype for p in module.denoiser.backbone.blocks[0].parameters() if not p.requires_grad} == {torch.bfloat16}


ALGORITHM_FILES = sorted((Path(__file__).parents[1] / "recipes" / "algorithms").glob("*.yaml"))


@pytest.mark.parametrize("algorithm_file", ALGORITHM_FILES, ids=[f.stem for f in ALGORITHM_FILES])
def test_every_trained_tensor_moves_in_one_step_at_the_recipes_learning_rate(tmp_path, clip_batch, algorithm_file):
    """At each real recipe's learning rate, one AdamW step moves (nearly) every element of every trained tensor of a
    LoRA model over a bf16 base. The zero-initialised outputs (lora_B, the audio attention's to_out, the motion
    projection) are given small values first, as after some training, so that every tensor has a gradient."""
    import yaml

    lr = yaml.safe_load(algorithm_file.read_text())["init_args"]["lr"]
    module = AlignmentModule(bf16_wan(tmp_path), FlowMatching(), algorithm=SFT(lr=lr), lora=LoraSettings(rank=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.requires_grad and not param.any():
                param.normal_(std=0.02)
    optimizer = module.configure_optimizers()
    assert optimizer.param_groups[0]["lr"] == lr
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as bf16-mixed computes
        loss, _ = module.algorithm.loss(module.policy, clip_batch)
    loss.backward()
    optimizer.step()
    for name, param in module.named_parameters():
        if not param.requires_grad or name.endswith("to_k.bias"):  # a key bias's gradient is zero: softmax cancels it
            continue
        changed = (param != before[name]).float().mean().item()
        assert changed > 0.9, f"{name}: {changed:.1%} of its values moved at lr {lr}"
