"""LibriSpeech layout -> manifest TSV (id, path, text, duration) for `moe-asr make-shards --manifest`.

    python examples/data_prep/librispeech.py /data/LibriSpeech train-clean-100 train-clean-360 --out train.tsv

Reads ``<root>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt``
(lines ``<utt-id> <TRANSCRIPT>``) and the ``<utt-id>.flac`` beside it.
Utterances whose audio file is missing are reported and left out.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import soundfile as sf

from moe_asr.data.manifest import Utterance, write_manifest

log = logging.getLogger("librispeech")


def collect(root: Path, subsets: list[str]) -> list[Utterance]:
    utts = []
    for subset in subsets:
        if not (root / subset).is_dir():
            raise FileNotFoundError(f"{root / subset}: subset folder not found")
        for trans in sorted((root / subset).glob("*/*/*.trans.txt")):
            for line in trans.read_text(encoding="utf-8").splitlines():
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    continue
                audio = trans.parent / f"{parts[0]}.flac"
                if not audio.is_file():
                    log.warning("%s: no audio file %s", parts[0], audio)
                    continue
                utts.append(Utterance(parts[0], str(audio), parts[1], duration=sf.info(str(audio)).duration))
    return utts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="the LibriSpeech folder (holding the subset folders)")
    p.add_argument("subsets", nargs="+", help="subset folder names, e.g. train-clean-100")
    p.add_argument("--out", required=True, help="manifest TSV to write")
    args = p.parse_args(argv)
    n = write_manifest(collect(args.root, args.subsets), args.out)
    print(f"{n} utterances -> {args.out}")
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
