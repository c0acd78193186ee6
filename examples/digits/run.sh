#!/usr/bin/env bash
# The digits recipe: corpus -> shards -> tokenizer -> CMVN -> DeepSpeed training (2 CPU ranks,
# experts split over both) -> checkpoint average -> recognize -> score -> results table.
#
#   bash examples/digits/run.sh [--stage N] [--stop-stage N] [--dense] [--small] [--data DIR] [--exp DIR]
#
# Run from the repository root (`make demo` does; `make demo DENSE=1` adds --dense). Every stage is one command a user would
# type; a finished stage leaves a marker (.done/<stage>) and is skipped on the next run, and
# an interrupted training run resumes from its last checkpoint.
#   --dense   the dense twin at equal active parameters (conf/dense.yaml, default exp exp/demo_dense)
#   --small   a few dozen utterances and a few training steps: checks that every stage works
#   --port P  the ranks' rendezvous port (default 29500); two runs at once need two ports
#   --average N  average the N checkpoints with the lowest CV loss (default 3; --small: 2)
set -euo pipefail

stage=0
stop_stage=7
dense=false
small=false
data=data/digits
exp=
nj=2
port=29500
average_arg=
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage|--stop_stage) stop_stage=$2; shift 2 ;;
    --dense) dense=true; shift ;;
    --small) small=true; shift ;;
    --data) data=$2; shift 2 ;;
    --exp) exp=$2; shift 2 ;;
    --nj) nj=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --average) average_arg=$2; shift 2 ;;
    *) echo "run.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

recipe=examples/digits
[ -f launch/train.py ] && [ -d "$recipe" ] || { echo "run.sh: run it from the repository root" >&2; exit 2; }
bin=$(cd "${VENV_BIN:-.venv/bin}" && pwd) || { echo "run.sh: no virtual environment (run make setup)" >&2; exit 2; }
export PATH="$bin:$PATH"
if $dense; then config=$recipe/conf/dense.yaml; ep_size=1; exp=${exp:-exp/demo_dense}
else config=$recipe/conf/moe.yaml; ep_size=2; exp=${exp:-exp/demo}; fi
test_sets="test_synth test_fsdd"
modes=ctc_greedy_search,ctc_prefix_beam_search,attention_rescoring
if $small; then
  corpus_args=(--synth-train 40 --synth-cv 8 --synth-test 12 --synth-accented 10 --fsdd-strings 8 --fsdd-per-digit 2)
  per_shard=10; train_args=(--set train.max_epochs=2 --set train.checkpoint_interval=2); average=2
else
  corpus_args=(); per_shard=200; train_args=(); average=3
fi
average=${average_arg:-$average}

# A stage runs unless its marker says it finished; `done_mark` writes the marker.
run_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ] && [ ! -f "$2/.done/$3" ]; }
done_mark() { mkdir -p "$1/.done" && touch "$1/.done/$2"; }
say() { echo "=== stage $1: $2 ($(date +%T))"; }

if run_stage 0 "$data" corpus; then
  say 0 "digits corpus: espeak-ng, flite and festival voices plus FSDD, at 8 kHz -> $data"
  python $recipe/local/make_corpus.py --fsdd ../shared/data/fsdd/recordings --out "$data" --nj "$nj" \
    "${corpus_args[@]}"
  done_mark "$data" corpus
fi

if run_stage 1 "$data" shards; then
  say 1 "shards"
  for set in train cv $test_sets; do
    moe-asr make-shards --manifest "$data/$set.tsv" --out "$data/shards/$set" --per-shard $per_shard --num-workers "$nj"
  done
  done_mark "$data" shards
fi

if run_stage 2 "$data" tokenizer; then
  say 2 "tokenizer: the words are the units"
  moe-asr train-tokenizer --shards "$data/shards/train/shards.list" --type word --out "$data/lang"
  done_mark "$data" tokenizer
fi

if run_stage 3 "$data" cmvn; then
  say 3 "global CMVN over the training shards"
  moe-asr compute-cmvn --shards "$data/shards/train/shards.list" --config $config --out "$data/cmvn.json" \
    --num-workers "$nj"
  done_mark "$data" cmvn
fi

if run_stage 4 "$exp" train; then
  say 4 "train $config on 2 CPU ranks, ep_size $ep_size -> $exp"
  OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port "$port" launch/train.py --config $config \
    --deepspeed_config ds_configs/zero2_cpu.json --out-dir "$exp" \
    --train-shards "$data/shards/train/shards.list" --cv-shards "$data/shards/cv/shards.list" \
    --set data.tokenizer.symbol_table="$data/lang/units.txt" --set model.cmvn="$data/cmvn.json" \
    --set parallel.ep_size=$ep_size "${train_args[@]}"
  done_mark "$exp" train
fi

if run_stage 5 "$exp" average; then
  say 5 "average the $average checkpoints with the lowest CV loss"
  moe-asr convert average --run "$exp" --best $average -o "$exp/avg$average.pt"
  done_mark "$exp" average
fi

if run_stage 6 "$exp" recognize; then
  say 6 "recognize: $modes, full context and streaming (chunk 16, chunk 8)"
  for set in $test_sets; do
    for chunk in full 16 8; do
      opts=(); [ $chunk = full ] || opts=(--chunk-size $chunk --streaming)
      moe-asr recognize --model "$exp/avg$average.pt" --shards "$data/shards/$set/shards.list" --mode $modes \
        "${opts[@]}" -o "$exp/decode/$set/$chunk"
    done
  done
  done_mark "$exp" recognize
fi

if run_stage 7 "$exp" score; then
  say 7 "score every mode of every test set"
  for set in $test_sets; do
    for hyp in "$exp"/decode/$set/*/*/text; do
      moe-asr score --ref "$(dirname "$(dirname "$hyp")")/ref.text" --hyp "$hyp" -o "$(dirname "$hyp")" > /dev/null
    done
  done
  done_mark "$exp" score
fi

# The table is printed on every run that reaches the last stage, finished or not.
if [ "$stop_stage" -ge 7 ]; then
  python $recipe/local/report.py --exp "$exp" --model "$exp/avg$average.pt" --sets $test_sets
fi
