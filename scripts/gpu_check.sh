#!/usr/bin/env bash
# Everything a check on a GPU machine needs, in one run of under 8 minutes on an H100:
#   1. build the extension there (its own Python and torch; 16 cores);
#   2. print the kernels' occupancy (a sanity check that they load and fit);
#   3. run every CUDA test: tests/test_cuda_*.py and the [cuda] cases of the op tests;
#   4. compute-sanitizer memcheck over a small subset (bad metadata included), with the
#      caching allocator off so every out-of-bounds access hits a real allocation edge;
#   5. a quick `pagedkv tune` of the benchmark keys, written to $OUT/launch_configs.json;
#   6. python -m benchmarks.bench_cuda with that table; its short table is printed last.
# Every step has a time limit (480 s in all); outputs go under $OUT (default
# /tmp/pagedkv_gpu_check). The exit status is non-zero when any step failed (the
# remaining steps still run); 2 when there is no GPU at all.
#
# The machine needs pytest, hypothesis and expecttest for step 3. If its Python lacks
# them (there is no package registry there), copy the pure-Python packages next to the
# checkout, e.g. from this project's environment:
#   mkdir -p .gpu_pydeps && cp -r .venv/lib/python3.*/site-packages/{pytest,_pytest,py.py,\
#     pluggy,iniconfig,packaging,hypothesis,sortedcontainers,attr,attrs,expecttest} .gpu_pydeps/
# and carry .gpu_pydeps with the run: this script puts it on PYTHONPATH when present.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-${TMPDIR:-/tmp}/pagedkv_gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH=$CUDA_HOME/bin:$PATH
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PAGEDKV_CUDA=1
[ -d "$ROOT/.gpu_pydeps" ] && export PYTHONPATH="$ROOT/.gpu_pydeps${PYTHONPATH:+:$PYTHONPATH}"

declare -a SUMMARY
FAILED=0
T0=$SECONDS

# step NAME LIMIT_SECONDS LOG COMMAND...: runs with a time limit, logs, records the status.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local t=$SECONDS
  echo "== $name (limit ${limit}s) -> $log"
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  local status="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT"; FAILED=1;
  elif [ $rc -ne 0 ]; then status="FAILED (rc $rc)"; FAILED=1; fi
  SUMMARY+=("$(printf '%-34s %-16s %4ss' "$name" "$status" $((SECONDS - t)))")
  tail -n 15 "$log"
  return $rc
}

{
  echo "date: $(date -u +%FT%TZ)"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda); print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  nvcc --version | tail -n 2
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  for m in pytest hypothesis expecttest; do
    "$PY" -c "import $m" 2>/dev/null && echo "$m: present" || echo "$m: MISSING (see the header of scripts/gpu_check.sh)"
  done
} 2>&1 | tee "$OUT/environment.txt"

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on the GPU machine"
  exit 2
fi

# 1. Build (the same flags as `make build`, with this machine's Python and cores).
step "build" 110 "$OUT/build.log" \
  "$PY" setup.py -q build_ext --inplace || { echo "build failed: nothing else can run"; exit 1; }

# 2. Occupancy of the benchmark configurations.
step "occupancy" 15 "$OUT/occupancy.txt" \
  "$PY" -m torch_pagedkv.cli occupancy --heads 64 128 256 --dtypes bfloat16 float8_e4m3fn

# 3. CUDA tests: the CUDA-only files and the device-parametrized op tests' cuda cases.
step "pytest (cuda)" 180 "$OUT/pytest.log" \
  "$PY" -m pytest -q -rfE --maxfail=50 --junitxml="$OUT/pytest.xml" \
  tests/test_cuda_ops.py tests/test_cuda_graphs.py tests/test_launch_configs.py \
  tests/test_paged_attention.py tests/test_cache_writes.py tests/test_opcheck.py \
  -k "cuda or launch_config or test_cuda"

# 4. memcheck over a subset: bad metadata, partition edges, fp8 writes, copies and swaps.
SANITIZER=$(command -v compute-sanitizer || ls "$CUDA_HOME"/compute-sanitizer/compute-sanitizer \
            "$CUDA_HOME"/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -n "$SANITIZER" ]; then
  step "compute-sanitizer memcheck" 90 "$OUT/memcheck.log" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 30 \
    "$PY" -m pytest -q -p no:randomly tests/test_cuda_ops.py -k \
    "never_fault or partition_edges and 64 and 65 or (bit_exact and 128 and 8 and float8_e4m3fn) or skipped or many_layers and 97 or test_swap_blocks and bfloat16 or both_kernels_every_shape and 40 and 12 and float16 or gqa and 12-1"
else
  SUMMARY+=("$(printf '%-34s %-16s' "compute-sanitizer memcheck" "NOT FOUND")")
  FAILED=1
fi

# 5. A quick tune of the benchmark keys; the table is used by the benchmark below.
step "pagedkv tune --quick" 35 "$OUT/tune.log" \
  "$PY" -m torch_pagedkv.cli tune --quick --heads 128 --dtypes bfloat16 float8_e4m3fn \
  --block-sizes 16 --out "$OUT/launch_configs.json"
[ -f "$OUT/launch_configs.json" ] && export PAGEDKV_LAUNCH_CONFIGS="$OUT/launch_configs.json"

# 6. Benchmarks, last.
step "bench_cuda" 50 "$OUT/bench.log" \
  "$PY" -m benchmarks.bench_cuda --json "$OUT/bench.json"

echo
echo "== summary ($((SECONDS - T0)) s total; outputs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
echo
cat "$OUT/bench.log"
exit $FAILED
