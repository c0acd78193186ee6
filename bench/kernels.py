"""Benchmark of the MoE layer's implementations against a dense FFN of the same active FLOPs.

    python -m bench.kernels                       # CPU: the goal shapes, fp32, 2 threads
    python -m bench.kernels --preset full         # the whole grid (long on CPU)
    python -m bench.kernels --preset train --threads 1 --clock process --impls grouped loop dense
                                                  # the digits model's layer, forward + backward
    python -m bench.kernels --device cuda --dtype bf16 --preset full

Each row times one whole ``MoEFeedForward`` forward (router, dispatch, experts,
combine; ``--backward`` adds forward+backward) for ``grouped`` (our kernels),
``grouped_mm`` (the same routing and dispatch with the expert matmuls by
``torch.nn.functional.grouped_mm``, torch's own grouped GEMM; forward only: it
has no CPU backward in torch 2.11), ``loop`` (WeNet's per-expert loop), ``deepspeed`` (``deepspeed.moe.layer.MoE``
dropless, same weights) and ``dense`` (one FFN with ffn = k * expert ffn, i.e.
the same FLOPs per token). On CPU candidates run interleaved, in several rounds,
and the best round counts (robust to other load on a shared machine); on CUDA
each is timed by ``triton.testing.do_bench``. ``floor`` is
the time to run one row through every touched expert (reading their weights
once), the least any MoE path can spend at small token counts on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMPLS = ("grouped", "grouped_mm", "loop", "deepspeed", "dense")

# (experts, tokens, routing, backward): the rows of the goal table.
GOALS = [(8, 16, "balanced", False), (8, 64, "balanced", False), (8, 512, "balanced", False),
         (64, 512, "balanced", False), (64, 8192, "balanced", False), (8, 8192, "balanced", True)]


@dataclass
class Case:
    experts: int
    tokens: int
    routing: str
    backward: bool
    d: int
    ffn: int
    k: int = 2


@dataclass
class Result:
    case: Case
    impl: str
    ms: float
    tflops: float
    x_dense: float


def cases(preset: str, d_list: list[int]) -> list[Case]:
    if preset == "goals":
        return [Case(e, n, r, b, 256, 1024) for e, n, r, b in GOALS]
    if preset == "gpu":  # sized for a few minutes of a lent GPU (autotuning included)
        out = [Case(e, n, r, False, d, 4 * d) for d in d_list for e in (8, 64)
               for n in (16, 512, 8192, 65536) for r in ("balanced", "skewed")]
        return out + [Case(e, 8192, "balanced", True, d, 4 * d) for d in d_list for e in (8, 64)]
    if preset == "train":  # the digits recipe's MoE layer (d 128, 8 experts of 256) on training batches
        return [Case(8, n, r, True, 128, 256) for n, r in ((150, "balanced"), (625, "balanced"),
                                                           (625, "skewed"), (1250, "balanced"))]
    if preset == "quick":
        return [Case(8, 16, "balanced", False, 256, 1024), Case(8, 512, "skewed", False, 256, 1024),
                Case(8, 512, "balanced", True, 256, 1024)]
    out = []
    for d in d_list:
        for e in (8, 16, 64):
            for n in (16, 64, 512, 8192, 65536):
                for r in ("balanced", "skewed"):
                    out.append(Case(e, n, r, False, d, 4 * d))
            out.append(Case(e, 8192, "balanced", True, d, 4 * d))
    return out


class GroupedMM(torch.nn.Module):
    """An MoE layer's router, dispatch and combine with its expert matmuls by ``torch.nn.functional.grouped_mm``
    (which takes no bias: the biases are added per row)."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.layer = layer
        self.router = layer.router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F
        from moe_asr.moe.dispatch import make_plan, permute, unpermute
        from moe_asr_kernels.activations import ACTIVATIONS
        ex = self.layer.experts
        routing, _ = self.router(x)
        plan = make_plan(routing.experts, ex.num_local)
        rows = permute(x, plan)
        offs = plan.counts.cumsum(0).to(torch.int32)
        expert = torch.repeat_interleave(torch.arange(ex.num_local, device=x.device), plan.counts,
                                         output_size=rows.shape[0])
        h = ACTIVATIONS[ex.activation_name](F.grouped_mm(rows, ex.w1, offs=offs) + ex.b1.index_select(0, expert))
        y = F.grouped_mm(h, ex.w2, offs=offs) + ex.b2.index_select(0, expert)
        return unpermute(y, plan, routing.weights)


def build(case: Case, impl: str, device: str, dtype: torch.dtype, seed: int = 0):
    from moe_asr.moe.config import MoEConfig
    from moe_asr.moe.layer import MoEFeedForward
    torch.manual_seed(seed)
    if impl == "dense":
        layer = MoEFeedForward(case.d, case.k * case.ffn, MoEConfig(num_experts=1, top_k=1))
    elif impl == "grouped_mm":
        layer = GroupedMM(MoEFeedForward(case.d, case.ffn, MoEConfig(case.experts, case.k)))
    else:
        layer = MoEFeedForward(case.d, case.ffn, MoEConfig(case.experts, case.k, impl=impl))
    layer = layer.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(case.tokens, case.d, generator=gen)
    if case.routing == "skewed" and impl != "dense":
        # A shared direction u in the inputs that the gate rows favour with
        # Zipf-like strength: a few experts get most tokens, the rest few or none.
        u = torch.randn(case.d, generator=gen)
        u = u / u.norm()
        strength = -torch.log(torch.arange(1, case.experts + 1, dtype=torch.float32)) * 0.6
        with torch.no_grad():
            layer.router.gate.weight.add_((strength[:, None] * u[None, :]).to(device, dtype))
        x = x + 4.0 * u
    return layer, x.to(device=device, dtype=dtype)


def routing_stats(layer, x) -> tuple[int, float]:
    """(experts touched, largest share of the N*k assignments that one expert takes)."""
    with torch.no_grad():
        routing, _ = layer.router(x)
    counts = torch.bincount(routing.experts.flatten(), minlength=layer.num_experts)
    return int((counts > 0).sum()), float(counts.max()) / max(1, routing.experts.numel())


def floor_fn(layer, touched: int, device, dtype):
    """One row through each of ``touched`` experts: the weight-reading floor."""
    ex = layer.experts
    n = max(1, touched)
    xp = torch.randn(n, 1, ex.w1.shape[1], device=device, dtype=dtype)
    w1, b1, w2, b2 = (p.detach()[:n] for p in (ex.w1, ex.b1, ex.w2, ex.b2))

    def run():
        h = torch.nn.functional.silu(torch.baddbmm(b1.unsqueeze(1), xp, w1))
        return torch.baddbmm(b2.unsqueeze(1), h, w2)
    return run


def step_fn(layer, x, backward: bool):
    if not backward:
        layer.eval()

        def fwd():
            with torch.inference_mode():
                return layer(x)
        return fwd
    layer.train()
    xg = x.clone().requires_grad_()
    g = torch.randn_like(x)

    def fwd_bwd():
        for p in layer.parameters():
            p.grad = None
        xg.grad = None
        y = layer(xg)
        y.backward(g)
    return fwd_bwd


CLOCK = time.perf_counter


def timeit(fns: dict, device: str, rounds: int, round_s: float) -> dict[str, float]:
    """Seconds per call. CUDA: ``triton.testing.do_bench`` (mean after warm-up, L2 flushed between calls),
    ``rounds`` times, best kept. CPU: best of rounds, candidates interleaved within each round (robust to
    other load on a shared machine)."""
    if device == "cuda":
        import triton.testing
        return {name: min(triton.testing.do_bench(fn, warmup=10, rep=max(1, int(round_s * 1e3)))
                          for _ in range(rounds)) / 1e3 for name, fn in fns.items()}
    clock = CLOCK
    iters = {}
    for name, fn in fns.items():
        fn(); fn()
        t0 = clock()
        fn()
        one = max(clock() - t0, 1e-6)
        iters[name] = max(1, min(10_000, int(round_s / one)))
    best = {name: float("inf") for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = fns[name], iters[name]
            t0 = clock()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (clock() - t0) / n)
    return best


def run_case(case: Case, impls, device, dtype, rounds, round_s) -> tuple[list[Result], dict]:
    layers = {impl: build(case, impl, device, dtype) for impl in impls}
    ref, x = layers.get("grouped") or layers.get("loop") or build(case, "loop", device, dtype)
    if "grouped_mm" in layers:
        if case.backward:
            del layers["grouped_mm"]  # torch.nn.functional.grouped_mm has no CPU backward (torch 2.11)
        else:
            layer, xi = layers["grouped_mm"]
            try:
                with torch.inference_mode():
                    got, want = layer.eval()(xi), ref.eval()(x)
            except (RuntimeError, NotImplementedError) as err:  # e.g. a dtype or device it does not serve
                print(f"# grouped_mm skipped: {type(err).__name__}: {str(err).splitlines()[0]}", flush=True)
                del layers["grouped_mm"]
            else:
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
    touched, share = routing_stats(ref, x)
    fns = {impl: step_fn(layer, xi, case.backward) for impl, (layer, xi) in layers.items()}
    if not case.backward and device == "cpu":
        fns["floor"] = floor_fn(ref, touched, device, dtype)
    times = timeit(fns, device, rounds, round_s)
    flops = case.tokens * case.k * 4 * case.d * case.ffn * (3 if case.backward else 1)
    dense = times.get("dense")
    results = [Result(case, impl, t * 1e3, flops / t / 1e12, t / dense if dense else float("nan"))
               for impl, t in times.items()]
    return results, {"touched": touched, "top_share": share}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--preset", choices=("goals", "quick", "train", "gpu", "full"), default="goals")
    ap.add_argument("--d", type=int, nargs="+", default=[256, 512, 1024], help="d_model values (full preset)")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--round-seconds", type=float, default=0.1)
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="process: CPU time of this process (with --threads 1, immune to being descheduled)")
    ap.add_argument("--rows", type=int, nargs="+", help="run only these rows (0-based) of the preset")
    ap.add_argument("--no-header", action="store_true", help="print result rows only (to append runs)")
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    dtype = DTYPES[args.dtype or ("fp32" if args.device == "cpu" else "bf16")]
    impls = list(dict.fromkeys(args.impls))
    if "deepspeed" in impls:
        try:
            import deepspeed.moe.layer  # noqa: F401
        except Exception as err:  # noqa: BLE001 - any import failure means: not here
            print(f"# deepspeed unavailable ({type(err).__name__}: {err}); skipping it", flush=True)
            impls.remove("deepspeed")
    if "dense" not in impls:
        impls.append("dense")
    header = print if not args.no_header else (lambda *a, **k: None)
    header(f"# device={args.device} dtype={dtype} threads={torch.get_num_threads()} clock={args.clock} "
          f"torch={torch.__version__} "
          f"load={os.getloadavg()[0]:.2f}", flush=True)
    header("| experts | tokens | routing | pass | d | ffn | touched | top share | " +
          " | ".join(f"{i} ms (x dense)" for i in impls) + " | grouped TFLOP/s |" +
          (" floor ms (x dense) | grouped / floor |" if args.device == "cpu" else ""))
    header("|" + "---|" * (9 + len(impls) + (2 if args.device == "cpu" else 0)), flush=True)
    everything = []
    todo = cases(args.preset, args.d)
    if args.rows:
        todo = [todo[i] for i in args.rows]
    for case in todo:
        res, stats = run_case(case, impls, args.device, dtype, args.rounds, args.round_seconds)
        by = {r.impl: r for r in res}
        cols = " | ".join(f"{by[i].ms:.3f} ({by[i].x_dense:.2f}x)" if i in by else "-" for i in impls)
        line = (f"| {case.experts} | {case.tokens} | {case.routing} | {'fwd+bwd' if case.backward else 'fwd'} | "
                f"{case.d} | {case.ffn} | {stats['touched']} | {stats['top_share']:.2f} | {cols} | "
                f"{by['grouped'].tflops:.3f} |" if "grouped" in by else "")
        if "floor" in by:
            line += f" {by['floor'].ms:.3f} ({by['floor'].x_dense:.2f}x) | " \
                    f"{by['grouped'].ms / by['floor'].ms:.2f} |" if "grouped" in by else ""
        print(line, flush=True)
        everything += [dict(asdict(r), **stats) for r in res]
    header(f"# load at end={os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
