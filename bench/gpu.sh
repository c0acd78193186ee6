#!/usr/bin/env bash
# One-shot GPU check and measurement of the MoE kernels, from a fresh checkout on a machine with torch and
# triton (nothing installed: bench/gpu_lib.sh). Every step has its own time limit (they add up to 475 s)
# and writes its own file under $OUT as it goes, so a step that runs out of time loses only its own rows:
#
#   env.txt    devices, versions, where the kernels were imported from
#   sweep.csv  every forward and weight-gradient tile in bf16, fp16, fp32 (IEEE and TF32) against an fp32
#              torch reference: compile time, resource failures, max error (tiles compiled in parallel)
#   tests.log  the kernel tests on CUDA with the default tile (MOE_KERNELS_TUNE=0: no tuning compiles),
#   tests.xml  in parallel where pytest-xdist is installed; junit XML
#   large.txt  1M tokens, d 1024, FFN 4096, bf16 (outputs past 2^31 elements), sampled against torch
#   gemm.md    grouped GEMM forward and weight gradient: ours vs torch.nn.functional.grouped_mm vs bmm vs a per-expert
#              loop, 8 and 64 experts, 256 to 2M rows, uniform / Zipf / empty experts (triton do_bench)
#   layer.md   MoE layer forward+backward; 16-token streaming step eager vs CUDA-graph replay
#   log.txt    every step's stderr and its line "step NAME limit_s=.. seconds=.. rc=.."
#
#   OUT=/some/dir bench/gpu.sh       # on a GPU (default OUT: ./bench_gpu_out)
#   OUT=/some/dir bench/gpu.sh --cpu # the same steps on tiny shapes, CPU tensors under TRITON_INTERPRET=1:
#                                    # proves the script (tests/bench/test_gpu_script.py), measures nothing
# The model-level rows (bench-rtf, training throughput) are bench/gpu_model.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/gpu_lib.sh
pick_python
kernels_on_path
OUT=${OUT:-bench_gpu_out}
mkdir -p "$OUT"
: > "$OUT/log.txt"

if [ "${1:-}" = "--cpu" ]; then
  export TRITON_INTERPRET=1 MOE_KERNELS_BACKEND=triton
  ARGS=(--device cpu --tiny)
  TESTS=(tests/kernels/test_triton.py -k "grouped_gemm_forward_backward and mixed and float32")
  WORKERS=1
else
  ARGS=()
  TESTS=(tests/kernels -m "not slow")   # the slow one compiles for sm90 on a CPU: here the GPU compiles
  WORKERS=8
fi
PARALLEL=()
if [ -z "${TRITON_INTERPRET:-}" ] && "$PY" -c "import xdist" 2>/dev/null; then PARALLEL=(-n 8); fi
TIMEOUT=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT=(--timeout 120); fi

step env 15 env.txt "$PY" -m bench.gpu env "${ARGS[@]}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv >> "$OUT/env.txt" 2>&1
step sweep 80 sweep.csv "$PY" -m bench.gpu sweep --workers "$WORKERS" "${ARGS[@]}"
step tests 150 tests.log env MOE_KERNELS_TUNE=0 "$PY" -m pytest "${TESTS[@]}" -v -p no:cacheprovider \
  -o addopts="" "${PARALLEL[@]}" "${TIMEOUT[@]}" --junitxml="$OUT/tests.xml"
step large 60 large.txt env MOE_KERNELS_TUNE=0 "$PY" -m bench.gpu large "${ARGS[@]}"
step gemm 120 gemm.md "$PY" -m bench.gpu gemm "${ARGS[@]}"
step layer 50 layer.md env MOE_KERNELS_TUNE=0 "$PY" -m bench.gpu layer "${ARGS[@]}"
echo "step limits add up to ${STEP_LIMITS}s; results in $OUT" | tee -a "$OUT/log.txt"
