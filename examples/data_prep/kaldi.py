"""Kaldi data directory (wav.scp, text, optional segments) -> manifest TSV for `moe-asr make-shards`.

    python examples/data_prep/kaldi.py data/train --out train.tsv

`moe-asr make-shards --data-dir` reads such a directory directly; this script
is for when the manifest itself is wanted (to filter, merge or inspect it).
Segment times become offset/duration; rejected entries are listed at the end.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from moe_asr.data.manifest import read_kaldi_dir, write_manifest
from moe_asr.data.stats import skip_summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("--out", required=True, help="manifest TSV to write")
    args = p.parse_args(argv)
    utts, rejected = read_kaldi_dir(args.data_dir)
    n = write_manifest(utts, args.out)
    print(f"{n} utterances -> {args.out}")
    examples: dict[str, list[str]] = {}
    for r in rejected:
        examples.setdefault(r.reason, []).append(r.key)
    for line in skip_summary(Counter(r.reason for r in rejected), examples):
        print(line)
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
