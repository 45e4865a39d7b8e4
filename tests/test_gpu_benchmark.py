"""The GPU benchmark script (benchmarks/gpu_wan.py): its harness at a tiny size on CPU, the real size on a GPU."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_wan.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_wan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}  # rows[0] is the header


def test_tiny_run_reports_every_variant(tmp_path):
    before = sorted(SCRIPT.parent.iterdir())
    out = tmp_path / "results_gpu.md"
    result = load_script().main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(out)])

    assert sorted(SCRIPT.parent.iterdir()) == before  # nothing written into benchmarks/
    rows = table_rows(out.read_text())
    for name in ("LoRA r64, checkpointing", "LoRA r64, no checkpointing", "full FT, checkpointing"):
        status, median, _, _, weights, state, trainable, tokens, throughput = rows[name]
        assert status == "ok"
        assert float(median) > 0 and float(throughput) > 0
        assert tokens == str(9 * 4 * 4)  # latents 9×8×8 in 1×2×2 patches
        assert weights.endswith("MiB") and state.endswith("MiB") and trainable[0].isdigit()

    records = {r["variant"]: r for r in result["variants"]}
    assert all(len(r["step_seconds"]) == 2 for r in records.values())
    lora, full = records["LoRA r64, checkpointing"], records["full FT, checkpointing"]
    assert lora["trainable_adapters"] > 0 and lora["trainable"] < lora["parameters"]
    assert full["trainable"] == full["parameters"]
    saved = (out.with_suffix(".json")).read_text()
    assert '"diffusers"' in saved and '"torch"' in saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_wan_1_3b_lora_step_fits(tmp_path):
    result = load_script().main(["--device", "cuda", "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "r.md")])
    headline = result["variants"][0]
    assert headline["status"] == "ok"
    assert headline["tokens"] == 9 * 30 * 52
    assert headline["weights_bytes"] < headline["peak_bytes"] < torch.cuda.get_device_properties(0).total_memory
    assert 1.3e9 < headline["backbone_parameters"] < 1.5e9  # Wan2.1-T2V-1.3B's transformer has 1.42 B
