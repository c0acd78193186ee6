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
* ``deepspeed``: ``deepspeed.moe.layer.MoE``, top-2, dropless, on the same weights.

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


def variants(nproc: int) -> list[tuple[str, list[str]]]:
    return [(f"grouped, ep={nproc} (ours, expert parallel)", ["model.moe.impl=grouped", f"model.moe.ep_size={nproc}"]),
            ("grouped, ep=1 (ours, data parallel)", ["model.moe.impl=grouped", "model.moe.ep_size=1"]),
            ("loop, ep=1 (WeNet's per-expert loop)", ["model.moe.impl=loop", "model.moe.ep_size=1"]),
            ("deepspeed.moe.layer.MoE, ep=1 (k=2, dropless)", ["model.moe.impl=deepspeed", "model.moe.ep_size=1"])]


def run_variant(args: argparse.Namespace, overrides: list[str], out_dir: Path, port: int) -> float:
    sets = [*args.set, *overrides, f"train.max_steps={args.steps}", f"train.log_interval={args.log_interval}",
            "train.checkpoint_interval=0", f"train.max_epochs={10 ** 6}"]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(args.nproc),
           "--master_port", str(port), str(REPO / "launch/train.py"), "--config", args.config,
           "--deepspeed_config", args.deepspeed_config, "--train-shards", args.train_shards,
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
    args = p.parse_args()
    runs = variants(args.nproc)
    fps: dict[str, list[float]] = {name: [] for name, _ in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, overrides) in enumerate(runs):
                fps[name].append(run_variant(args, overrides, Path(tmp) / f"{r}_{i}", args.port + i))
                print(f"round {r}: {name}: {fps[name][-1]:.0f} frames/s", file=sys.stderr)
    base = max(fps[runs[2][0]])
    print("| MoE implementation | frames/s (best round) | all rounds | vs loop |\n|---|---|---|---|")
    for name, values in fps.items():
        print(f"| {name} | {max(values):.0f} | {', '.join(f'{v:.0f}' for v in values)} | {max(values) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
