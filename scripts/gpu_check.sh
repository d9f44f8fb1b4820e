#!/usr/bin/env bash
# The GPU check, one shot: under 6 minutes on an H200 including the build.
#
#   scripts/gpu_check.sh            build (sm_90 and the SIMT emulator), CUDA tests, CUDA-graph
#                                   tests, memcheck, the emulator against the device
#   scripts/gpu_check.sh --bench    the same, then `pagedkv tune` and the benchmark table
#                                   (a second run, once the first one passed)
#
# What comes back from the device machine is at most 8 files under $OUT, so everything
# lands in three: summary.txt (one line per step, appended the moment the step ends, so
# a run cut short by its time limit still says what passed), pytest.log (the main test
# step) and gpu_check.tar.gz (every log, re-packed after each step). Without a GPU the
# script says so in one line and exits 0: nothing here can run.
#
# The device image has torch 2.11 / Python 3.12 / pytest-timeout / hypothesis but no
# expecttest: the tests that need it skip (tests/test_bad_input.py runs on CPU anyway).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-${TMPDIR:-/tmp}/pagedkv_gpu_check}
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_logs.XXXXXX")
mkdir -p "$OUT"
: > "$OUT/summary.txt"
PY=${PYTHON:-python3}
BENCH=0
[ "${1:-}" = "--bench" ] && BENCH=1

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False)" \
    | tee -a "$OUT/summary.txt"
  exit 0
fi

# CUDA_HOME from the nvcc on PATH when unset (the image's toolkit need not be /usr/local/cuda).
if [ -z "${CUDA_HOME:-}" ]; then
  NVCC=$(command -v nvcc || true)
  export CUDA_HOME=${NVCC:+$(dirname "$(dirname "$(readlink -f "$NVCC")")")}
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
fi
export PATH=$CUDA_HOME/bin:$PATH
export TORCH_CUDA_ARCH_LIST=9.0  # Hopper only: the check's machines are H100/H200
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PAGEDKV_CUDA=1 PAGEDKV_SIMT=1 PYTHONUNBUFFERED=1
FAILED=0
T0=$SECONDS

pack() { tar -czf "$OUT/gpu_check.tar.gz.part" -C "$LOGS" . && mv "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"; }

# step NAME LIMIT_SECONDS LOG COMMAND...: a time limit, a log, a summary line at once.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local t=$SECONDS status=ok
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; FAILED=1
  elif [ $rc -ne 0 ]; then status="FAILED(rc=$rc)"; FAILED=1; fi
  printf '%-28s %-14s %4ss  %s\n' "$name" "$status" $((SECONDS - t)) \
    "$(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -n 1)" | tee -a "$OUT/summary.txt"
  tail -n 8 "$log"
  pack
  return $rc
}

{
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name())'
  nvcc --version | tail -n 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  for m in pytest pytest_timeout hypothesis expecttest; do
    "$PY" -c "import $m" 2>/dev/null && echo "$m: present" || echo "$m: missing"
  done
} > "$LOGS/environment.txt" 2>&1
head -n 1 "$LOGS/environment.txt" | tee -a "$OUT/summary.txt"

step build 240 "$LOGS/build.log" "$PY" setup.py -q build_ext --inplace \
  || { echo "gpu_check: build failed, nothing else can run" | tee -a "$OUT/summary.txt"; exit 1; }

TIMEOUT_OPT=""
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout=60"
# Every CUDA case: the CUDA-only files and the [cuda] cases of the device-parametrized ones.
step "pytest (cuda)" 120 "$OUT/pytest.log" "$PY" -m pytest -q -rfE $TIMEOUT_OPT --durations=15 \
  -p no:cacheprovider tests/ -k "cuda or launch_config or decode_plan" \
  --ignore=tests/test_cuda_graphs.py \
  --ignore=tests/test_decode_graphs.py
cp "$OUT/pytest.log" "$LOGS/pytest.log"

# The emulator against the device: the same fixed inputs through both, the largest
# difference per op, every bf16 value through the fp8 quantizers and every fp8 byte through
# the dequantizers (docs/emulation.md).
step "simt vs device" 60 "$LOGS/simt_vs_device.log" "$PY" scripts/simt_vs_device.py \
  --json "$LOGS/simt_vs_device.json"
cp "$LOGS/simt_vs_device.log" "$OUT/simt_vs_device.txt"

# CUDA graphs: the engine's captured decode steps and reduce-overhead compile, on their own.
step "pytest (cuda graphs)" 60 "$LOGS/graphs.log" "$PY" -m pytest -q -rfE $TIMEOUT_OPT \
  --durations=5 -p no:cacheprovider tests/test_cuda_graphs.py tests/test_decode_graphs.py

# memcheck over a subset (bad metadata, partition edges, splits walking many partitions,
# mixed batches through both kernels, fp8 writes, copies, swaps), the
# caching allocator off so an out-of-bounds access hits a real allocation edge.
SANITIZER=$(command -v compute-sanitizer || ls "$CUDA_HOME"/compute-sanitizer/compute-sanitizer \
            "$CUDA_HOME"/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -n "$SANITIZER" ]; then
  step memcheck 45 "$LOGS/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 30 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py -k \
    "never_fault or (partition_edges and 64 and 65) or (splits_walking and 64 and 3 and 150) or (mixed_batches_send and bf16 and 2) or (many_layers and 97) or (swap_blocks and bfloat16)"
else
  echo "memcheck                     NOT-FOUND" | tee -a "$OUT/summary.txt"
fi

if [ $BENCH -eq 1 ]; then
  step "pagedkv tune --quick" 60 "$LOGS/tune.log" "$PY" -m torch_pagedkv.cli tune --quick \
    --heads 128 --dtypes bfloat16 float8_e4m3fn --block-sizes 16 --out "$LOGS/launch_configs.json"
  [ -f "$LOGS/launch_configs.json" ] && export PAGEDKV_LAUNCH_CONFIGS="$LOGS/launch_configs.json"
  step bench_cuda 90 "$LOGS/bench.log" "$PY" -m benchmarks.bench_cuda --json "$LOGS/bench.json"
fi

echo "total $((SECONDS - T0))s, failed=$FAILED" | tee -a "$OUT/summary.txt"
pack
exit $FAILED
