#!/usr/bin/env bash
# A short bf16 DeepSpeed training of the paper's MoE-1B (conf/paper_moe_1b.yaml, ZeRO 2,
# ds_configs/zero2_bf16.json) on the one GPU it finds, from a fresh checkout, with the conventions of
# bench/gpu.sh (bench/gpu_lib.sh: nothing of this project installed, every step under its own time limit
# writing its own file under $OUT). Synthetic features, so nothing is downloaded; DeepSpeed 0.19.8 must be
# importable (it is pure Python: carry its wheel and those of its requirements where it is not installed).
#
#   env.txt     devices, versions, where the kernels were imported from, DeepSpeed's version
#   train.md    the training, step by step, then steps per second, frames per second and the peak GPU memory
#   train.json  (torch.cuda.max_memory_allocated over the whole run) as one JSON object
#   plan.json   `moe-asr plan ... --json` for the same layout (1 GPU, ep_size 1) and batch, when the
#               planner exists here (otherwise log.txt says it is missing and there is no file)
#   compare.md  measured against planned: peak memory against the plan's total (model states, buckets,
#               activations), and the training FLOP/s that the plan's FLOPs per step give at the measured rate
#   log.txt     every step's stderr and its line "step NAME limit_s=.. seconds=.. rc=.."
#
#   OUT=/some/dir bench/gpu_train.sh          # on a GPU (default OUT: ./bench_gpu_train_out)
#   OUT=/some/dir bench/gpu_train.sh --cpu    # conf/tiny_moe.yaml, ZeRO 1 bf16 on CPU: proves the script
#                                             # (tests/bench/test_gpu_train_script.py), measures nothing
# FRAMES (default 12300: ten utterances of 12.3 s) sets the frames of the GPU's batch (whole utterances).
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/gpu_lib.sh
pick_python
kernels_on_path
OUT=${OUT:-bench_gpu_train_out}
mkdir -p "$OUT"
: > "$OUT/log.txt"

if [ "${1:-}" = "--cpu" ]; then
  export CUDA_VISIBLE_DEVICES=""
  CONFIG=conf/tiny_moe.yaml DS=ds_configs/zero1_bf16.json FRAMES=${FRAMES:-400} UTT=200
  TRAIN=(--device cpu --steps 2 --warmup 1)
  ENV=(--device cpu)
else
  CONFIG=conf/paper_moe_1b.yaml DS=ds_configs/zero2_bf16.json FRAMES=${FRAMES:-12300} UTT=1230
  TRAIN=(--device cuda --steps 20 --warmup 3)
  ENV=()
fi
FRAMES=$(( FRAMES < UTT ? UTT : FRAMES / UTT * UTT ))  # whole utterances: the batch train and plan both see
UTT_SECONDS=$(awk "BEGIN { print $UTT / 100 }")         # the planner's probe: an utterance of the same length

step env 15 env.txt "$PY" -m bench.gpu env "${ENV[@]}"
"$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" >> "$OUT/env.txt" 2>> "$OUT/log.txt" \
  || echo "deepspeed is not importable: the train step will fail" | tee -a "$OUT/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv >> "$OUT/env.txt" 2>&1
step train 300 train.md "$PY" -m bench.gpu_train train --config "$CONFIG" --deepspeed_config "$DS" \
  --frames-per-batch "$FRAMES" --utt-frames "$UTT" --json "$OUT/train.json" "${TRAIN[@]}"
if "$PY" -m moe_asr.cli plan --help > /dev/null 2>&1; then
  step plan 150 plan.json "$PY" -m moe_asr.cli plan "$CONFIG" --gpus-per-node 1 --nodes 1 --ep-size 1 \
    --ds-config "$DS" --frames-per-batch "$FRAMES" --utt-seconds "$UTT_SECONDS" --json
else
  echo "planner missing: this checkout's moe-asr has no plan command; no prediction to compare with" \
    | tee -a "$OUT/log.txt"
fi
step compare 15 compare.md "$PY" -m bench.gpu_train compare "$OUT/train.json" "$OUT/plan.json"
echo "step limits add up to ${STEP_LIMITS}s; results in $OUT" | tee -a "$OUT/log.txt"
