#!/usr/bin/env bash
# Everything that needs a GPU, in one run on one H100/H200, writing one results file, $OUT/gpu_check.md:
#   (a) the gpu-marked tests (pytest -m gpu): among them Lightning's real FSDPStrategy on 1 GPU
#       (tests/test_recipes_matrix.py::test_real_fsdp_strategy_on_one_gpu, no CPU shim) and a bf16 LoRA step of the
#       Wan-1.3B-sized model (tests/test_gpu_benchmark.py);
#   (b) benchmarks/gpu_wan.py: SFT steps (LoRA, full FT, LoRA without checkpointing) of a Wan2.1-T2V-1.3B-config
#       model at 33×480×832 with MFU, and the peak memory and time of a DiffusionDPO and a GRPO step (the GRPO one
#       through a real lightning.Trainer), into $OUT/results_gpu.md and .json;
#   (c) $OUT/gpu_check.md: the GPU (nvidia-smi), the pytest summary, the benchmark's table.
#
#   bash benchmarks/gpu_check.sh                      # from anywhere; OUT=benchmarks/, PYTHON=.venv/bin/python
#   OUT=/tmp/gpu PYTHON=python bash benchmarks/gpu_check.sh
#
# Installs nothing: it needs the project's environment (.venv, or PYTHON) and no network (HF_HUB_OFFLINE=1).
# Time budget: under 8 minutes on one H100. Estimates: (a) about 2.5 min (collecting the suite ~30 s, three
# `prefalign fit` subprocesses on tiny checkpoints under FSDP ~25 s each, the 1.3B LoRA step ~20 s, the rest
# seconds); (b) about 2.5 min (imports ~15 s, five model builds ~5 s each, 7 steps per variant: ~0.6 s per SFT step,
# ~1.5 s per DPO step, ~9 s per GRPO step of 4 rollouts × 4 sampler steps). Hard limits: (a) 200 s, (b) 240 s, each
# plus 10 s to die after SIGTERM, so the script ends within about 7.7 minutes whatever happens. A part that fails or
# times out is recorded in gpu_check.md (the benchmark rewrites its report after every variant, so a timeout keeps
# the variants it finished) and makes the script exit non-zero.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-benchmarks}"  # relative paths are relative to the repository root
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
TESTS_LIMIT="${TESTS_LIMIT:-200}"  # seconds; the budget above assumes these defaults
BENCHMARK_LIMIT="${BENCHMARK_LIMIT:-240}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "gpu_check: no Python at '$PYTHON': create .venv (see README) or set PYTHON" >&2
  exit 2
fi
mkdir -p "$OUT"
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT

# (a) the gpu-marked tests
echo "== (a) pytest -m gpu (limit ${TESTS_LIMIT} s)"
start=$SECONDS
tests_rc=0
timeout --kill-after=10 "$TESTS_LIMIT" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$LOGS/pytest.log" \
  || tests_rc=$?
tests_seconds=$((SECONDS - start))

# (b) the benchmark
echo "== (b) benchmarks/gpu_wan.py (limit ${BENCHMARK_LIMIT} s)"
start=$SECONDS
benchmark_rc=0
rm -f "$OUT/results_gpu.md" "$OUT/results_gpu.json"  # so that a failed run cannot show an earlier run's table
timeout --kill-after=10 "$BENCHMARK_LIMIT" "$PYTHON" benchmarks/gpu_wan.py --device cuda --steps 5 --warmup 2 \
  --out "$OUT/results_gpu.md" 2>&1 | tee "$LOGS/benchmark.log" || benchmark_rc=$?
benchmark_seconds=$((SECONDS - start))

# (c) the results file
outcome() {  # exit status, limit -> words
  case "$1" in
    0) echo "ok" ;;
    124 | 137) echo "TIMED OUT after $2 s (exit $1)" ;;
    *) echo "FAILED (exit $1)" ;;
  esac
}
summary="$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$LOGS/pytest.log" | tail -n 1 || true)"
revision="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain 2>/dev/null || true)" ]; then revision="$revision+dirty"; fi
{
  echo "# GPU check"
  echo
  echo "Written by \`bash benchmarks/gpu_check.sh\` on $(date -u +%Y-%m-%dT%H:%M:%SZ) at revision $revision."
  echo
  echo "## GPU"
  echo
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 || true
    echo '```'
  else
    echo "nvidia-smi not found"
  fi
  echo
  echo "## (a) gpu-marked tests: $(outcome "$tests_rc" "$TESTS_LIMIT"), ${tests_seconds} s"
  echo
  echo "\`$PYTHON -m pytest -q -m gpu -p no:cacheprovider\`: ${summary:-no summary line}"
  if grep -qE '^(FAILED|ERROR) ' "$LOGS/pytest.log"; then
    echo
    echo '```'
    grep -E '^(FAILED|ERROR) ' "$LOGS/pytest.log" | cut -c1-400
    echo '```'
  fi
  echo
  echo "## (b) benchmarks/gpu_wan.py: $(outcome "$benchmark_rc" "$BENCHMARK_LIMIT"), ${benchmark_seconds} s"
  echo
  if [ -f "$OUT/results_gpu.md" ]; then
    grep -E '^- (device|MFU):' "$OUT/results_gpu.md" || true
    echo
    grep -E '^\|' "$OUT/results_gpu.md"
    echo
    echo "Every figure, with how each is measured and each variant's parameters: results_gpu.md and results_gpu.json."
  else
    echo "No results_gpu.md was written. The benchmark's last lines:"
    echo
    echo '```'
    tail -n 20 "$LOGS/benchmark.log" | cut -c1-400
    echo '```'
  fi
} >"$OUT/gpu_check.md"
echo "== wrote $OUT/gpu_check.md"
cat "$OUT/gpu_check.md"

[ "$tests_rc" -eq 0 ] && [ "$benchmark_rc" -eq 0 ]
