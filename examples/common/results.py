"""Collect a recipe's scores and real-time factors into EXP/results.json and print them as one table.

Usage: python examples/common/results.py --exp EXP --model MODEL --sets SET... [--chunks full 16] [--metric wer]

Reads EXP/decode/SET/CHUNK/summary.json (`moe-asr recognize`: the RTF of each mode) and
EXP/decode/SET/CHUNK/MODE/{wer,cer}.json (`moe-asr score`; cer.json with `score --cer`). A row
is a decoding method at full context (CHUNK `full`), or METHOD_chunkC for streaming decoding
with chunk C (chunk by chunk, with the encoder's caches). results.json is
{"metric": "wer", "tests": {SET: {ROW: {"wer": %, "rtf": ...}}}, "total_params", "active_params",
"model", "plots"}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_asr.checkpoint import read_model_state
from moe_asr.model.parameters import count_parameters

Rows = dict[str, dict[str, dict[str, float]]]


def _read(path: Path, stage: str) -> dict:
    if not path.is_file():
        sys.exit(f"results: {path} is missing (run the {stage} stage)")
    return json.loads(path.read_text())


def collect(exp: Path, sets: list[str], chunks: list[str], metric: str = "wer") -> Rows:
    """{set: {row: {metric: percent, "rtf": ...}}} from what recognize and score wrote."""
    tests: Rows = {}
    for test in sets:
        rows = tests.setdefault(test, {})
        for chunk in chunks:
            summary_path = exp / "decode" / test / chunk / "summary.json"
            for mode_dir, info in _read(summary_path, "recognize")["modes"].items():
                scored = _read(summary_path.parent / mode_dir / f"{metric}.json", "score")
                name = info["method"] if chunk == "full" else f"{info['method']}_chunk{chunk}"
                rows[name] = {metric: 100 * scored[metric], "rtf": info["rtf"]}
    return tests


def summarize(exp: Path, model: str, sets: list[str], chunks: list[str], metric: str = "wer") -> dict:
    """The results of a run: every row of every set, the decoded model's parameter counts, its plots."""
    params = count_parameters(read_model_state(model).config.model)
    plots = {name: str(exp / f"{name}.png") for name in ("loss_curves", "expert_load") if (exp / f"{name}.png").is_file()}
    return {"metric": metric, "tests": collect(exp, sets, chunks, metric), "total_params": params["total_params"],
            "active_params": params["active_params"], "num_experts": params["num_experts"],
            "top_k": params["top_k"], "model": model, "plots": plots}


def table(results: dict) -> list[str]:
    """One row per decoding mode, one column (error rate %, RTF) per test set."""
    sets, metric = list(results["tests"]), results["metric"]
    modes = list(dict.fromkeys(m for rows in results["tests"].values() for m in rows))
    width = max(len(m) for m in modes)
    lines = [f"{f'{metric.upper()} % / RTF':<{width}}" + "".join(f"  {t:>20}" for t in sets)]
    for mode in modes:
        cells = [results["tests"][t].get(mode) for t in sets]
        lines.append(f"{mode:<{width}}" + "".join(f"  {c[metric]:>9.2f}% {c['rtf']:>9.4f}" if c else f"  {'-':>20}"
                                                 for c in cells))
    return lines


def footer(results: dict, exp: Path) -> list[str]:
    """Parameter counts, plots and where results.json is."""
    lines = [f"parameters: {results['total_params'] / 1e6:.2f}M total, {results['active_params'] / 1e6:.2f}M active "
             f"per token ({results['num_experts']} experts, top-{results['top_k']})"]
    lines += [f"{name.replace('_', ' ')}: {path}" for name, path in results["plots"].items()]
    return lines + [f"results: {exp / 'results.json'}"]


def arguments(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--exp", required=True, help="the run's directory")
    p.add_argument("--model", required=True, help="the decoded model file (for its parameter counts)")
    p.add_argument("--sets", nargs="+", required=True, help="test set names under EXP/decode")
    p.add_argument("--chunks", nargs="+", default=["full", "16"], help="decoding contexts under EXP/decode/SET")
    p.add_argument("--metric", choices=("wer", "cer"), default="wer", help="what `moe-asr score` wrote")
    return p


def main() -> int:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    exp = Path(args.exp)
    results = summarize(exp, args.model, args.sets, args.chunks, args.metric)
    (exp / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + "\n".join(table(results)) + "\n\n" + "\n".join(footer(results, exp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
