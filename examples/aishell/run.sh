#!/usr/bin/env bash
# AISHELL-1 (178 h of read Mandarin): data preparation -> shards -> character units -> global CMVN ->
# DeepSpeed training (the GPUs of one node, or N nodes under Slurm) -> checkpoint average ->
# recognition in four modes, full context and streaming (chunk 16) -> CER -> results table.
#
#   bash examples/aishell/run.sh --corpus /data/data_aishell [--config examples/aishell/conf/X.yaml]
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
corpus=                                      # the data_aishell folder: <corpus>/wav/train/..., <corpus>/transcript/
data=data/aishell
ep_size=                                     # empty: the config's parallel.ep_size
train_args=                                  # more launch/train.py options: "--set train.accum_grad=2"
wenet_sets=                                  # WeNet's names of our sets: the same
modes=ctc_greedy_search,ctc_prefix_beam_search,attention,attention_rescoring
score_opts=--cer                             # Mandarin is written without spaces: CER over characters
if $small; then
  config=examples/common/conf/small_moe.yaml; ds_config=ds_configs/zero2_cpu.json; ep_size=2
  per_shard=2; average=2
else
  config=examples/aishell/conf/u2pp_conformer_moe.yaml; ds_config=ds_configs/zero2_bf16.json
  ranks=8; device=cuda; nj=16; per_shard=1000; average=10
fi
exp=
recipe_options "$@"
[ -n "$corpus$wenet_data" ] || { echo "$0: give the AISHELL-1 folder: --corpus /path/to/data_aishell" >&2; exit 2; }
exp=${exp:-exp/aishell/$(basename "$config" .yaml)}
model=$exp/avg$average.pt

if [ -z "$wenet_data" ] && stage 0 "$data" prepare "data preparation: $corpus -> $data/{train,dev,test}"; then
  run python examples/aishell/local/prepare.py --corpus "$corpus" --out "$data"
  done_mark "$data" prepare
fi

if [ -z "$wenet_data" ] && stage 1 "$data" shards "shards (dev and test in small shards, so that many ranks share them)"; then
  run moe-asr make-shards --data-dir "$data/train" --out "$data/shards/train" --per-shard $per_shard --num-workers "$nj"
  for set in dev test; do
    run moe-asr make-shards --data-dir "$data/$set" --out "$data/shards/$set" --per-shard $(( (per_shard + 19) / 20 )) \
      --num-workers "$nj"
  done
  done_mark "$data" shards
fi

if stage 2 "$data" units "character units from the training transcripts"; then
  run moe-asr train-tokenizer --text "$(transcripts train)" --text-has-keys --type char --out "$data/lang"
  done_mark "$data" units
fi

if stage 3 "$data" cmvn "global CMVN over the training shards"; then
  run moe-asr compute-cmvn --shards "$(data_list train)" --config "$config" --out "$data/cmvn.json" \
    --num-workers "$nj"
  done_mark "$data" cmvn
fi

if stage 4 "$exp" train "train $config -> $exp"; then
  train "$config" "$ds_config" "$exp" --train-shards "$(data_list train)" --cv-shards "$(data_list dev)" \
    --set data.tokenizer.type=char \
    --set data.tokenizer.symbol_table="$data/lang/units.txt" --set model.cmvn="$data/cmvn.json" \
    ${ep_size:+--set parallel.ep_size=$ep_size} $train_args
  done_mark "$exp" train
fi

if stage 5 "$exp" average "average the $average checkpoints with the lowest CV loss"; then
  run moe-asr convert average --run "$exp" --best $average -o "$model"
  done_mark "$exp" average
fi

if stage 6 "$exp" recognize "recognize test: $modes, full context and streaming chunk 16"; then
  recognize "$model" $modes test
  done_mark "$exp" recognize
fi

if stage 7 "$exp" score "CER of every mode"; then
  score $modes test
  done_mark "$exp" score
fi

if unmarked_stage 8 "the results table"; then
  run python examples/common/results.py --exp "$exp" --model "$model" --sets test --chunks $chunks --metric cer
fi
