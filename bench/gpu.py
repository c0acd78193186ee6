"""The measuring steps of ``bench/gpu.sh``: one subcommand per step, each writing its result to stdout
row by row as it goes (the script sends it to the step's file, so a step stopped at its time limit keeps
the rows it finished).

    python -m bench.gpu env      # devices, versions, where the kernels were imported from
    python -m bench.gpu sweep    # every forward and weight-gradient tile x bf16/fp16/fp32 (IEEE, TF32): CSV
    python -m bench.gpu large    # 1M tokens, d 1024, FFN 4096, bf16 (tensors past 2^31 elements), sampled
    python -m bench.gpu gemm     # grouped GEMM: ours vs torch.nn.functional.grouped_mm vs bmm vs a per-expert loop
    python -m bench.gpu layer    # MoE layer forward+backward; 16-token streaming eager vs CUDA-graph replay

``--tiny`` runs the same code on tiny shapes (``bench/gpu.sh --cpu``: CPU tensors under
``TRITON_INTERPRET=1``, to prove the script, not to measure). Timings on CUDA come from
``triton.testing.do_bench`` (mean ms after warm-up, caches flushed between calls).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Callable, Iterator

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# precision -> (dtype, torch's fp32 matmul setting, largest error relative to max |reference| that passes)
PRECISIONS = {"bf16": (torch.bfloat16, "ieee", 1e-2), "fp16": (torch.float16, "ieee", 2e-3),
              "fp32-ieee": (torch.float32, "ieee", 1e-4), "fp32-tf32": (torch.float32, "tf32", 1e-2)}


def out(line: str = "") -> None:
    print(line, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Mean milliseconds per call: ``do_bench`` on CUDA; on CPU (the interpreter run that proves the
    script) one call after a warm-up."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=40)
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@contextmanager
def fp32_precision(mode: str) -> Iterator[None]:
    """torch's fp32 matmul precision (``ieee`` or ``tf32``) for the block; the kernels follow it."""
    m = torch.backends.cuda.matmul
    before = m.fp32_precision
    m.fp32_precision = mode
    try:
        yield
    finally:
        m.fp32_precision = before


def zipf_counts(rows: int, experts: int) -> list[int]:
    p = [1.0 / (i + 1) for i in range(experts)]
    counts = [int(rows * q / sum(p)) for q in p]
    counts[0] += rows - sum(counts)
    return counts


def routing_counts(rows: int, experts: int, routing: str) -> list[int]:
    """Rows per expert: ``uniform``, ``zipf`` (expert i takes a share 1/(i+1)), ``empty`` (half the experts
    get none, the other half share the rows evenly)."""
    if routing == "zipf":
        return zipf_counts(rows, experts)
    live = experts if routing == "uniform" else experts // 2
    counts = [rows // live] * live + [0] * (experts - live)
    counts[0] += rows - sum(counts)
    return counts


def max_err(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(largest absolute error, that over the largest |reference|)."""
    err = float((got.float() - ref.float()).abs().max()) if got.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    return err, err / max(scale, 1e-30)


# ---------------------------------------------------------------- env

def cmd_env(args: argparse.Namespace) -> None:
    import triton

    import moe_asr_kernels
    out(f"python {sys.version.split()[0]} ({sys.executable})")
    out(f"torch {torch.__version__}, triton {triton.__version__}, cuda {torch.version.cuda}")
    out(f"moe_asr_kernels from {os.path.dirname(moe_asr_kernels.__file__)}")
    out(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')} "
        f"MOE_KERNELS_TUNE={os.environ.get('MOE_KERNELS_TUNE', '')} "
        f"fp32 matmul precision={torch.backends.cuda.matmul.fp32_precision}")
    if args.device.type == "cuda":
        p = torch.cuda.get_device_properties(args.device)
        out(f"device {p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.1f} GiB, L2 {p.L2_cache_size / 2**20:.0f} MiB, "
            f"shared memory per block (opt-in) {p.shared_memory_per_block_optin // 1024} KiB")
    else:
        out(f"device cpu, {torch.get_num_threads()} threads")


# ---------------------------------------------------------------- sweep

SWEEP_FIELDS = ("kernel", "tile", "precision", "status", "est_smem_kib", "pruned", "first_call_s", "compile_s", "ms",
                "max_abs_err", "max_rel_err", "pass")


def _sweep_shape(tiny: bool) -> tuple[list[int], int, int]:
    """Counts (an empty expert, partial tiles, one large group), K, N: the GEMM table's K and N on GPU."""
    if tiny:
        return [5, 0, 17, 1], 24, 40
    return [300, 0, 1, 517, 64, 33, 2000, 1181], 1024, 4096


def sweep_one(kernel: str, tile_index: int, precision: str, tiny: bool, device: str) -> dict:
    """One tile of one kernel in one precision against an fp32 torch reference (runs in a worker)."""
    from moe_asr_kernels.reference import grouped_mm_loop
    from moe_asr_kernels.triton import grouped_gemm as gg
    from moe_asr_kernels.triton.tuning import RESOURCE_ERRORS, mm_smem, smem_limit, wgrad_smem

    dev = torch.device(device)
    tiles, smem = (gg.FORWARD_TILES, mm_smem) if kernel == "forward" else (gg.WGRAD_TILES, wgrad_smem)
    tile = tiles[tile_index]
    dtype, mode, tol = PRECISIONS[precision]
    est = smem(tile, torch.empty((), dtype=dtype).element_size())
    # pruned: the tuner never compiles this tile here (its estimate exceeds the device's shared memory)
    pruned = est > smem_limit(dev) if dev.type == "cuda" else "-"
    row = dict(kernel=kernel, tile=str(tile), precision=precision, est_smem_kib=est // 1024,
               pruned=str(pruned).lower())
    counts, k, n = _sweep_shape(tiny)
    e, m = len(counts), sum(counts)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dev, dtype)
    c = torch.tensor(counts, dtype=torch.int32, device=dev)
    if kernel == "forward":
        w = (torch.randn(e, k, n, generator=g) / k ** 0.5).to(dev, dtype)
        run = lambda: gg.grouped_gemm(x, w, c, tile=tile)  # noqa: E731
        with fp32_precision("ieee"):
            ref = grouped_mm_loop(x.float(), w.float(), counts)
    else:
        dy = torch.randn(m, n, generator=g).to(dev, dtype)
        run = lambda: gg.grouped_wgrad(x, dy, c, e, with_bias=False, tile=tile)[0]  # noqa: E731
        starts = [sum(counts[:i]) for i in range(e)]
        with fp32_precision("ieee"):
            ref = torch.stack([x[s:s + r].float().T @ dy[s:s + r].float() for s, r in zip(starts, counts)])
    try:
        with fp32_precision(mode):
            t0 = time.perf_counter()
            got = run()
            sync(dev)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            run()
            sync(dev)
            once = time.perf_counter() - t0
            ms = bench_ms(run, dev) if dev.type == "cuda" else once * 1e3
    except RESOURCE_ERRORS as err:
        return dict(row, status=f"out_of_resources: {type(err).__name__}")
    except Exception as err:  # noqa: BLE001 - a row of the table, not a crash of the sweep
        return dict(row, status=f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
    abs_err, rel_err = max_err(got, ref)
    return dict(row, status="ok", first_call_s=f"{first:.3f}", compile_s=f"{max(0.0, first - once):.3f}",
                ms=f"{ms:.4f}", max_abs_err=f"{abs_err:.3g}", max_rel_err=f"{rel_err:.3g}",
                **{"pass": str(rel_err <= tol).lower()})


def cmd_sweep(args: argparse.Namespace) -> None:
    from moe_asr_kernels.triton import grouped_gemm as gg
    jobs = [(kernel, i, precision) for precision in PRECISIONS
            for kernel, tiles in (("forward", gg.FORWARD_TILES), ("wgrad", gg.WGRAD_TILES))
            for i in range(len(tiles))]
    out(",".join(SWEEP_FIELDS))

    def emit(row: dict) -> None:
        out(",".join(str(row.get(f, "")).replace(",", ";") for f in SWEEP_FIELDS))
    if args.workers <= 1:
        for job in jobs:
            emit(sweep_one(*job, args.tiny, str(args.device)))
        return
    # Workers compile in parallel (compiling is most of a tile's first call); rows are written in order,
    # each as soon as it and those before it are done.
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(sweep_one, *job, args.tiny, str(args.device)) for job in jobs]
        for (kernel, i, precision), f in zip(jobs, futures):
            try:
                emit(f.result())
            except Exception as err:  # noqa: BLE001 - a worker that died (out of memory, say) is a row too
                tiles = gg.FORWARD_TILES if kernel == "forward" else gg.WGRAD_TILES
                emit(dict(kernel=kernel, tile=str(tiles[i]), precision=precision,
                          status=f"error: {type(err).__name__}"))


# ---------------------------------------------------------------- large

def cmd_large(args: argparse.Namespace) -> None:
    """The whole MoE forward at 1M tokens, the first GEMM's ``[2M, 4096]`` output (8.6e9 elements) and a
    weight gradient over it, each sampled against fp32 torch on the same (rounded) inputs."""
    import moe_asr_kernels as kernels
    from moe_asr_kernels.activations import ACTIVATIONS
    from moe_asr_kernels.triton.grouped_gemm import grouped_wgrad

    dev, dtype = args.device, DTYPES[args.dtype]
    n, d, f, e, k = (64, 16, 32, 4, 2) if args.tiny else (1 << 20, 1024, 4096, 8, 2)
    out(f"tokens {n}, d {d}, ffn {f}, experts {e}, top-{k}, {dtype}, device {dev}")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, d, device=dev, dtype=dtype, generator=g)
    experts = torch.randint(0, e, (n, k), device=dev, generator=g)
    experts[:, 1] = (experts[:, 0] + 1 + experts[:, 1] % (e - 1)) % e           # two different experts
    weights = torch.softmax(torch.randn(n, k, device=dev, generator=g), -1)
    w1 = (torch.randn(e, d, f, device=dev, generator=g) / d ** 0.5).to(dtype)
    b1 = (torch.randn(e, f, device=dev, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(e, f, d, device=dev, generator=g) / f ** 0.5).to(dtype)
    b2 = (torch.randn(e, d, device=dev, generator=g) * 0.1).to(dtype)
    act = ACTIVATIONS["swish"]
    failures = 0

    def report(what: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
        nonlocal failures
        abs_err, rel_err = max_err(got, ref)
        ok = rel_err <= tol
        failures += not ok
        out(f"{what}: max abs err {abs_err:.3g}, relative {rel_err:.3g} (limit {tol:g}): {'ok' if ok else 'FAIL'}")

    def ffn_ref(xs: torch.Tensor, owner: torch.Tensor, second: bool) -> torch.Tensor:
        """fp32 torch, expert by expert, of the first GEMM + bias + swish (and, with ``second``, the
        hidden rounded to the kernels' dtype, the second GEMM and bias)."""
        ys = torch.empty(xs.shape[0], d if second else f, device=dev)
        for i in range(e):
            sel = owner == i
            if bool(sel.any()):
                h = act(xs[sel] @ w1[i].float() + b1[i].float())
                ys[sel] = h.to(dtype).float() @ w2[i].float() + b2[i].float() if second else h
        return ys

    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    sample = torch.cat([torch.linspace(0, n - 1, 192, device=dev).long(), torch.arange(n - 64, n, device=dev)])
    with torch.inference_mode():
        t0 = time.perf_counter()
        y = kernels.moe_ffn(x, experts, weights, w1, b1, w2, b2, backend="triton")
        sync(dev)
        out(f"moe_ffn: {time.perf_counter() - t0:.3f} s (first call, compiles included), output {tuple(y.shape)}")
        xs = x[sample].float()
        ref = sum(weights[sample, j:j + 1] * ffn_ref(xs, experts[sample, j], True) for j in range(k))
        report(f"moe_ffn, {len(sample)} tokens incl. the last 64", y[sample], ref, tol)

        plan = kernels.make_plan(experts, e, backend="triton")
        rows = kernels.permute(x, plan, backend="triton")
        h = kernels.grouped_mm(rows, w1, plan.counts, b1, "swish", backend="triton")
        out(f"first GEMM output {tuple(h.shape)}: {h.numel():,} elements (2^31 = {2**31:,})")
        m = rows.shape[0]
        pick = torch.cat([torch.linspace(0, m - 1, 192, device=dev).long(), torch.arange(m - 64, m, device=dev)])
        owner = torch.searchsorted(plan.counts.cumsum(0), pick, right=True)
        report(f"grouped_mm rows incl. the last 64 (element offsets up to {h.numel() - 1:,})", h[pick],
               ffn_ref(rows[pick].float(), owner, False), tol)

        dw, _ = grouped_wgrad(rows, h, plan.counts.to(torch.int32), e, with_bias=False)
        last = e - 1 - int(torch.flip(plan.counts, [0]).ne(0).int().argmax())      # the last expert with rows
        start = int(plan.counts[:last].sum())
        end = start + int(plan.counts[last])
        ks, ns = torch.arange(0, d, max(1, d // 8), device=dev), torch.arange(f - 8, f, device=dev)
        ref = rows[start:end, ks].float().T @ h[start:end, ns].float()
        report(f"weight gradient of expert {last} over rows {start:,}..{end:,}", dw[last][ks][:, ns], ref, tol)
    out("large: ok" if not failures else f"large: {failures} check(s) failed")
    if failures:
        sys.exit(1)


# ---------------------------------------------------------------- gemm

def cmd_gemm(args: argparse.Namespace) -> None:
    """Grouped GEMM ``[M, K] x [E, K, N]`` (forward) and ``X_e^T dY_e`` (weight gradient) over routings."""
    from moe_asr_kernels.triton.grouped_gemm import grouped_gemm, grouped_wgrad

    dev, dtype = args.device, DTYPES[args.dtype]
    if args.tiny:
        k, n, experts, sizes = 16, 32, (2, 4), (32,)
    else:
        k, n, experts, sizes = 1024, 4096, (8, 64), (256, 4096, 65536, 1 << 21)
    out(f"grouped GEMM, K {k}, N {n}, {dtype}, device {dev}: ms per call (TFLOP/s of ours)")
    out("| pass | experts | rows | routing | ours | F.grouped_mm | bmm | loop | ours TFLOP/s | ours / grouped_mm |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(max(experts), k, n, device=dev, generator=g) / k ** 0.5).to(dtype)
    for m in sizes:
        x = torch.randn(m, k, device=dev, dtype=dtype, generator=g)
        dy = torch.randn(m, n, device=dev, dtype=dtype, generator=g)
        for e in experts:
            we = w[:e]
            for routing in ("uniform", "zipf", "empty"):
                counts = routing_counts(m, e, routing)
                c = torch.tensor(counts, dtype=torch.int32, device=dev)
                offs = c.cumsum(0, dtype=torch.int32)
                starts = [sum(counts[:i]) for i in range(e)]
                blocks = [(i, s, r) for i, (s, r) in enumerate(zip(starts, counts)) if r]
                even = routing == "uniform" and m % e == 0
                fwd = {"ours": lambda: grouped_gemm(x, we, c),
                       "grouped_mm": lambda: torch.nn.functional.grouped_mm(x, we, offs=offs),
                       "bmm": (lambda: torch.bmm(x.view(e, m // e, k), we)) if even else None,
                       "loop": lambda: [x[s:s + r] @ we[i] for i, s, r in blocks]}
                wgrad = {"ours": lambda: grouped_wgrad(x, dy, c, e, with_bias=False),
                         "grouped_mm": lambda: torch.nn.functional.grouped_mm(x.t(), dy, offs=offs),
                         "bmm": (lambda: torch.bmm(x.view(e, m // e, k).transpose(1, 2), dy.view(e, m // e, n)))
                         if even else None,
                         "loop": lambda: [x[s:s + r].T @ dy[s:s + r] for i, s, r in blocks]}
                for name, fns in (("fwd", fwd), ("wgrad", wgrad)):
                    ms = {}
                    for impl, fn in fns.items():
                        if fn is None:
                            ms[impl] = "-"
                            continue
                        try:
                            ms[impl] = bench_ms(fn, dev)
                        except Exception as err:  # noqa: BLE001 - e.g. grouped_mm refusing a dtype
                            ms[impl] = f"{type(err).__name__}"
                    ours = ms["ours"]
                    tflops = f"{2 * m * k * n / (ours * 1e-3) / 1e12:.1f}" if isinstance(ours, float) else "-"
                    ratio = (f"{ours / ms['grouped_mm']:.2f}"
                             if isinstance(ours, float) and isinstance(ms["grouped_mm"], float) else "-")
                    cells = " | ".join(f"{v:.3f}" if isinstance(v, float) else v for v in ms.values())
                    out(f"| {name} | {e} | {m} | {routing} | {cells} | {tflops} | {ratio} |")
        del x, dy


# ---------------------------------------------------------------- layer

def cmd_layer(args: argparse.Namespace) -> None:
    """``MoEFeedForward`` forward+backward (ours, WeNet's loop, the dense FFN of the same FLOPs), then a
    16-token streaming step (inference) eager and as a replayed CUDA graph."""
    from bench.kernels import Case, build, step_fn

    dev, dtype = args.device, DTYPES[args.dtype]
    d, tokens, experts = (16, 32, (4,)) if args.tiny else (1024, 8192, (8, 64))
    ffn = 4 * d
    out(f"MoE layer, d {d}, ffn {ffn}, top-2, {dtype}, device {dev}: ms per call")
    out()
    out("| experts | tokens | pass | grouped (ours) | loop | dense | grouped / dense |")
    out("|---|---|---|---|---|---|---|")
    for e in experts:
        case = Case(e, tokens, "balanced", True, d, ffn)
        ms = {impl: bench_ms(step_fn(*build(case, impl, dev, dtype), True), dev)
              for impl in ("grouped", "loop", "dense")}
        out(f"| {e} | {tokens} | fwd+bwd | {ms['grouped']:.3f} | {ms['loop']:.3f} | {ms['dense']:.3f} | "
            f"{ms['grouped'] / ms['dense']:.2f} |")
    out()
    out("| experts | tokens | pass | grouped eager | grouped graph | loop eager | dense eager | dense graph | "
        "graph output = eager |")
    out("|---|---|---|---|---|---|---|---|---|")
    for e in experts:
        case = Case(e, 16, "balanced", False, d, ffn)
        cells, same = [], []
        for impl in ("grouped", "loop", "dense"):
            layer, x = build(case, impl, dev, dtype)
            layer.eval()
            eager = step_fn(layer, x, False)
            cells.append(f"{bench_ms(eager, dev):.4f}")
            if impl == "loop":
                continue            # its nonzero() syncs with the host: not capturable
            try:
                replay, y_graph = _graph(layer, x)
                cells.append(f"{bench_ms(replay, dev):.4f}")
                same.append(bool(torch.equal(y_graph, eager())))
            except Exception as err:  # noqa: BLE001 - no CUDA here, or capture refused: say which
                cells.append("n/a (no CUDA)" if dev.type != "cuda" else f"failed: {type(err).__name__}")
        verdict = "-" if not same else "yes" if all(same) else "NO"
        out(f"| {e} | 16 | fwd (inference) | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {cells[4]} | "
            f"{verdict} |")


def _graph(layer: torch.nn.Module, x: torch.Tensor) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture ``layer(x)`` in a CUDA graph after warm-up on a side stream; (replay, output after replay)."""
    if x.device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            layer(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        y = layer(static)
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay, y.clone()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("env", "sweep", "large", "gemm", "layer"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU run of the script)")
    ap.add_argument("--workers", type=int, default=1, help="sweep: processes compiling tiles in parallel")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    args.dtype = args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")
    {"env": cmd_env, "sweep": cmd_sweep, "large": cmd_large, "gemm": cmd_gemm, "layer": cmd_layer}[args.step](args)


if __name__ == "__main__":
    main()
