"""Collect the recipe's scores and RTFs into EXP/results.json and print them as one table.

Usage: python examples/digits/local/report.py --exp exp/demo --model exp/demo/avg3.pt --sets test_synth test_fsdd

Reads EXP/decode/SET/{full,16,8}/summary.json (RTF per mode, from `moe-asr recognize`)
and .../MODE/wer.json (from `moe-asr score`). Mode names: the decoding method for
full context, METHOD_chunkC for streaming decoding with chunk C (chunk by chunk,
with the encoder's caches).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_asr.checkpoint import read_model_state
from moe_asr.tools.model_info import count_parameters

CHUNKS = ("full", "16", "8")


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exp", required=True, help="the run's directory")
    p.add_argument("--model", required=True, help="the decoded model file (for its parameter counts)")
    p.add_argument("--sets", nargs="+", required=True, help="test set names under EXP/decode")
    args = p.parse_args()
    exp = Path(args.exp)
    params = count_parameters(read_model_state(args.model).config.model)
    plots = {name: str(exp / f"{name}.png") for name in ("loss_curves", "expert_load") if (exp / f"{name}.png").is_file()}
    results = {"tests": collect(exp, args.sets), "total_params": params["total_params"],
               "active_params": params["active_params"], "model": args.model, "plots": plots}
    (exp / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    modes = list(dict.fromkeys(m for rows in results["tests"].values() for m in rows))
    width = max(len(m) for m in modes)
    print(f"\n{'WER % / RTF':<{width}}" + "".join(f"  {t:>20}" for t in args.sets))
    for mode in modes:
        cells = [results["tests"][t].get(mode) for t in args.sets]
        print(f"{mode:<{width}}" + "".join(f"  {c['wer']:>9.2f}% {c['rtf']:>9.4f}" if c else f"  {'-':>20}"
                                           for c in cells))
    print(f"\nparameters: {params['total_params'] / 1e6:.2f}M total, {params['active_params'] / 1e6:.2f}M active "
          f"per token ({params['num_experts']} experts, top-{params['top_k']})")
    for name, path in plots.items():
        print(f"{name.replace('_', ' ')}: {path}")
    print(f"results: {exp / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
