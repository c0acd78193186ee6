"""Pack a Kaldi data directory or a TSV/JSONL manifest into WebDataset tar shards.

Each shard holds N utterances as `key.txt` (transcript) + `key.flac` or
`key.wav` (mono 16-bit PCM at the source rate; any rate or channel count
soundfile reads is accepted and down-mixed). Shards are written in parallel,
each under a temporary name renamed when complete, and listed in
OUTDIR/shards.list. Unreadable or empty audio, missing transcripts and
duplicate keys are skipped, counted in the summary and listed in
OUTDIR/skipped.tsv; the exit status is nonzero only if nothing was written.
"""
from __future__ import annotations

import argparse
import logging
import random
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from moe_asr.data.manifest import read_kaldi_dir, read_manifest
from moe_asr.data.shards import SHARD_LIST, write_shards
from moe_asr.data.stats import skip_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="TSV (id, path, text[, duration[, offset]]) or JSONL manifest")
    src.add_argument("--data-dir", help="Kaldi data directory: wav.scp, text, optional segments")
    parser.add_argument("--out", required=True, help="output folder for shard-*.tar and shards.list")
    parser.add_argument("--per-shard", type=int, default=1000, help="utterances per shard (default 1000)")
    parser.add_argument("--num-workers", type=int, default=1, help="shards written in parallel")
    parser.add_argument("--format", choices=("wav", "flac"), default="wav",
                        help="audio member format: wav decodes fastest (default), flac is about half the size")
    parser.add_argument("--seed", type=int, default=0,
                        help="shuffle utterances with this seed before sharding (mixes speakers across shards)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the input order")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.data_dir:
        utts, rejected = read_kaldi_dir(args.data_dir)
    else:
        utts, rejected = read_manifest(args.manifest)
    if not args.no_shuffle:
        random.Random(args.seed).shuffle(utts)
    with tqdm(total=len(utts), unit="utt", desc="make-shards") as bar:
        results = write_shards(utts, args.out, args.per_shard, args.num_workers, args.format,
                               on_done=lambda r: bar.update(r.utterances + len(r.rejected)))
    for r in results:
        rejected.extend(r.rejected)
    out = Path(args.out)
    with open(out / "skipped.tsv", "w", encoding="utf-8") as f:
        for r in rejected:
            f.write(f"{r.key}\t{r.reason}\t{r.detail}\n")
    counts = Counter(r.reason for r in rejected)
    examples: dict[str, list[str]] = defaultdict(list)
    for r in rejected:
        examples[r.reason].append(r.key)
    written = sum(r.utterances for r in results)
    shards = sum(1 for r in results if r.path)
    hours = sum(r.seconds for r in results) / 3600
    print(f"make-shards: {written} utterances ({hours:.3f} h) in {shards} shard(s) under {out}")
    print(f"  shard list: {out / SHARD_LIST}")
    for line in skip_summary(counts, examples):
        print(line)
    if rejected:
        print(f"  every skipped utterance: {out / 'skipped.tsv'}")
    if written == 0:
        logging.getLogger(__name__).error("no usable utterance: nothing written")
        return 1
    return 0
