#!/usr/bin/env bash
# LibriSpeech 960 h: data preparation -> shards -> sentencepiece units -> global CMVN -> DeepSpeed
# training (the GPUs of one node, or N nodes under Slurm) -> checkpoint average -> recognition in
# four modes, full context and streaming (chunk 16) -> WER -> results table.
#
#   bash examples/librispeech/run.sh --corpus /data/LibriSpeech [--config examples/librispeech/conf/X.yaml]
#        [--ranks 8] [--slurm-nodes N] [--stage N] [--stop-stage N] [--dry-run] [--small]
#
# Run from the repository root. A finished stage leaves a marker (.done/<stage>) and is skipped
# on the next run; an interrupted training resumes from its last checkpoint. Every option is a
# variable below (`--name VALUE`, `--flag`; examples/common/recipe.sh). README.md lists the
# commands, which `--dry-run` prints.
#   --small   a miniature corpus on 2 CPU ranks (examples/common/conf/small_moe.yaml, a few steps):
#             checks that every stage works; options given still win
set -euo pipefail
. examples/common/recipe.sh

small=false
[[ " $* " == *" --small "* ]] && small=true  # other defaults follow from it
corpus=                                      # the LibriSpeech folder: <corpus>/train-clean-100/...
train_subsets="train-clean-100 train-clean-360 train-other-500"
data=data/librispeech
unit_type=unigram                            # sentencepiece model type, as WeNet's recipe (bpe also works)
ep_size=                                     # empty: the config's parallel.ep_size
train_args=                                  # more launch/train.py options: "--set train.accum_grad=2"
wenet_sets="train=train_960"                 # WeNet's names of our sets, where they differ
modes=ctc_greedy_search,ctc_prefix_beam_search,attention,attention_rescoring
if $small; then
  config=examples/common/conf/small_moe.yaml; ds_config=ds_configs/zero2_cpu.json; ep_size=2
  nbpe=100; per_shard=4; average=2
else
  config=examples/librispeech/conf/u2pp_conformer_moe.yaml; ds_config=ds_configs/zero2_bf16.json
  ranks=8; device=cuda; nj=16; nbpe=5000; per_shard=1000; average=10
fi
exp=
recipe_options "$@"
[ -n "$corpus$wenet_data" ] || { echo "$0: give the LibriSpeech folder: --corpus /path/to/LibriSpeech" >&2; exit 2; }
exp=${exp:-exp/librispeech/$(basename "$config" .yaml)}
model=$exp/avg$average.pt
test_sets="test_clean test_other"

if [ -z "$wenet_data" ] && stage 0 "$data" prepare "data preparation: $corpus -> $data/{train,dev,$(echo $test_sets | tr ' ' ,)}"; then
  run python examples/librispeech/local/prepare.py --corpus "$corpus" --train $train_subsets --out "$data"
  done_mark "$data" prepare
fi

if [ -z "$wenet_data" ] && stage 1 "$data" shards "shards (CV and test sets in small shards, so that many ranks share them)"; then
  run moe-asr make-shards --data-dir "$data/train" --out "$data/shards/train" --per-shard $per_shard --num-workers "$nj"
  for set in dev $test_sets; do
    run moe-asr make-shards --data-dir "$data/$set" --out "$data/shards/$set" --per-shard $(( (per_shard + 19) / 20 )) \
      --num-workers "$nj"
  done
  done_mark "$data" shards
fi

if stage 2 "$data" units "sentencepiece $unit_type units ($nbpe) from the training transcripts"; then
  run moe-asr train-tokenizer --text "$(transcripts train)" --text-has-keys --type $unit_type --vocab-size $nbpe \
    --case upper --out "$data/lang"
  done_mark "$data" units
fi

if stage 3 "$data" cmvn "global CMVN over the training shards"; then
  run moe-asr compute-cmvn --shards "$(data_list train)" --config "$config" --out "$data/cmvn.json" \
    --num-workers "$nj"
  done_mark "$data" cmvn
fi

if stage 4 "$exp" train "train $config -> $exp"; then
  train "$config" "$ds_config" "$exp" --train-shards "$(data_list train)" --cv-shards "$(data_list dev)" \
    --set data.tokenizer.type=$unit_type --set data.tokenizer.case=upper \
    --set data.tokenizer.symbol_table="$data/lang/units.txt" --set data.tokenizer.bpe_model="$data/lang/$unit_type.model" \
    --set model.cmvn="$data/cmvn.json" ${ep_size:+--set parallel.ep_size=$ep_size} $train_args
  done_mark "$exp" train
fi

if stage 5 "$exp" average "average the $average checkpoints with the lowest CV loss"; then
  run moe-asr convert average --run "$exp" --best $average -o "$model"
  done_mark "$exp" average
fi

if stage 6 "$exp" recognize "recognize $test_sets: $modes, full context and streaming chunk 16"; then
  recognize "$model" $modes $test_sets
  done_mark "$exp" recognize
fi

if stage 7 "$exp" score "WER of every mode"; then
  score $modes $test_sets
  done_mark "$exp" score
fi

if unmarked_stage 8 "the results table"; then
  run python examples/common/results.py --exp "$exp" --model "$model" --sets $test_sets --chunks $chunks
fi
