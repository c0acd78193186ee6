"""Where a training step's time goes, an MoE against its dense twin: forward and backward per module kind, and AdamW.

    python -m bench.train_breakdown examples/digits/conf/dense.yaml examples/digits/conf/moe.yaml \\
        --vocab 14 --threads 1 --frames 2500 --utt-frames 250 --rounds 5 --ops 12

One process and one thread (a rank's share of a 2-core machine when two ranks
train), no DeepSpeed and no communication: what is left of ``bench.train``'s
MoE/dense gap after this one is the distributed part (gradient reductions,
all-to-alls, ranks waiting for each other). Each step is a fixed batch of
random features (``--frames`` padded frames in utterances of ``--utt-frames``,
4 random tokens each; the features require grad, so that the subsampling's
backward is timed) through the model's training forward, its backward and
the optimizer the engine builds (fused AdamW). Forward and backward of each
module kind are timed by module hooks: a backward from the moment the
gradient of the module's output is ready until that of its input is (its
weight gradients included); "other" is the rest (norms, residuals, masks,
losses). Models take turns in every round; the median round counts.

``--ops N`` adds ``torch.profiler``'s N most expensive ops (self time) of one
step of each model, to see which operations the gap is made of.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from dataclasses import replace

import torch
from torch import nn

from moe_asr.engine.optim import build_optimizer
from moe_asr.model.ffn_share import KINDS as ENCODER_KINDS, encoder_module_kinds
from moe_asr.model.u2pp import U2PPModel, build_model
from moe_asr.run.config import load_config

KINDS = (*ENCODER_KINDS, "decoder attention", "decoder ffn")


def module_kinds(model: U2PPModel) -> list[tuple[nn.Module, str]]:
    """The timed modules of a U2++ model and their kinds (disjoint: none is inside another)."""
    out = encoder_module_kinds(model)
    decoders = [model.decoder.left_decoder, model.decoder.right_decoder]
    for layer in (lay for dec in decoders if dec is not None for lay in dec.decoders):
        out += [(layer.self_attn, "decoder attention"), (layer.src_attn, "decoder attention"),
                (layer.feed_forward, "decoder ffn")]
    return out


class StepTimers:
    """Seconds per (kind, "fwd" | "bwd"), accumulated by forward and backward hooks while ``active``."""

    def __init__(self, model: U2PPModel) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.active = True
        self._start: dict[int, float] = {}
        for module, kind in module_kinds(model):
            module.register_forward_pre_hook(self._begin)
            module.register_forward_hook(lambda m, args, out, kind=kind: self._end(m, kind, "fwd"))
            module.register_full_backward_pre_hook(self._begin_backward)
            module.register_full_backward_hook(lambda m, gin, gout, kind=kind: self._end(m, kind, "bwd"))

    def _begin(self, module: nn.Module, args: object) -> None:
        self._start[id(module)] = time.perf_counter()

    def _begin_backward(self, module: nn.Module, grad_out: object) -> None:
        self._start[id(module)] = time.perf_counter()

    def _end(self, module: nn.Module, kind: str, phase: str) -> None:
        if self.active:
            self.seconds[kind, phase] += time.perf_counter() - self._start[id(module)]


def make_batch(frames: int, utt_frames: int, input_dim: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b = max(1, frames // utt_frames)
    # Features that require grad: a module's backward hook fires once its input's gradient is computed,
    # so without one the subsampling's backward would go uncounted (both models pay this one extra grad).
    feats = torch.randn(b, utt_frames, input_dim, generator=g).requires_grad_()
    lengths = torch.full((b,), utt_frames)
    targets = torch.randint(1, vocab - 1, (b, 4), generator=g)
    return feats, lengths, targets, torch.full((b,), 4)


class Subject:
    """One model with its optimizer and timers; ``step`` returns the step's seconds by part."""

    def __init__(self, path: str, vocab: int, impl: str | None) -> None:
        cfg = load_config(path)
        model_cfg = replace(cfg.model, vocab_size=vocab if cfg.model.vocab_size == "auto" else cfg.model.vocab_size,
                            cmvn=None)
        if impl and model_cfg.moe.num_experts > 1:
            model_cfg = replace(model_cfg, moe=replace(model_cfg.moe, impl=impl))
        torch.manual_seed(0)
        self.model = build_model(model_cfg).train()
        self.optimizer = build_optimizer(self.model, cfg.train, zero_stage=1)
        self.timers = StepTimers(self.model)
        self.label = path if not impl or model_cfg.moe.num_experts == 1 else f"{path} ({impl})"
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self, batch) -> dict[str, float]:
        self.timers.seconds.clear()
        t0 = time.perf_counter()
        loss = self.model(*batch)["loss"]
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        parts = {f"{kind} {phase}": self.timers.seconds[kind, phase] for kind in KINDS for phase in ("fwd", "bwd")}
        parts["other fwd"] = (t1 - t0) - sum(self.timers.seconds[k, "fwd"] for k in KINDS)
        parts["other bwd"] = (t2 - t1) - sum(self.timers.seconds[k, "bwd"] for k in KINDS)
        parts["optimizer"] = t3 - t2
        parts["step"] = t3 - t0
        return parts


def top_ops(subject: Subject, batch, n: int) -> str:
    subject.timers.active = False
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        subject.step(batch)
    subject.timers.active = True
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="training configs; the first is the reference (the dense twin)")
    p.add_argument("--vocab", type=int, default=14, help="vocabulary size for configs that say 'auto'")
    p.add_argument("--impls", default="grouped", help="comma-separated moe.impl values to run each MoE config with")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--frames", type=int, default=2500, help="padded frames per batch")
    p.add_argument("--utt-frames", type=int, default=250, help="frames per utterance")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (after one untimed)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ops", type=int, default=0, help="print the N most expensive ops of one step per model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    subjects = [Subject(path, args.vocab, impl) for i, path in enumerate(args.configs)
                for impl in ([None] if i == 0 else args.impls.split(","))]
    first = subjects[0].model
    batch = make_batch(args.frames, args.utt_frames, first.cfg.input_dim, first.vocab_size)
    rounds: dict[str, list[dict[str, float]]] = {s.label: [] for s in subjects}
    for r in range(args.rounds):
        for s in subjects:
            s.step(batch)  # untimed: first-call allocations
            steps = [s.step(batch) for _ in range(args.steps)]
            rounds[s.label].append({k: sum(st[k] for st in steps) / len(steps) for k in steps[0]})
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{s.label} {rounds[s.label][-1]['step'] * 1e3:.0f} ms" for s in subjects), flush=True)

    median = {label: {k: statistics.median(rd[k] for rd in rs) for k in rs[0]} for label, rs in rounds.items()}
    ref = median[subjects[0].label]
    keys = [k for k in ref if k != "step" and any(m[k] > 5e-4 for m in median.values())] + ["step"]
    print(f"\n{torch.get_num_threads()} thread(s), batch {batch[0].shape[0]} x {args.utt_frames} frames, "
          f"median of {args.rounds} rounds x {args.steps} steps; ms per step (gap: minus the first model)\n")
    print("| part | " + " | ".join(f"{s.label} ({s.params / 1e6:.2f}M)" for s in subjects) + " |")
    print("|---|" + "---|" * len(subjects))
    for k in keys:
        cells = [f"{ref[k] * 1e3:.1f}"]
        for s in subjects[1:]:
            v = median[s.label][k]
            cells.append(f"{v * 1e3:.1f} ({(v - ref[k]) * 1e3:+.1f})")
        print(f"| {k} | " + " | ".join(cells) + " |")
    print("| MoE/dense step | 1.00x | " + " | ".join(
        f"{median[s.label]['step'] / ref['step']:.2f}x" for s in subjects[1:]) + " |")
    for s in subjects[:args.ops and len(subjects)]:
        print(f"\n{s.label}: the {args.ops} most expensive ops of one step (self time)\n{top_ops(s, batch, args.ops)}")


if __name__ == "__main__":
    main()
