"""The digits recipe's results: examples/common/results.py's table, plus the WER of every held-out voice.

Usage: python examples/digits/local/report.py --exp exp/demo --model exp/demo/avg3.pt --sets test_synth test_fsdd \\
           --chunks full 16 8

Writes EXP/results.json as examples/common/results.py does, with a ``by_voice`` entry: for the
headline mode (attention rescoring, full context) each test set broken down by voice, from
`moe-asr score`'s per-utterance alignments (FSDD keys are ``digit_speaker_take``, synthetic ones
``split_engine_voice_index``). The WER of each held-out voice and the most frequent word
substitutions say where a recognizer that misses its goal goes wrong.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "common"))
from results import arguments, footer, summarize, table  # noqa: E402

HEADLINE = "attention_rescoring"
TOP_SUBSTITUTIONS = 5


def voice_of(key: str) -> str:
    """``6_george_12`` -> ``george``; ``test_festival_cmu_us_slt_arctic_hts_00012`` -> ``festival cmu_us_slt_arctic_hts``."""
    parts = key.split("_")
    if parts[0].isdigit():
        return parts[1]
    return f"{parts[1]} {'_'.join(parts[2:-1])}"


def breakdown(per_utt: Path) -> tuple[dict[str, float], list[tuple[str, str, int]]]:
    """WER % per voice and the most frequent (reference, hypothesis) substitutions of one scored mode."""
    if not per_utt.is_file():
        sys.exit(f"report: {per_utt} is missing (run the score stage)")
    errors: Counter[str] = Counter()
    words: Counter[str] = Counter()
    subs: Counter[tuple[str, str]] = Counter()
    rows: dict[str, list[str]] = {}
    for line in per_utt.read_text().splitlines():
        key, kind, *cells = line.split()
        if kind == "#csid":
            c, s, i, d = map(int, cells)
            errors[voice_of(key)] += s + i + d
            words[voice_of(key)] += c + s + d
            subs.update((r, h) for r, h, op in zip(rows["ref"], rows["hyp"], rows["op"]) if op == "S")
        else:
            rows[kind] = cells
    wer = {v: 100 * errors[v] / words[v] for v in sorted(words) if words[v]}
    return wer, [(r, h, n) for (r, h), n in subs.most_common(TOP_SUBSTITUTIONS)]


def main() -> int:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    exp = Path(args.exp)
    results = summarize(exp, args.model, args.sets, args.chunks, args.metric)
    voices = {t: breakdown(exp / "decode" / t / "full" / HEADLINE / "wer_per_utt.txt") for t in args.sets}
    results["by_voice"] = {t: {"mode": HEADLINE, "wer": wer, "substitutions": [list(x) for x in subs]}
                           for t, (wer, subs) in voices.items()}
    (exp / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + "\n".join(table(results)))
    print(f"\nby voice ({HEADLINE}, full context):")
    for test, (wer, subs) in voices.items():
        print(f"  {test}: " + ", ".join(f"{v} {w:.1f}%" for v, w in wer.items()))
        print("    most substituted: " + (", ".join(f"{r} -> {h} ({n})" for r, h, n in subs) or "none"))
    print("\n" + "\n".join(footer(results, exp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
