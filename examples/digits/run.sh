#!/usr/bin/env bash
# The digits recipe: corpus -> shards -> tokenizer -> CMVN -> DeepSpeed training (2 CPU ranks,
# experts split over both) -> checkpoint average -> recognize -> score -> results table.
#
#   bash examples/digits/run.sh [--stage N] [--stop-stage N] [--dense] [--small] [--data DIR] [--exp DIR]
#
# Run from the repository root (`make demo` does; `make demo DENSE=1` adds --dense). Every stage is one command a user would
# type; a finished stage leaves a marker (.done/<stage>) and is skipped on the next run, and
# an interrupted training run resumes from its last checkpoint. The options and their
# handling are examples/common/recipe.sh's (`--dry-run` prints every command without running it).
#   --dense   the dense twin at equal active parameters (conf/dense.yaml, default exp exp/demo_dense)
#   --small   a few dozen utterances and a few training steps: checks that every stage works
#   --port P  the ranks' rendezvous port (default 29500); two runs at once need two ports
#   --average N  average the N checkpoints with the lowest CV loss (default 3; --small: 2)
set -euo pipefail

. examples/common/recipe.sh
dense=false
small=false
data=data/digits
exp=
average=
chunks="full 16 8"
recipe_options "$@"

recipe=examples/digits
if $dense; then config=$recipe/conf/dense.yaml; ep_size=1; exp=${exp:-exp/demo_dense}
else config=$recipe/conf/moe.yaml; ep_size=2; exp=${exp:-exp/demo}; fi
test_sets="test_synth test_fsdd"
modes=ctc_greedy_search,ctc_prefix_beam_search,attention_rescoring
if $small; then
  corpus_args=(--synth-train 40 --synth-cv 8 --synth-test 12 --synth-accented 10 --fsdd-strings 8 --fsdd-per-digit 2)
  per_shard=10; train_args=(--set train.max_epochs=2 --set train.checkpoint_interval=2); average=${average:-2}
else
  corpus_args=(); per_shard=200; train_args=(); average=${average:-3}
fi
model=$exp/avg$average.pt

if stage 0 "$data" corpus "digits corpus: espeak-ng, flite and festival voices plus FSDD, at 8 kHz -> $data"; then
  run python $recipe/local/make_corpus.py --fsdd ../shared/data/fsdd/recordings --out "$data" --nj "$nj" \
    "${corpus_args[@]}"
  done_mark "$data" corpus
fi

if stage 1 "$data" shards "shards"; then
  for set in train cv $test_sets; do
    run moe-asr make-shards --manifest "$data/$set.tsv" --out "$data/shards/$set" --per-shard $per_shard \
      --num-workers "$nj"
  done
  done_mark "$data" shards
fi

if stage 2 "$data" tokenizer "tokenizer: the words are the units"; then
  run moe-asr train-tokenizer --shards "$data/shards/train/shards.list" --type word --out "$data/lang"
  done_mark "$data" tokenizer
fi

if stage 3 "$data" cmvn "global CMVN over the training shards"; then
  run moe-asr compute-cmvn --shards "$data/shards/train/shards.list" --config $config --out "$data/cmvn.json" \
    --num-workers "$nj"
  done_mark "$data" cmvn
fi

if stage 4 "$exp" train "train $config on 2 CPU ranks, ep_size $ep_size -> $exp"; then
  train $config ds_configs/zero2_cpu.json "$exp" \
    --train-shards "$data/shards/train/shards.list" --cv-shards "$data/shards/cv/shards.list" \
    --set data.tokenizer.symbol_table="$data/lang/units.txt" --set model.cmvn="$data/cmvn.json" \
    --set parallel.ep_size=$ep_size "${train_args[@]}"
  done_mark "$exp" train
fi

if stage 5 "$exp" average "average the $average checkpoints with the lowest CV loss"; then
  run moe-asr convert average --run "$exp" --best $average -o "$model"
  done_mark "$exp" average
fi

if stage 6 "$exp" recognize "recognize: $modes, full context and streaming (chunk 16, chunk 8)"; then
  recognize "$model" $modes $test_sets
  done_mark "$exp" recognize
fi

if stage 7 "$exp" score "score every mode of every test set"; then
  score $modes $test_sets
  done_mark "$exp" score
fi

# The table is printed on every run that reaches the last stage, finished or not.
if unmarked_stage 8 "the results table"; then
  run python $recipe/local/report.py --exp "$exp" --model "$model" --sets $test_sets --chunks $chunks
fi
