"""What the Triton path promises beyond its arithmetic: TF32 from either torch API, no saved
pre-activation without gradients, autocast, checked counts, split weight gradients, tile choice.

Runs in Triton's interpreter without a GPU (``conftest.py``); on a GPU the same tests run on CUDA.
Not shown on CPU: launches on a tensor's own GPU rather than the current one (``common.on_device``);
a CPU tensor has no GPU to switch to.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_asr_kernels as kernels
from moe_asr_kernels.reference import grouped_ffn_loop, grouped_mm_loop
from tests.helpers import require

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _triton() -> None:
    require(kernels.triton_available(), "triton (torch's dependency: make setup installs it)")


def _params(e, d, f, dtype=torch.float32, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g) * 0.3).to(DEVICE, dtype).requires_grad_(grad)
            for s in ((e, d, f), (e, f), (e, f, d), (e, d))]


PRECISION_PROBE = """
import json, torch
import moe_asr_kernels as kernels
from moe_asr_kernels.triton.common import input_precision
m = torch.backends.cuda.matmul
out = {"default": input_precision(torch.float32)}
m.allow_tf32 = True
out["legacy allow_tf32"] = input_precision(torch.float32)
m.fp32_precision = "ieee"                       # legacy then new: reading allow_tf32 now raises
out["new ieee after legacy"] = input_precision(torch.float32)
m.fp32_precision = "tf32"
out["new tf32"] = input_precision(torch.float32)
torch.backends.fp32_precision = "tf32"          # the global switch reaches matmuls
out["global tf32"] = input_precision(torch.float32)
dev = "cuda" if torch.cuda.is_available() else "cpu"
x, w = torch.randn(6, 8, device=dev), torch.randn(2, 8, 16, device=dev)
y = kernels.grouped_mm(x, w, torch.tensor([2, 4]), backend="triton")   # an fp32 GEMM under the new API
out["gemm"] = float((y - torch.cat([x[:2] @ w[0], x[2:] @ w[1]])).abs().max())
print(json.dumps(out))
"""


def test_tf32_setting_is_read_under_both_torch_apis():
    """In a fresh interpreter: reading ``allow_tf32`` raises once the new API set TF32, which killed every
    fp32 grouped GEMM; the precision follows whichever API was used last."""
    res = subprocess.run([sys.executable, "-c", PRECISION_PROBE], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out.pop("gemm") < 1e-2
    assert out == {"default": "ieee", "legacy allow_tf32": "tf32", "new ieee after legacy": "ieee",
                   "new tf32": "tf32", "global tf32": "tf32"}


@pytest.fixture
def gemm_calls(monkeypatch):
    """Every call of the forward GEMM from the autograd layer: (store_z, x dtype, w dtype)."""
    from moe_asr_kernels import autograd
    calls = []
    real = autograd.grouped_gemm

    def spy(x, w, *args, **kw):
        calls.append((kw.get("store_z", False), x.dtype, w.dtype))
        return real(x, w, *args, **kw)
    monkeypatch.setattr(autograd, "grouped_gemm", spy)
    return calls


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "frozen"])
def test_no_pre_activation_stored_without_gradients(gemm_calls, mode):
    counts = torch.tensor([5, 0, 12])
    params = _params(3, 8, 16, grad=mode != "frozen")
    rows = torch.randn(17, 8, device=DEVICE)
    ctx = {"inference_mode": torch.inference_mode(), "no_grad": torch.no_grad()}.get(mode)
    if ctx is None:
        y = kernels.grouped_ffn(rows, counts, *params, backend="triton")
    else:
        with ctx:
            y = kernels.grouped_ffn(rows, counts, *params, backend="triton")
    assert [c[0] for c in gemm_calls] == [False, False]
    gemm_calls.clear()
    with torch.inference_mode():
        kernels.grouped_mm(rows, params[0], counts, params[1], activation="gelu", backend="triton")
    assert [c[0] for c in gemm_calls] == [False]
    gemm_calls.clear()
    y_grad = kernels.grouped_ffn(rows, counts, *_params(3, 8, 16), backend="triton")
    assert [c[0] for c in gemm_calls] == [True, False]      # training still saves z for its backward
    torch.testing.assert_close(y, y_grad.detach())


def test_autocast_casts_fp32_weights_to_the_autocast_dtype(gemm_calls):
    """bf16 under autocast: the kernels get one dtype (mixed dtypes do not compile for tl.dot), the output is
    bf16 and the fp32 master weights get fp32 gradients. (The values are checked in fp16 below: the
    interpreter's bf16 dot is wrong.)"""
    counts = torch.tensor([3, 6])
    params = _params(2, 8, 16)
    rows = torch.randn(9, 8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = kernels.grouped_ffn(rows, counts, *params, backend="triton")
    assert y.dtype == torch.bfloat16
    assert gemm_calls and all(c[1:] == (torch.bfloat16, torch.bfloat16) for c in gemm_calls), gemm_calls
    y.float().sum().backward()
    assert [p.grad.dtype for p in params] == [torch.float32] * 4


def test_autocast_fp16_values_match_the_reference():
    counts = [3, 0, 6]
    params = _params(3, 8, 16)
    rows = torch.randn(9, 8, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = kernels.grouped_ffn(rows, torch.tensor(counts), *params, backend="triton")
    ref = [t.detach().half().float().cpu().requires_grad_() for t in [rows] + params]
    y_ref = grouped_ffn_loop(ref[0], counts, *ref[1:])
    torch.testing.assert_close(y.float().cpu(), y_ref, rtol=2e-2, atol=2e-2)
    g = torch.randn(y.shape)
    grads = torch.autograd.grad((y.float() * g.to(DEVICE)).sum(), [rows] + params)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), ref)
    for a, b in zip(grads, grads_ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.cpu(), b, rtol=3e-2, atol=3e-2)


def test_mixed_dtypes_outside_autocast_are_refused():
    params = _params(2, 8, 16)
    with pytest.raises(ValueError, match="rows are torch.float16, w1 is torch.float32"):
        kernels.grouped_ffn(torch.randn(4, 8, device=DEVICE).half(), torch.tensor([1, 3]), *params,
                            backend="triton")


@pytest.mark.parametrize("counts,match", [([4, 4], r"one entry per expert \(3,\)"),
                                          ([[4, 4, 1]], r"one entry per expert"),
                                          ([4, 4, 2], r"sum to the 9 rows"),
                                          ([10, -1, 0], r"non-negative"),
                                          ([4.0, 4.0, 1.0], r"integers")])
def test_bad_counts_are_refused(counts, match):
    params = _params(3, 8, 16)
    rows = torch.randn(9, 8, device=DEVICE)
    c = torch.tensor(counts)
    with pytest.raises(ValueError, match=match):
        kernels.grouped_ffn(rows, c, *params, backend="triton")
    with pytest.raises(ValueError, match=match):
        kernels.grouped_mm(rows, params[0], c, backend="triton")


def test_device_counts_past_the_rows_never_touch_them():
    """Counts on the device are not read back (no host sync): the kernels must stay inside the M rows
    whatever they say. Rows past M hold NaN in the same storage; none may leak into the weight gradient."""
    from moe_asr_kernels.triton.grouped_gemm import grouped_gemm, grouped_wgrad
    m, k, n = 20, 8, 16
    big_x = torch.full((m + 16, k), float("nan"), device=DEVICE)
    big_dy = torch.full((m + 16, n), float("nan"), device=DEVICE)
    big_x[:m] = torch.randn(m, k)
    big_dy[:m] = torch.randn(m, n)
    x, dy = big_x[:m], big_dy[:m]
    counts = torch.tensor([6, 30], dtype=torch.int32, device=DEVICE)      # 36 rows claimed, 20 exist
    w = torch.randn(2, k, n, device=DEVICE)
    y = grouped_gemm(x, w, counts)
    torch.testing.assert_close(y, torch.cat([x[:6] @ w[0], x[6:] @ w[1]]))
    for chunk in (16, 64):
        dw, db = grouped_wgrad(x, dy, counts, 2, chunk=chunk)
        torch.testing.assert_close(dw, torch.stack([x[:6].T @ dy[:6], x[6:].T @ dy[6:]]), msg=str(chunk))
        torch.testing.assert_close(db, torch.stack([dy[:6].sum(0), dy[6:].sum(0)]), msg=str(chunk))


WGRAD_COUNTS = {"hot": [3, 70, 0, 5], "all_in_one": [0, 0, 53], "even": [16, 16, 16],
                "empty": [0, 0], "scattered": [17, 0, 1, 33, 2]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("chunk", [16, 48, 4096])
@pytest.mark.parametrize("name", list(WGRAD_COUNTS))
def test_weight_gradient_split_over_row_chunks(name, chunk, dtype):
    """Chunks of 16 rows split every group over 16 rows (partial sums reduced in a second launch), 4096 keep
    each expert whole; both equal the per-expert loop, empty experts get zeros, bias only once."""
    from moe_asr_kernels.triton.grouped_gemm import grouped_wgrad
    counts = WGRAD_COUNTS[name]
    m, k, n = sum(counts), 20, 36
    g = torch.Generator().manual_seed(11)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    dy = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    dw, db = grouped_wgrad(x, dy, torch.tensor(counts, dtype=torch.int32, device=DEVICE), len(counts),
                           chunk=chunk)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    xf, dyf = x.float().cpu(), dy.float().cpu()
    dw_ref = torch.stack([xf[s:s + c].T @ dyf[s:s + c] for s, c in zip(starts, counts)])
    db_ref = torch.stack([dyf[s:s + c].sum(0) for s, c in zip(starts, counts)])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(dw.float().cpu(), dw_ref, **tol)
    torch.testing.assert_close(db.float().cpu(), db_ref, **tol)


def test_chunk_rows_spreads_a_hot_expert_within_the_workspace():
    from moe_asr_kernels.triton import grouped_gemm as gg
    cpu = torch.device("cpu")
    for m, k, n in [(32, 20, 36), (4096, 256, 1024), (2_000_000, 1024, 4096), (100, 4096, 16384)]:
        c = gg.chunk_rows(m, k, n, cpu)
        assert c % gg.CHUNK_ROWS == 0 and c >= gg.CHUNK_ROWS
        assert (2 * m // c) * k * n * 4 <= gg.WORKSPACE_BYTES or 2 * m // c == 0   # workspace budget kept
    # one expert with every row still gets about WAVES waves of programs
    m, k, n = 4096, 256, 1024
    c = gg.chunk_rows(m, k, n, cpu)
    tiles_kn = -(-k // 64) * -(-n // 128)
    assert -(-m // c) * tiles_kn >= gg.WAVES * gg._sm_count(cpu)


# The tile choice, with the device's answers stubbed: the logic runs the same on a CPU.

@pytest.fixture
def gpu_tuner(monkeypatch):
    from moe_asr_kernels.triton import grouped_gemm as gg
    from moe_asr_kernels.triton import tuning
    monkeypatch.setattr(tuning, "INTERPRET", False)
    monkeypatch.setattr(tuning, "smem_limit", lambda device: 232448)      # sm90
    capture = {"on": False}
    monkeypatch.setattr(tuning, "_capturing", lambda device: capture["on"])
    benched = []

    def fake_bench(fn, warmup, rep):
        fn()
        benched.append(1)
        return 1.0 if launched[-1].block_m == 64 else 2.0
    monkeypatch.setattr(tuning.triton.testing, "do_bench", fake_bench)
    launched = []
    tuner = tuning.Tuner(gg.FORWARD_TILES, gg.FORWARD.interpret_tile, tuning.mm_smem)
    return tuner, launched, benched, capture


def test_tiles_over_shared_memory_are_never_tried(gpu_tuner):
    from moe_asr_kernels.triton.tuning import Tile
    tuner, *_ = gpu_tuner
    cuda = torch.device("cuda")
    fp32, bf16 = tuner.candidates(torch.float32, cuda), tuner.candidates(torch.bfloat16, cuda)
    assert Tile(128, 256, 64, 8, 3) in bf16 and Tile(128, 256, 64, 8, 3) not in fp32   # 288 KiB in fp32
    assert Tile(16, 128, 128, 4, 4) not in fp32 and any(t.block_m == 16 for t in fp32)  # small rows remain


def test_tuning_capture_pinning_and_resource_failures(gpu_tuner, monkeypatch):
    from triton.runtime.errors import OutOfResources

    tuner, launched, benched, capture = gpu_tuner
    cuda = torch.device("cuda")
    too_big = tuner.candidates(torch.bfloat16, cuda)[1]

    def launch(tile):
        launched.append(tile)
        if tile == too_big:
            raise OutOfResources(300000, 232448, "shared memory")
    # tuning: every fitting tile timed once, the fastest kept, the failing one remembered for bf16
    tile = tuner.run(("key", 1), torch.bfloat16, cuda, 512, launch)
    assert tile.block_m == 64 and (too_big, torch.bfloat16) in tuner.failed
    n_bench = len(benched)
    assert n_bench == len(tuner.candidates(torch.bfloat16, cuda))
    # a new key does not compile the failed tile again
    launched.clear()
    tuner.run(("key", 2), torch.bfloat16, cuda, 512, launch)
    assert too_big not in launched
    # capture: a tuned key keeps its tile, a new key takes the default tile, nothing is timed
    capture["on"] = True
    benched.clear()
    assert tuner.run(("key", 1), torch.bfloat16, cuda, 512, launch) == tile
    assert tuner.run(("key", 3), torch.bfloat16, cuda, 8, launch).block_m == 16
    assert not benched
    # MOE_KERNELS_TUNE=0: the default tile, nothing timed
    capture["on"] = False
    monkeypatch.setenv("MOE_KERNELS_TUNE", "0")
    assert tuner.run(("key", 4), torch.bfloat16, cuda, 4096, launch).block_m == 128
    assert not benched
