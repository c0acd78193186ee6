"""Train a tokenizer (characters, or sentencepiece BPE/unigram) and write its symbol table.

Transcripts come from the shards of a shard list or from a text file (one
transcript a line). The case and punctuation options are applied before
training and must be stated in the config's `data.tokenizer` section so the
training pipeline normalises the same way: the tool prints that section and
the resulting `model.vocab_size` to paste into the config.
"""
from __future__ import annotations

import argparse
import logging
from typing import Iterator

import yaml
from tqdm import tqdm

from moe_asr.data.config import TokenizerConfig
from moe_asr.data.shards import read_shard_list, read_shard
from moe_asr.data.stats import DataStats
from moe_asr.data.tokenizer import train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="shard list file (shards.list from make-shards)")
    src.add_argument("--text", help="text file, one transcript a line")
    parser.add_argument("--text-has-keys", action="store_true",
                        help="each --text line starts with an utterance id (Kaldi `text`)")
    parser.add_argument("--type", choices=("char", "word", "bpe", "unigram"), default="char")
    parser.add_argument("--vocab-size", type=int, default=0, help="sentencepiece vocabulary size (bpe/unigram)")
    parser.add_argument("--out", required=True, help="folder for units.txt (and the sentencepiece model)")
    parser.add_argument("--case", choices=("keep", "lower", "upper"), default="keep")
    parser.add_argument("--remove-punctuation", action="store_true")
    parser.add_argument("--keep-punctuation", default="'", help="punctuation kept with --remove-punctuation")


def _transcripts(args: argparse.Namespace) -> Iterator[str]:
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            for line in f:
                if args.text_has_keys:
                    parts = line.split(maxsplit=1)
                    yield parts[1] if len(parts) > 1 else ""
                else:
                    yield line
        return
    stats = DataStats()
    for shard in tqdm(read_shard_list(args.shards), unit="shard", desc="reading transcripts"):
        for sample in read_shard(shard, stats):
            if sample.text:
                yield sample.text


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TokenizerConfig(type=args.type, case=args.case, remove_punctuation=args.remove_punctuation,
                          keep_punctuation=args.keep_punctuation)
    cfg, vocab_size = train_tokenizer(_transcripts(args), cfg, args.out, args.vocab_size)
    print(f"train-tokenizer: {cfg.type} tokenizer, vocab_size {vocab_size}, symbol table {cfg.symbol_table}")
    print("Put this in the experiment config (or model.vocab_size: auto, which reads the symbol table):")
    print(yaml.safe_dump({"model": {"vocab_size": vocab_size},
                          "data": {"tokenizer": {k: getattr(cfg, k) for k in
                                                 ("type", "symbol_table", "bpe_model", "case",
                                                  "remove_punctuation", "keep_punctuation")}}},
                         sort_keys=False), end="")
    return 0
