"""LibriSpeech as Kaldi data directories: the training set, dev-clean + dev-other as CV, the test sets.

    python examples/librispeech/local/prepare.py --corpus /data/LibriSpeech --out data/librispeech

Reads the corpus as distributed: ``<corpus>/<subset>/<speaker>/<chapter>/`` holding
``<speaker>-<chapter>-<NNNN>.flac`` and ``<speaker>-<chapter>.trans.txt``, one line per
utterance (``<speaker>-<chapter>-<NNNN> TRANSCRIPT``, upper case). Writes
``OUT/{train,dev,test_clean,test_other}/{wav.scp,text}`` (transcripts as given; the tokenizer
normalises) and ``OUT/skipped.tsv``. Skipped and counted, never silently: a transcript line
without its audio file (``missing audio``), a flac file no transcript lists or a chapter
without its ``trans.txt`` (``missing transcript``), a line that is not ``ID TRANSCRIPT`` with
the chapter's ID (``malformed line``) and a key seen before (``duplicate key``). A subset
folder that is not there is an error: the set would silently shrink.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "common"))
from data_dirs import Prepared, write  # noqa: E402

TRAIN = ("train-clean-100", "train-clean-360", "train-other-500")
SETS = {"dev": ("dev-clean", "dev-other"), "test_clean": ("test-clean",), "test_other": ("test-other",)}


def read_chapter(folder: Path, set_name: str, prepared: Prepared) -> None:
    """One ``<speaker>/<chapter>`` folder: its transcript lines matched with its flac files."""
    prefix = f"{folder.parent.name}-{folder.name}"
    audio = {p.stem: p for p in folder.glob("*.flac")}
    trans = folder / f"{prefix}.trans.txt"
    listed = set()
    if trans.is_file():
        for n, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            key, _, text = line.partition(" ")
            if not re.fullmatch(rf"{re.escape(prefix)}-\d+", key) or not text.strip():
                prepared.reject(f"{trans.name}:{n}", "malformed line", line[:80])
                continue
            listed.add(key)
            if key not in audio:
                prepared.reject(key, "missing audio", str(folder / f"{key}.flac"))
            else:
                prepared.add(set_name, key, str(audio[key].resolve()), text.strip())
    for key in sorted(set(audio) - listed):
        prepared.reject(key, "missing transcript", f"not in {trans}")


def collect(corpus: Path, sets: dict[str, tuple[str, ...]]) -> Prepared:
    prepared = Prepared()
    for set_name, subsets in sets.items():
        prepared.sets.setdefault(set_name, {})
        for subset in subsets:
            root = corpus / subset
            if not root.is_dir():
                raise FileNotFoundError(f"{root}: no such subset folder (expected {corpus}/{subset}/<speaker>/"
                                        f"<chapter>/ as LibriSpeech is distributed)")
            for chapter in sorted(p for p in root.glob("*/*") if p.is_dir()):
                read_chapter(chapter, set_name, prepared)
    return prepared


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, type=Path, help="the LibriSpeech folder (holding the subset folders)")
    p.add_argument("--out", required=True, help="folder for the data directories")
    p.add_argument("--train", nargs="+", default=list(TRAIN), metavar="SUBSET",
                   help=f"training subsets (default: all three, 960 h: {' '.join(TRAIN)})")
    args = p.parse_args(argv)
    try:
        prepared = collect(args.corpus, {"train": tuple(args.train), **SETS})
    except FileNotFoundError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    return 0 if write(prepared, args.out, "prepare") else 1


if __name__ == "__main__":
    sys.exit(main())
