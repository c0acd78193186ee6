"""The steps of ``bench/gpu_train.sh``: a short bf16 DeepSpeed training of one config on the one GPU it
finds, and how it compares with ``moe-asr plan``'s prediction for the same layout and batch.

    python -m bench.gpu_train train --config conf/paper_moe_1b.yaml --deepspeed_config ds_configs/zero2_bf16.json \\
        --frames-per-batch 12300 --utt-frames 1230 --json train.json
    python -m bench.gpu_train compare train.json plan.json

``train`` builds the engine as ``launch/train.py`` does (one rank, ``ep_size`` 1, the DeepSpeed JSON's
precision and ZeRO stage) and feeds it synthetic utterances: ``--utt-frames`` random feature frames each
with ``--utt-frames / 25`` random targets (4 per second, as the planner's probe), as many as fit
``--frames-per-batch``, so nothing is downloaded. ``--warmup`` steps (Triton compiles, allocator growth)
are not timed; then ``--steps`` optimizer steps give steps and frames per second, and
``torch.cuda.max_memory_allocated`` over the whole run is the peak that plan's ``total_bytes`` predicts
(model states, gradient buckets and activations). On CPU (``--device cpu``: ``bench/gpu_train.sh --cpu``,
which proves the script) there is no peak to read, and the numbers mean nothing.

``compare`` puts the two side by side: peak memory against the prediction, and the training FLOP/s the
plan's FLOPs per step give at the measured step rate. Without a plan (no planner, or it failed) it says so.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

GIB = 2 ** 30
FRAMES_PER_TOKEN = 25  # 4 targets per second of 100 frames: the planner's default probe


def out(line: str = "") -> None:
    print(line, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(vocab_size: int, input_dim: int, utts: int, frames: int, device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``utts`` utterances of ``frames`` random feature frames and ``frames / 25`` random targets
    (ids 3 .. vocab - 2: no blank, unk or <sos/eos> whichever id a config gives it)."""
    g = torch.Generator().manual_seed(0)
    tokens = max(1, frames // FRAMES_PER_TOKEN)
    feats = torch.randn(utts, frames, input_dim, generator=g).to(device, dtype)
    targets = torch.randint(3, vocab_size - 1, (utts, tokens), generator=g).to(device)
    full = lambda n: torch.full((utts,), n, dtype=torch.long, device=device)  # noqa: E731
    return feats, full(frames), targets, full(tokens)


def cmd_train(args: argparse.Namespace) -> int:
    try:
        import deepspeed
    except ImportError as e:
        out(f"deepspeed is not importable ({e}): install deepspeed==0.19.8 (DS_BUILD_OPS=0, pure Python) "
            f"with its requirements (requirements.txt) and run again")
        return 1
    from moe_asr.engine.deepspeed_engine import build_engine, check_precision_supported, deepspeed_config
    from moe_asr.engine.distributed import init_distributed, shutdown_distributed
    from moe_asr.run.config import precision, zero_stage
    from moe_asr.train import load_experiment

    cfg = load_experiment(args.config, [*args.set, "parallel.ep_size=1"])
    ds = deepspeed_config(args.deepspeed_config, cfg.train)
    check_precision_supported(args.deepspeed_config, ds)
    info = init_distributed()
    device = info.device
    if args.device == "cuda" and device.type != "cuda":
        out("no CUDA device: torch.cuda.is_available() is False")
        return 1
    utts = max(1, args.frames_per_batch // args.utt_frames)
    frames = utts * args.utt_frames
    out(f"{args.config} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}: "
        f"deepspeed {deepspeed.__version__}, torch {torch.__version__}, {precision(ds)}, ZeRO {zero_stage(ds)}, "
        f"1 rank, batch {utts} x {args.utt_frames} frames = {frames} frames")
    t0 = time.perf_counter()
    tm = build_engine(cfg, ds, info)
    dtype = next(tm.model.parameters()).dtype
    sync(device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in tm.model.parameters())
    states = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    out(f"engine built in {build_s:.1f} s: {params:,} parameters on this rank, parameters in {dtype}"
        + (f", {states / GIB:.2f} GiB allocated before the first step" if states is not None else ""))
    batch = synthetic_batch(cfg.model.vocab_size, cfg.model.input_dim, utts, args.utt_frames, device, dtype)
    result = {"config": args.config, "deepspeed_config": args.deepspeed_config, "device": str(device),
              "precision": precision(ds), "zero_stage": zero_stage(ds), "utterances": utts,
              "utt_frames": args.utt_frames, "frames_per_batch": frames, "parameters": params,
              "build_seconds": build_s, "allocated_after_build": states}
    losses: list[float] = []
    start = time.perf_counter()
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                sync(device)
                start = time.perf_counter()
            loss = tm.engine(*batch)["loss"]
            tm.engine.backward(loss)
            tm.engine.step()
            losses.append(loss.item())
            out(f"step {i + 1}{' (warm-up)' if i < args.warmup else ''}: loss {losses[-1]:.3f}, "
                f"{time.perf_counter() - start:.2f} s since the timed steps began")
        sync(device)
    except torch.OutOfMemoryError as e:
        out(f"out of memory at step {len(losses) + 1} with {frames} frames per batch: {str(e).splitlines()[0]}")
        result["error"] = "out of memory"
    seconds = time.perf_counter() - start
    timed = max(0, len(losses) - args.warmup)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result.update(steps=timed, seconds=seconds, losses=losses, peak_allocated=peak,
                  steps_per_second=timed / seconds if timed else None,
                  frames_per_second=timed * frames / seconds if timed else None)
    out()
    out("| steps | seconds | steps/s | frames/s | peak allocated (GiB) |")
    out("|---|---|---|---|---|")
    rate = f"{result['steps_per_second']:.3f} | {result['frames_per_second']:.0f}" if timed else "- | -"
    out(f"| {timed} | {seconds:.2f} | {rate} | {peak / GIB:.2f} |" if peak is not None else
        f"| {timed} | {seconds:.2f} | {rate} | not measured ({device.type}) |")
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    shutdown_distributed()
    return 0 if "error" not in result and timed == args.steps else 1


def cmd_compare(args: argparse.Namespace) -> int:
    train = json.loads(Path(args.train).read_text())
    plan_path = Path(args.plan)
    text = plan_path.read_text() if plan_path.is_file() else ""
    out(f"{train['config']}, {train['precision']} ZeRO {train['zero_stage']}, {train['frames_per_batch']} frames "
        f"per batch, on {train['device']}")
    if not text.strip():
        out(f"no prediction to compare with: {plan_path.name} is missing or empty (the planner is missing or "
            f"failed; see log.txt)")
        return 0
    plan = json.loads(text)
    out()
    out("| quantity | measured | planned | measured / planned |")
    out("|---|---|---|---|")
    peak = train.get("peak_allocated")
    if peak is not None:
        out(f"| peak GPU memory (GiB) | {peak / GIB:.2f} | {plan['total_bytes'] / GIB:.2f} | "
            f"{peak / plan['total_bytes']:.2f} |")
    else:
        out(f"| peak GPU memory (GiB) | not measured ({train['device']}) | {plan['total_bytes'] / GIB:.2f} | - |")
    parts = {"model states": plan["model_states_bytes"], "gradient buckets": plan["buckets_bytes"],
             "activations": plan["activations"]["bytes"]}
    for name, b in parts.items():
        out(f"| of which {name} (GiB) | - | {b / GIB:.2f} | - |")
    rate = train.get("steps_per_second")
    flops = plan["flops_per_step"]
    achieved = f"{rate * flops / 1e12:.3g}" if rate else "-"
    out(f"| training TFLOP/s (plan's {flops / 1e12:.2f} TFLOP per step x steps/s) | {achieved} | - | - |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    train = sub.add_parser("train", help="a short DeepSpeed training on synthetic features")
    train.add_argument("--config", required=True)
    train.add_argument("--deepspeed_config", required=True)
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    train.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    train.add_argument("--frames-per-batch", type=int, required=True)
    train.add_argument("--utt-frames", type=int, default=1230, help="frames per utterance (default 12.3 s)")
    train.add_argument("--steps", type=int, default=20)
    train.add_argument("--warmup", type=int, default=3)
    train.add_argument("--json", required=True, help="where the result goes as JSON")
    compare = sub.add_parser("compare", help="measured (train --json) against planned (moe-asr plan --json)")
    compare.add_argument("train")
    compare.add_argument("plan")
    args = ap.parse_args(argv)
    from moe_asr.run.config import ConfigError

    try:
        return {"train": cmd_train, "compare": cmd_compare}[args.step](args)
    except ConfigError as e:  # a bad config, DeepSpeed JSON or precision: one line, as launch/train.py says it
        out(f"config error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
