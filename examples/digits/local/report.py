"""Collect the recipe's scores and RTFs into EXP/results.json and print them as one table.

Usage: python examples/digits/local/report.py --exp exp/demo --model exp/demo/avg3.pt --sets test_synth test_fsdd

Reads EXP/decode/SET/{full,16,8}/summary.json (RTF per mode, from `moe-asr recognize`)
and .../MODE/wer.json (from `moe-asr score`). Mode names: the decoding method for
full context, METHOD_chunkC for streaming decoding with chunk C (chunk by chunk,
with the encoder's caches).

For the headline mode (attention rescoring, full context) it also breaks each
test set down by voice, from `moe-asr score`'s per-utterance alignments: FSDD
keys are ``digit_speaker_take``, synthetic ones ``split_engine_voice_index``.
The WER of each held-out voice and the most frequent word substitutions say
where a recognizer that misses its goal goes wrong.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from moe_asr.checkpoint import read_model_state
from moe_asr.model.parameters import count_parameters

CHUNKS = ("full", "16", "8")
HEADLINE = "attention_rescoring"
TOP_SUBSTITUTIONS = 5


def collect(exp: Path, sets: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    tests: dict[str, dict[str, dict[str, float]]] = {}
    for test in sets:
        rows = tests.setdefault(test, {})
        for chunk in CHUNKS:
            summary_path = exp / "decode" / test / chunk / "summary.json"
            if not summary_path.is_file():
                sys.exit(f"report: {summary_path} is missing (run the recognize stage)")
            summary = json.loads(summary_path.read_text())
            for mode_dir, info in summary["modes"].items():
                wer_path = summary_path.parent / mode_dir / "wer.json"
                if not wer_path.is_file():
                    sys.exit(f"report: {wer_path} is missing (run the score stage)")
                name = info["method"] if chunk == "full" else f"{info['method']}_chunk{chunk}"
                rows[name] = {"wer": 100 * json.loads(wer_path.read_text())["wer"], "rtf": info["rtf"]}
    return tests


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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exp", required=True, help="the run's directory")
    p.add_argument("--model", required=True, help="the decoded model file (for its parameter counts)")
    p.add_argument("--sets", nargs="+", required=True, help="test set names under EXP/decode")
    args = p.parse_args()
    exp = Path(args.exp)
    params = count_parameters(read_model_state(args.model).config.model)
    plots = {name: str(exp / f"{name}.png") for name in ("loss_curves", "expert_load") if (exp / f"{name}.png").is_file()}
    voices = {t: breakdown(exp / "decode" / t / "full" / HEADLINE / "wer_per_utt.txt") for t in args.sets}
    results = {"tests": collect(exp, args.sets), "total_params": params["total_params"],
               "active_params": params["active_params"], "model": args.model, "plots": plots,
               "by_voice": {t: {"mode": HEADLINE, "wer": wer, "substitutions": [list(x) for x in subs]}
                            for t, (wer, subs) in voices.items()}}
    (exp / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    modes = list(dict.fromkeys(m for rows in results["tests"].values() for m in rows))
    width = max(len(m) for m in modes)
    print(f"\n{'WER % / RTF':<{width}}" + "".join(f"  {t:>20}" for t in args.sets))
    for mode in modes:
        cells = [results["tests"][t].get(mode) for t in args.sets]
        print(f"{mode:<{width}}" + "".join(f"  {c['wer']:>9.2f}% {c['rtf']:>9.4f}" if c else f"  {'-':>20}"
                                           for c in cells))
    print(f"\nby voice ({HEADLINE}, full context):")
    for test, (wer, subs) in voices.items():
        print(f"  {test}: " + ", ".join(f"{v} {w:.1f}%" for v, w in wer.items()))
        print("    most substituted: " + (", ".join(f"{r} -> {h} ({n})" for r, h, n in subs) or "none"))
    print(f"\nparameters: {params['total_params'] / 1e6:.2f}M total, {params['active_params'] / 1e6:.2f}M active "
          f"per token ({params['num_experts']} experts, top-{params['top_k']})")
    for name, path in plots.items():
        print(f"{name.replace('_', ' ')}: {path}")
    print(f"results: {exp / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
