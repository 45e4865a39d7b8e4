"""The GPU benchmark script (benchmarks/gpu_wan.py): its FLOP count and codec stand-in, its harness at a tiny size on
CPU (every variant: SFT, DPO, GRPO through a Trainer), the real size on a GPU."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_wan.py"

#: The tiny model's linear layers that every video token goes through, counted by hand (d = 32, ffn 64, 2 blocks):
#: per block the self-attention's q, k, v, out, the text cross-attention's q and out, the audio cross-attention's
#: q and out (8 × (32·32 + 32)) and the feed-forward (32·64 + 64 + 64·32 + 32); then proj_out (32 → 16·1·2·2).
TINY_LINEAR = 2 * (8 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32)) + (32 * 64 + 64)
#: LoRA r64 on q, k, v, out (32 → 32) and the two feed-forward layers (32 → 64, 64 → 32) of both blocks.
TINY_ADAPTERS = 2 * (4 * 64 * (32 + 32) + 2 * 64 * (32 + 64))
#: What LoRA trains of them: the adapters and the audio attention's q and out (trained in full as a new module).
TINY_TRAINED_UNDER_LORA = TINY_ADAPTERS + 2 * 2 * (32 * 32 + 32)


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_wan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}  # rows[0] is the header


def test_model_flops_matches_a_hand_count():
    flops = load_script().model_flops
    # N = 10 linear parameters, 3 trained; 2 sequences of S = 5 tokens (T = 10); d = 2; L = 3.
    forward = 2 * 10 * 10 + 4 * 2 * 5**2 * 2 * 3  # 200 + 1200
    backward = 2 * 10 * 10 + 2 * 3 * 10 + 8 * 2 * 5**2 * 2 * 3  # 200 + 60 + 2400
    assert flops(10, 3, sequence=5, width=2, blocks=3, samples=2) == forward + backward == 4060
    assert flops(10, 3, sequence=5, width=2, blocks=3, samples=2, backward=False) == forward == 1400
    # Without attention: LoRA (nothing of N trained) is 4·N·T, full fine-tuning 6·N·T.
    assert flops(1000, 0, sequence=7, width=0, blocks=30, samples=3) == 4 * 1000 * 21
    assert flops(1000, 1000, sequence=7, width=0, blocks=30, samples=3) == 6 * 1000 * 21
    # Wan-1.3B at 33×480×832 (S = 9·30·52 = 14040, d = 1536, L = 30): attention alone is 109.0 TFLOP a step.
    assert flops(0, 0, sequence=14040, width=1536, blocks=30) == 109_000_359_936_000


def test_peak_tflops_from_the_device_name():
    peak = load_script().peak_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989  # the SXM part
    assert peak("NVIDIA H100 PCIe") == 756
    assert peak("NVIDIA H100 NVL") == 835
    assert peak("NVIDIA H200") == peak("NVIDIA GH200 480GB") == 989
    assert peak("NVIDIA A100-SXM4-80GB") == peak("NVIDIA A100 80GB PCIe") == 312
    assert peak("NVIDIA GeForce RTX 4090") is None and peak("x86_64") is None


def test_latent_codec_is_a_shape_correct_pooling():
    codec = load_script().LatentCodec()
    video = torch.rand(2, 9, 3, 16, 24)
    latents = codec.encode(video)
    assert latents.shape == (2, 16, 3, 2, 3)  # Wan's 16 channels, 4·n+1 frames → n+1, 8× smaller
    torch.testing.assert_close(latents[:, 0, 0, 0, 0], 2 * video[:, 0, 0, :8, :8].mean(dim=(-1, -2)) - 1)
    # Latent frame 1 holds frames 1-4; channel 1 is green; latent pixel (0, 1) is pixels [0:8, 8:16].
    torch.testing.assert_close(latents[:, 1, 1, 0, 1], 2 * video[:, 1:5, 1, :8, 8:16].mean(dim=(1, 2, 3)) - 1)
    torch.testing.assert_close(latents[:, 3], latents[:, 0])  # the colours tiled over the channels
    decoded = codec.decode(latents)
    assert decoded.shape == video.shape and 0 <= decoded.min() and decoded.max() <= 1
    torch.testing.assert_close(codec.encode(decoded), latents)  # decode gives back the block averages


def test_tiny_run_reports_every_variant(tmp_path):
    gpu_wan = load_script()
    before = sorted(SCRIPT.parent.iterdir())
    out = tmp_path / "results_gpu.md"
    result = gpu_wan.main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--peak-tflops", "0.001",
                           "--out", str(out)])  # fmt: skip

    assert sorted(SCRIPT.parent.iterdir()) == before  # nothing written into benchmarks/
    rows = table_rows(out.read_text())
    tokens = {"LoRA r64, checkpointing": 1, "LoRA r64, no checkpointing": 1, "full FT (fp32 weights), checkpointing": 1,
              "DPO step, LoRA r64, checkpointing": 2, "GRPO step (Trainer), LoRA r64, checkpointing": 4}  # fmt: skip
    assert set(rows) == set(tokens)
    records = {r["variant"]: r for r in result["variants"]}
    for name, samples in tokens.items():
        status, median, _, _, weights, state, trainable, n_tokens, throughput, flops, mfu = rows[name]
        assert status == "ok"
        assert float(median) > 0 and float(throughput) > 0
        assert n_tokens == str(samples * 9 * 4 * 4)  # latents 9×8×8 in 1×2×2 patches, per sample of the step
        assert weights.endswith("MiB") and state.endswith("MiB") and trainable[0].isdigit()
        r = records[name]
        assert len(r["step_seconds"]) == 2 and all(math.isfinite(v) for v in r["losses"])
        assert r["trainable_dtypes"] == ["float32"]  # AlignmentModule trains in float32 over any base dtype
        assert r["mfu"] == pytest.approx(r["model_flops"] / (r["median_seconds"] * 0.001e12))
        assert mfu == f"{100 * r['mfu']:.1f} %" and flops[0].isdigit()

    lora, full = records["LoRA r64, checkpointing"], records["full FT (fp32 weights), checkpointing"]
    assert lora["trainable_adapters"] == TINY_ADAPTERS and lora["trainable"] < lora["parameters"]
    assert lora["parameter_dtypes"]["bfloat16"] == lora["parameters"] - lora["trainable"]  # the frozen base
    assert full["trainable"] == full["parameters"] == full["parameter_dtypes"]["float32"]
    assert full["weights_bytes"] == 4 * full["parameters"]
    # The hooks find exactly the per-token linear layers, and the step's FLOPs follow from them.
    assert (full["linear_parameters"], full["trained_linear_parameters"]) == (TINY_LINEAR, TINY_LINEAR)
    assert (lora["linear_parameters"], lora["trained_linear_parameters"], lora["adapter_linear_parameters"]) == (
        TINY_LINEAR + TINY_ADAPTERS, TINY_TRAINED_UNDER_LORA, TINY_ADAPTERS)  # fmt: skip
    shape = dict(sequence=144, width=32, blocks=2)
    assert lora["model_flops"] == gpu_wan.model_flops(TINY_LINEAR + TINY_ADAPTERS, TINY_TRAINED_UNDER_LORA, **shape)
    assert full["model_flops"] == gpu_wan.model_flops(TINY_LINEAR, TINY_LINEAR, **shape)

    dpo = records["DPO step, LoRA r64, checkpointing"]
    assert dpo["model_flops"] == 2 * lora["model_flops"] + gpu_wan.model_flops(
        TINY_LINEAR, 0, samples=2, backward=False, **shape)  # fmt: skip  (the reference: the base, adapters off)
    grpo = records["GRPO step (Trainer), LoRA r64, checkpointing"]
    assert grpo["trained_units"] == [2, 2, 2]  # half of the 4 sampler steps, at each of the 3 batches
    assert len(grpo["rewards"]) == 3 and all(math.isfinite(v) for v in grpo["rewards"])
    assert (grpo["group_size"], grpo["sampler_steps"], grpo["micro_batch"]) == (4, 4, 2)
    saved = (out.with_suffix(".json")).read_text()
    assert '"diffusers"' in saved and '"torch"' in saved and '"mfu"' in saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_wan_1_3b_lora_step_fits(tmp_path):
    result = load_script().main(["--device", "cuda", "--variants", "lora", "--steps", "2", "--warmup", "1",
                                 "--out", str(tmp_path / "r.md")])  # fmt: skip
    headline = result["variants"][0]
    assert headline["status"] == "ok"
    assert headline["tokens"] == 9 * 30 * 52
    assert headline["weights_bytes"] < headline["peak_bytes"] < torch.cuda.get_device_properties(0).total_memory
    assert 1.3e9 < headline["backbone_parameters"] < 1.5e9  # Wan2.1-T2V-1.3B's transformer has 1.42 B
    assert headline["trainable_dtypes"] == ["float32"]
    if result["machine"]["peak_tflops"] is not None:  # a device whose peak the script knows
        assert 0 < headline["mfu"] < 1
