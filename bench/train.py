"""Training throughput of MoE implementations, side by side in one run.

Trains the same config for the same steps on the same shards once per variant
and round (each a fresh ``torchrun`` job of ``launch/train.py``; variants
interleaved, so a busy spell of the machine hits every variant alike) and
prints a Markdown table of throughput: real (unpadded) input frames of all
ranks over training seconds, summed over the log windows after the first
(warm-up). Every variant sees the same batches, so the frame counts match and
only the seconds differ. The best round of each variant is reported:

* ``grouped, ep=N``: our MoE layer, experts split over the ranks (all-to-all);
* ``grouped, ep=1``: our MoE layer, every rank holding all experts;
* ``loop``: WeNet's per-expert loop (``moe.impl: loop``);
* ``deepspeed``: ``deepspeed.moe.layer.MoE``, top-2, dropless, on the same weights;
* ``dense`` (with ``--dense-config``): the MoE's dense twin of equal active parameters,
  the price of the experts in training time.

``--variants`` picks some of them (keys ``grouped-ep grouped loop deepspeed dense``);
``--variant NAME KEY=VALUE...`` adds one of its own, e.g. a balancing setting in the
expert-parallel layout (``--variant bias parallel.ep_size=2 model.moe.bias_update_rate=0.1``);
two overrides pick its files instead of the run's: ``config=PATH`` and ``deepspeed_config=PATH``
(``--variant dense-overlap config=examples/digits/conf/dense.yaml deepspeed_config=ds.json``).

    python -m bench.train --config conf/tiny_moe.yaml --deepspeed_config ds_configs/zero2_cpu.json \\
        --train-shards data/train/shards.list --cv-shards data/cv/shards.list --nproc 2 --steps 60 \\
        --set data.tokenizer.symbol_table=data/units.txt
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def variants(nproc: int, dense_config: str | None) -> dict[str, tuple[str, list[str]]]:
    """key -> (table label, overrides)."""
    out = {
        "grouped-ep": (f"grouped, ep={nproc} (ours, expert parallel)",
                       ["model.moe.impl=grouped", f"parallel.ep_size={nproc}"]),
        "grouped": ("grouped, ep=1 (ours, data parallel)", ["model.moe.impl=grouped", "parallel.ep_size=1"]),
        "loop": ("loop, ep=1 (WeNet's per-expert loop)", ["model.moe.impl=loop", "parallel.ep_size=1"]),
        "deepspeed": ("deepspeed.moe.layer.MoE, ep=1 (k=2, dropless)",
                      ["model.moe.impl=deepspeed", "parallel.ep_size=1"]),
    }
    if dense_config:
        out["dense"] = (f"dense FFN, equal active parameters ({Path(dense_config).name})",
                        [f"config={dense_config}", "parallel.ep_size=1"])
    return out


# Overrides naming a variant's files rather than a key of its YAML.
FILE_KEYS = ("config", "deepspeed_config")


def split_overrides(overrides: list[str], files: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """A variant's overrides as (its files: ``files`` with FILE_KEYS replaced, its YAML ``--set``s)."""
    files, sets = dict(files), []
    for o in overrides:
        key, value = o.split("=", 1)
        if key in FILE_KEYS:
            files[key] = value
        else:
            sets.append(o)
    return files, sets


def run_variant(args: argparse.Namespace, overrides: list[str], out_dir: Path, port: int) -> float:
    files, sets = split_overrides(overrides, {"config": args.config, "deepspeed_config": args.deepspeed_config})
    sets = [*args.set, *sets, f"train.max_steps={args.steps}", f"train.log_interval={args.log_interval}",
            "train.checkpoint_interval=0", f"train.max_epochs={10 ** 6}"]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(args.nproc),
           "--master_port", str(port), str(REPO / "launch/train.py"), "--config", files["config"],
           "--deepspeed_config", files["deepspeed_config"], "--train-shards", args.train_shards,
           "--cv-shards", args.cv_shards, "--out-dir", str(out_dir)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\nfailed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "frames" in r][1:]
    return sum(r["frames"] for r in windows) / sum(r["seconds"] for r in windows)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--train-shards", required=True)
    p.add_argument("--cv-shards", required=True)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--port", type=int, default=29800)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to launch/train.py")
    p.add_argument("--dense-config", help="also train this dense config (the MoE's twin of equal active parameters)")
    p.add_argument("--variants", nargs="*", help="keys to run (default: all): grouped-ep grouped loop deepspeed dense")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                   help="one more variant: its name, then launch/train.py overrides, config=PATH or "
                        "deepspeed_config=PATH (repeatable)")
    args = p.parse_args()
    runs = variants(args.nproc, args.dense_config)
    if args.variants is not None:
        unknown = set(args.variants) - set(runs)
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}; choose from {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k in args.variants}
    for name, *overrides in args.variant:
        if name in runs or any("=" not in o for o in overrides):
            p.error(f"--variant {name}: a new name, then KEY=VALUE overrides")
        runs[name] = (name, overrides)
    if not runs:
        p.error("no variant to run")
    fps: dict[str, list[float]] = {key: [] for key in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (key, (name, overrides)) in enumerate(runs.items()):
                fps[key].append(run_variant(args, overrides, Path(tmp) / f"{r}_{i}", args.port + i))
                print(f"round {r}: {name}: {fps[key][-1]:.0f} frames/s", file=sys.stderr)
    base_key = "loop" if "loop" in fps else next(iter(fps))
    base = max(fps[base_key])
    print(f"| variant | frames/s (best round) | all rounds | vs {base_key} |\n|---|---|---|---|")
    for key, values in fps.items():
        print(f"| {runs[key][0]} | {max(values):.0f} | {', '.join(f'{v:.0f}' for v in values)} | "
              f"{max(values) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
