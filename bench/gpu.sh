#!/usr/bin/env bash
# One-shot GPU measurement for the MoE kernels: correctness on CUDA, then the
# benchmark tables, then the paper's headline (MoE-1B vs Dense-225M RTF). Installs nothing; run from anywhere, on a machine with
# torch + triton (deepspeed optional: skipped if missing).
#
#   OUT=/some/dir bench/gpu.sh          # results under $OUT (default ./bench_gpu_out)
#
# Budget: about 7 to 10 minutes on an H100/H200 (first-call autotuning included; step 4 at most 150 s).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; else PY=python; fi
fi
OUT=${OUT:-bench_gpu_out}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} | tee "$OUT/env.txt"

# 1. Correctness of every kernel on CUDA (fp32, fp16, bf16), forward and all gradients.
if $PY -c "import pytest" 2>/dev/null; then
  timeout 240 $PY -m pytest tests/kernels -q -x -p no:cacheprovider -o addopts="" 2>&1 | tail -20 | tee "$OUT/gpu_tests.txt"
else
  echo "pytest not installed: correctness tests skipped" | tee "$OUT/gpu_tests.txt"
fi

# 2. Grouped GEMM alone vs torch.bmm (uniform groups) and the per-expert loop (skewed), bf16;
#    then whole-layer rows (grouped / loop / deepspeed / dense), bf16.
timeout 420 $PY -m bench.kernels --device cuda --dtype bf16 --preset gpu --d 256 1024 --gemm \
  --rounds 3 --round-seconds 0.05 --json "$OUT/bench_bf16.json" 2>&1 | tee "$OUT/bench_bf16.md"

# 3. fp32 and fp16 spot checks of the layer (small grid).
timeout 120 $PY -m bench.kernels --device cuda --dtype fp16 --preset quick --rounds 3 --round-seconds 0.05 \
  2>&1 | tee "$OUT/bench_fp16.md"
# 4. The paper's claim: RTF of MoE-1B vs Dense-225M (random weights), full context and streaming.
timeout 150 $PY -m moe_asr.cli bench-rtf conf/paper_dense_225m.yaml conf/paper_moe_1b.yaml --device cuda \
  --seconds 10 --modes encoder,attention_rescoring --contexts full,16 --streams 1,16 --rounds 3 \
  --json "$OUT/bench_rtf_paper.json" 2>&1 | tee "$OUT/bench_rtf_paper.md"
echo "results in $OUT"
