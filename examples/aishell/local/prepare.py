"""AISHELL-1 as Kaldi data directories: train, dev (the CV set) and test, transcripts without word spaces.

    python examples/aishell/local/prepare.py --corpus /data/data_aishell --out data/aishell

Reads the corpus as distributed (its per-speaker archives unpacked): ``<corpus>/wav/{train,dev,test}/
<speaker>/<ID>.wav`` and ``<corpus>/transcript/aishell_transcript_v0.8.txt``, one line per
utterance, ``<ID> 而 对 楼市 ...`` (the words spaced). The words are joined, as WeNet's AISHELL
recipe does: the units are characters and the score is CER. Writes
``OUT/{train,dev,test}/{wav.scp,text}`` and ``OUT/skipped.tsv``. Skipped and counted, never
silently: a transcript line whose audio is in no set (``missing audio``), a wav file the
transcript does not list (``missing transcript``; the released corpus has a few hundred), a
line without text (``malformed line``) and a key seen twice (``duplicate key``). A set folder
or the transcript file that is not there is an error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "common"))
from data_dirs import Prepared, write  # noqa: E402

SETS = ("train", "dev", "test")
TRANSCRIPT = Path("transcript") / "aishell_transcript_v0.8.txt"


def read_transcript(path: Path, prepared: Prepared) -> dict[str, str]:
    """{ID: text without spaces}; malformed and repeated lines are rejected."""
    texts: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        key, _, words = line.strip().partition(" ")
        if not key:
            continue
        if not words.strip():
            prepared.reject(f"{path.name}:{n}", "malformed line", line[:80])
        elif key in texts:
            prepared.reject(key, "duplicate key", f"{path.name}:{n}")
        else:
            texts[key] = "".join(words.split())
    return texts


def collect(corpus: Path) -> Prepared:
    prepared = Prepared()
    if not (corpus / TRANSCRIPT).is_file():
        raise FileNotFoundError(f"{corpus / TRANSCRIPT}: no transcript file (is {corpus} the data_aishell folder?)")
    texts = read_transcript(corpus / TRANSCRIPT, prepared)
    found: set[str] = set()
    for set_name in SETS:
        folder = corpus / "wav" / set_name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such set folder (unpack the speaker archives of "
                                    f"{corpus / 'wav'} into wav/{set_name}/<speaker>/)")
        prepared.sets[set_name] = {}
        for wav in sorted(folder.glob("*/*.wav")):
            found.add(wav.stem)
            if wav.stem in texts:
                prepared.add(set_name, wav.stem, str(wav.resolve()), texts[wav.stem])
            else:
                prepared.reject(wav.stem, "missing transcript", f"{wav} is not in {TRANSCRIPT.name}")
    for key in sorted(set(texts) - found):
        prepared.reject(key, "missing audio", f"{TRANSCRIPT.name} lists it, no wav/<set>/<speaker>/{key}.wav")
    return prepared


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, type=Path, help="the data_aishell folder (holding wav/ and transcript/)")
    p.add_argument("--out", required=True, help="folder for the data directories")
    args = p.parse_args(argv)
    try:
        prepared = collect(args.corpus)
    except FileNotFoundError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    return 0 if write(prepared, args.out, "prepare") else 1


if __name__ == "__main__":
    sys.exit(main())
