# What every recipe's run.sh shares: options, stages with markers, and the stages after data
# preparation that are the same for every corpus (training, recognition, scoring, the table).
#
# A run.sh sources this file, gives its options their defaults (its own, and those below that it
# changes), then calls `recipe_options "$@"`:
#
#   . examples/common/recipe.sh
#   corpus=/data/LibriSpeech
#   recipe_options "$@"
#   if stage 0 "$data" prepare "data preparation"; then
#     run python examples/librispeech/local/prepare.py --corpus "$corpus" --out "$data"
#     done_mark "$data" prepare
#   fi
#
# Options, Kaldi's way: `--name VALUE` sets the run.sh variable `name` (dashes read as
# underscores) that the script gave a default, and `--name` alone sets one whose default is
# true or false to true. Every command goes through `run`, which prints it (after `+ `) and
# runs it; with `--dry-run` it prints the commands of every selected stage, markers ignored,
# and runs none: that list is what each recipe's README shows, and a test compares the two.

stage=0
stop_stage=100
dry_run=false
nj=2                # processes for shards and CMVN
port=29500          # the ranks' rendezvous port; two runs at once need two
device=cpu          # where recognition runs: cpu or cuda
ranks=2             # training ranks on this node (GPUs, or CPU processes where there are none)
slurm_nodes=0       # > 0: train under Slurm on this many nodes of $ranks GPUs each (sbatch --wait)
chunks="full 16"    # decoding contexts: full context, and streaming chunk sizes
score_opts=         # --cer for languages written without spaces
wenet_data=         # a WeNet recipe's data folder: its <set>/data.list (raw or shard lists) and <set>/text,
                    # used as they are in place of data preparation and shards ($wenet_sets names the sets)

recipe_options() {
  while [ $# -gt 0 ]; do
    local name=${1#--}
    name=${name//-/_}
    if [[ "$1" != --* || ! "$name" =~ ^[a-z][a-z0-9_]*$ ]] || ! declare -p "$name" > /dev/null 2>&1; then
      echo "$0: unknown option $1 (the options are the variables at the top of $0)" >&2
      exit 2
    fi
    if [[ "${!name}" =~ ^(true|false)$ && ! "${2:-}" =~ ^(true|false)$ ]]; then
      printf -v "$name" true
      shift
    else
      [ $# -ge 2 ] || { echo "$0: $1 needs a value" >&2; exit 2; }
      printf -v "$name" '%s' "$2"
      shift 2
    fi
  done
  [ -f launch/train.py ] && [ -d examples/common ] || { echo "$0: run it from the repository root" >&2; exit 2; }
  if ! $dry_run; then
    local bin
    bin=$(cd "${VENV_BIN:-.venv/bin}" && pwd) || { echo "$0: no virtual environment (run make setup)" >&2; exit 2; }
    export PATH="$bin:$PATH"
  fi
}

# show CMD...: the command as a shell line (words quoted only where they must be); `+ ` before it
# unless this is a dry run, whose output is the list of commands itself.
show() {
  local line
  line=$(echo "${*@Q}" | sed "s/'\([^' ]*\)'/\1/g")
  if $dry_run; then echo "$line"; else echo "+ $line"; fi
}

# run CMD...: print the command, then run it (leading VAR=value words set its environment).
run() {
  show "$@"
  $dry_run && return 0
  if [[ "$1" == [A-Za-z_]*=* ]]; then env "$@"; else "$@"; fi
}

# quiet CMD...: run, its standard output kept out of the log (the results table has it).
quiet() {
  show "$@"
  $dry_run || "$@" > /dev/null
}

# stage N DIR NAME TITLE: true when stage N is selected and DIR/.done/NAME does not say it finished.
stage() {
  [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ] || return 1
  if $dry_run; then
    echo "# stage $1: $4"
    return 0
  fi
  [ ! -f "$2/.done/$3" ] || return 1
  echo "=== stage $1: $4 ($(date +%T))"
}

# unmarked_stage N TITLE: true when stage N is selected; it leaves no marker and runs every time, quietly
# (the results table: printed again by a run whose other stages had all finished).
unmarked_stage() {
  [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ] || return 1
  if $dry_run; then echo "# stage $1: $2"; fi
}

# done_mark DIR NAME: the stage finished; the next run skips it.
done_mark() {
  $dry_run || { mkdir -p "$1/.done" && touch "$1/.done/$2"; }
}

# train CONFIG DS_CONFIG OUT_DIR [launch/train.py options]: $ranks ranks on this node with deepspeed,
# or with $slurm_nodes > 0 the Slurm job of launch/slurm/train.sbatch on that many nodes, waited for.
# An interrupted run resumes from its last checkpoint when the stage runs again.
train() {
  local config=$1 ds_config=$2 out=$3
  shift 3
  if [ "$slurm_nodes" -gt 0 ]; then
    run sbatch --wait --nodes "$slurm_nodes" --gpus-per-node "$ranks" launch/slurm/train.sbatch "$config" \
      "$ds_config" "$out" "$@"
  elif [ "$device" = cpu ]; then
    run OMP_NUM_THREADS=1 deepspeed --num_gpus "$ranks" --master_port "$port" launch/train.py --config "$config" \
      --deepspeed_config "$ds_config" --out-dir "$out" "$@"
  else
    run deepspeed --num_gpus "$ranks" --master_port "$port" launch/train.py --config "$config" \
      --deepspeed_config "$ds_config" --out-dir "$out" "$@"
  fi
}

# wenet_set SET: the name WeNet's recipe gives SET ($wenet_sets: `ours=theirs` words; the same when absent).
wenet_set() {
  local pair
  for pair in $wenet_sets; do [ "${pair%%=*}" != "$1" ] || { echo "${pair#*=}"; return; }; done
  echo "$1"
}

# data_list SET: the list every stage after the shards reads for SET: $data/shards/SET/shards.list, or
# WeNet's <set>/data.list under $wenet_data.
data_list() {
  if [ -n "$wenet_data" ]; then echo "$wenet_data/$(wenet_set "$1")/data.list"; else echo "$data/shards/$1/shards.list"; fi
}

# transcripts SET: SET's Kaldi text file (what the units are trained on): ours, or WeNet's.
transcripts() {
  if [ -n "$wenet_data" ]; then echo "$wenet_data/$(wenet_set "$1")/text"; else echo "$data/$1/text"; fi
}

# mode_dir METHOD CHUNK: the folder `moe-asr recognize` writes a mode to.
mode_dir() {
  if [ "$2" = full ]; then echo "$1"; else echo "${1}_chunk${2}_streaming"; fi
}

# recognize MODEL MODES SET...: each set's list (data_list) in every context of $chunks
# (streaming: chunk by chunk with the encoder's caches) into $exp/decode/SET/CHUNK/.
recognize() {
  local model=$1 modes=$2 set chunk
  shift 2
  for set in "$@"; do
    for chunk in $chunks; do
      local context=()
      [ "$chunk" = full ] || context=(--chunk-size "$chunk" --streaming)
      run moe-asr recognize --model "$model" --shards "$(data_list "$set")" --mode "$modes" \
        "${context[@]}" --device "$device" -o "$exp/decode/$set/$chunk"
    done
  done
}

# score MODES SET...: every mode recognize wrote, against its references ($score_opts: --cer).
score() {
  local modes=$1 set chunk method dir
  shift
  for set in "$@"; do
    for chunk in $chunks; do
      for method in ${modes//,/ }; do
        dir=$exp/decode/$set/$chunk/$(mode_dir "$method" "$chunk")
        quiet moe-asr score --ref "$exp/decode/$set/$chunk/ref.text" --hyp "$dir/text" $score_opts -o "$dir"
      done
    done
  done
}
