"""Score a hypothesis text file against a reference: WER (or CER with --cer) with substitutions, deletions, insertions.

Both files are Kaldi `text` files (`key transcript` per line, as `moe-asr
recognize` writes them). The edit distance and alignment are jiwer's. Every
reference utterance is scored: one missing from the hypotheses counts as an
empty hypothesis (all its words are deletions) and is listed; hypothesis ids
without a reference are listed and ignored. --cer scores characters with the
spaces removed. With -o, OUTDIR gets wer.json (cer.json) with the summary and
wer_per_utt.txt (cer_per_utt.txt) with every utterance's alignment in Kaldi's
per_utt layout (ref / hyp / op rows, then C S I D counts).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_asr.data.kaldi_text import read_table
from moe_asr.decode.scoring import Score, score

_SHOW = 5  # ids printed per list; the JSON has them all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ref", required=True, help="reference Kaldi text file (e.g. OUTDIR/ref.text of recognize)")
    parser.add_argument("--hyp", required=True, help="hypothesis Kaldi text file (e.g. OUTDIR/<mode>/text)")
    parser.add_argument("--cer", action="store_true", help="character error rate over characters without spaces")
    parser.add_argument("-o", "--out-dir", help="write <metric>.json and <metric>_per_utt.txt here")


def _ids(ids: list[str]) -> str:
    if not ids:
        return ""
    return ": " + ", ".join(ids[:_SHOW]) + (", ..." if len(ids) > _SHOW else "")


def report(result: Score) -> list[str]:
    """The printed summary, Kaldi compute-wer style, then the missing and extra ids."""
    errors = result.substitutions + result.deletions + result.insertions
    return [f"%{result.metric.upper()} {100 * result.error_rate:.2f} [ {errors} / {result.ref_tokens}, "
            f"{result.insertions} ins, {result.deletions} del, {result.substitutions} sub ] "
            f"over {result.utterances} utterances",
            f"  missing hypotheses: {len(result.missing)} (scored as deletions){_ids(result.missing)}",
            f"  extra hypotheses:   {len(result.extra)} (ignored){_ids(result.extra)}"]


def run(args: argparse.Namespace) -> int:
    try:
        refs, hyps = read_table(args.ref), read_table(args.hyp)
        result = score(refs, hyps, "char" if args.cer else "word")
    except (OSError, ValueError) as e:
        print(f"moe-asr score: error: {e}", file=sys.stderr)
        return 1
    for line in report(result):
        print(line)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary, per_utt = out / f"{result.metric}.json", out / f"{result.metric}_per_utt.txt"
        summary.write_text(json.dumps(result.summary(), indent=1) + "\n")
        per_utt.write_text("".join(line + "\n" for a in result.alignments for line in a.lines()), encoding="utf-8")
        print(f"  {summary}, {per_utt}")
    return 0
