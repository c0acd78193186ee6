#!/usr/bin/env bash
# The model-level GPU rows, to run after bench/gpu.sh, with its conventions (bench/gpu_lib.sh: nothing
# installed, each step under its own time limit writing its own file under $OUT):
#
#   env.txt    devices, versions
#   layers.md  bench.kernels --preset gpu: the MoE layer's training step (forward+backward) and inference
#              rows, ours vs WeNet's loop vs deepspeed.moe (where deepspeed is installed) vs dense, bf16
#   rtf.md     the paper's headline: RTF of MoE-1B vs Dense-225M (random weights), full context and
#   rtf.json   streaming, 1 and 16 streams (moe-asr bench-rtf)
#   log.txt    every step's stderr and its line "step NAME limit_s=.. seconds=.. rc=.."
#
#   OUT=/some/dir bench/gpu_model.sh        # on a GPU (default OUT: ./bench_gpu_model_out)
#   OUT=/some/dir bench/gpu_model.sh --cpu  # tiny configs on CPU: proves the script, measures nothing
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/gpu_lib.sh
pick_python
kernels_on_path
OUT=${OUT:-bench_gpu_model_out}
mkdir -p "$OUT"
: > "$OUT/log.txt"

if [ "${1:-}" = "--cpu" ]; then
  LAYERS=(--device cpu --preset quick --impls grouped loop dense --rounds 1 --round-seconds 0.01)
  RTF=(conf/tiny_dense.yaml conf/tiny_moe.yaml --device cpu --seconds 1 --modes encoder --contexts full,16
       --streams 1 --rounds 1)
  ENV=(--device cpu)
else
  LAYERS=(--device cuda --dtype bf16 --preset gpu --d 256 1024 --rounds 3 --round-seconds 0.05)
  RTF=(conf/paper_dense_225m.yaml conf/paper_moe_1b.yaml --device cuda --seconds 10
       --modes encoder,attention_rescoring --contexts full,16 --streams 1,16 --rounds 3)
  ENV=()
fi

step env 15 env.txt "$PY" -m bench.gpu env "${ENV[@]}"
step layers 240 layers.md "$PY" -m bench.kernels "${LAYERS[@]}"
step rtf 200 rtf.md "$PY" -m moe_asr.cli bench-rtf "${RTF[@]}" --json "$OUT/rtf.json"
echo "step limits add up to ${STEP_LIMITS}s; results in $OUT" | tee -a "$OUT/log.txt"
