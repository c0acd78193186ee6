# Sourced by bench/gpu.sh and bench/gpu_model.sh (from the repository root): the interpreter, the import
# path of a fresh checkout, and the step runner. Nothing is installed: a GPU machine has torch and triton
# but not this project, so the kernels are imported from kernels/ through a link named moe_asr_kernels.

# PY: $PYTHON, else the project's venv if it has torch, else python3, else python.
pick_python() {
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python
    elif command -v python3 >/dev/null; then PY=python3
    else PY=python; fi
  fi
}

# PYTHONPATH: a temporary folder holding the link moe_asr_kernels -> kernels/, then the repository root
# (moe_asr, bench, tests). Removed when the script exits.
kernels_on_path() {
  GPU_PKG=$(mktemp -d)
  ln -s "$PWD/kernels" "$GPU_PKG/moe_asr_kernels"
  trap 'rm -rf "$GPU_PKG"' EXIT
  export PYTHONPATH="$GPU_PKG:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
}

# step NAME LIMIT_S FILE CMD...: run CMD under LIMIT_S seconds, its stdout to $OUT/FILE, its stderr to
# $OUT/log.txt, then one line "step NAME limit_s=.. seconds=.. rc=.." (also on stdout). A step that
# fails or runs out of time (rc 124) does not stop the next one.
STEP_LIMITS=0
step() {
  local name=$1 limit=$2 file=$3 t0=$SECONDS rc
  shift 3
  STEP_LIMITS=$((STEP_LIMITS + limit))
  echo "## $name: $*" >> "$OUT/log.txt"
  timeout -k 5 "$limit" "$@" > "$OUT/$file" 2>> "$OUT/log.txt"
  rc=$?
  echo "step $name limit_s=$limit seconds=$((SECONDS - t0)) rc=$rc" | tee -a "$OUT/log.txt"
}
