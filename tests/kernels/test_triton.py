"""Triton kernels against the reference loops: forward and every gradient.

Without a GPU these run in Triton's interpreter on CPU (fp32 and fp16; the
interpreter's bf16 dot is broken), with shapes kept small. On a GPU the same
tests run on CUDA tensors, bf16 included.
"""
import pytest
import torch

import moe_asr_kernels as kernels
from moe_asr_kernels.reference import grouped_ffn_loop, grouped_mm_loop, moe_loop, unpermute_loop
from tests.helpers import require

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=2e-2, atol=2e-2),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}

# Per-expert row counts. The interpreter's tile is 16 rows: groups of 0, 1, 16,
# 17, 33 rows, one expert with everything, all groups empty.
COUNTS = {
    "mixed": [3, 0, 17, 1, 0, 16],
    "one_takes_all": [0, 0, 33, 0],
    "single_expert": [21],
    "all_empty": [0, 0, 0],
    "many_small": [1, 2, 0, 5, 1, 1, 0, 3, 2, 1],
}


@pytest.fixture(autouse=True, scope="module")
def _triton() -> None:
    require(kernels.triton_available(), "triton (torch's dependency: make setup installs it)")


def _leaf(t, dtype):
    return t.to(DEVICE, dtype).requires_grad_()


def _params(e, d, f, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [_leaf(torch.randn(*s, generator=g) * 0.3, dtype) for s in ((e, d, f), (e, f), (e, f, d), (e, d))]


def _ref_copy(ts):
    """fp32 CPU copies of the (already rounded) inputs: the reference works in fp32."""
    return [t.detach().float().cpu().requires_grad_() for t in ts]


def _check_grads(out, out_ref, inputs, inputs_ref, dtype):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * g.to(out.device, out.dtype)).sum(), inputs, allow_unused=True)
    grads_ref = torch.autograd.grad((out_ref * g).sum(), inputs_ref, allow_unused=True)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        if b is None:
            assert a is None or not a.abs().any(), i
            continue
        torch.testing.assert_close(a.float().cpu(), b, **TOL[dtype], msg=f"grad of input {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(COUNTS))
def test_grouped_gemm_forward_backward(name, dtype):
    counts = COUNTS[name]
    e, k, n = len(counts), 20, 36            # neither a multiple of the tile
    g = torch.Generator().manual_seed(2)
    x = _leaf(torch.randn(sum(counts), k, generator=g), dtype)
    w = _leaf(torch.randn(e, k, n, generator=g) * 0.3, dtype)
    b = _leaf(torch.randn(e, n, generator=g), dtype)
    y = kernels.grouped_mm(x, w, torch.tensor(counts), b, activation="relu", backend="triton")
    xr, wr, br = _ref_copy([x, w, b])
    y_ref = torch.relu(grouped_mm_loop(xr, wr, counts, br))
    torch.testing.assert_close(y.float().cpu(), y_ref, **TOL[dtype])
    if sum(counts):
        _check_grads(y, y_ref, [x, w, b], [xr, wr, br], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["swish", "relu", "gelu"])
@pytest.mark.parametrize("name", ["mixed", "one_takes_all", "many_small"])
def test_grouped_ffn_forward_backward(name, activation, dtype):
    counts = COUNTS[name]
    e, d, f = len(counts), 24, 40
    params = _params(e, d, f, dtype)
    rows = _leaf(torch.randn(sum(counts), d, generator=torch.Generator().manual_seed(3)), dtype)
    y = kernels.grouped_ffn(rows, torch.tensor(counts), *params, activation, backend="triton")
    ref = _ref_copy([rows] + params)
    y_ref = grouped_ffn_loop(ref[0], counts, *ref[1:], activation)
    torch.testing.assert_close(y.float().cpu(), y_ref, **TOL[dtype])
    _check_grads(y, y_ref, [rows] + params, ref, dtype)


def test_grouped_ffn_dropout_matches_its_mask():
    """Training with hidden dropout: the same function as the loop with the same kept units."""
    counts = [5, 0, 12]
    params = _params(3, 8, 16, torch.float32)
    rows = _leaf(torch.randn(17, 8), torch.float32)
    torch.manual_seed(4)
    y = kernels.grouped_ffn(rows, torch.tensor(counts), *params, "relu", dropout=0.5, training=True,
                            backend="triton")
    torch.manual_seed(4)  # the kernel path draws its mask first thing, from the global generator
    mask = torch.empty(17, 16, device=DEVICE).bernoulli_(0.5).div_(0.5)
    assert 0 < int((mask == 0).sum()) < mask.numel()
    w1, b1, w2, b2 = params
    h = torch.cat([torch.relu(rows[0:5] @ w1[0] + b1[0]), torch.relu(rows[5:17] @ w1[2] + b1[2])]) * mask
    y_ref = torch.cat([h[0:5] @ w2[0] + b2[0], h[5:17] @ w2[2] + b2[2]])
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    g = torch.randn_like(y)
    a = torch.autograd.grad((y * g).sum(), [rows] + params)
    b = torch.autograd.grad((y_ref * g).sum(), [rows] + params)
    for i, (p, q) in enumerate(zip(a, b)):
        torch.testing.assert_close(p, q, **TOL[torch.float32], msg=f"grad {i}")


def _routing(n, k, e, skew=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if skew:  # expert 1 in every token (then one of the rest)
        rest = torch.stack([torch.randperm(e - 1, generator=g)[:k - 1] + 2 for _ in range(n)]) % e
        experts = torch.cat([torch.ones(n, 1, dtype=torch.long), rest], 1)[:, :k]
    else:
        experts = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, k, generator=g), -1)
    return experts, weights


@pytest.mark.parametrize("n,k,e,skew", [(37, 2, 6, False), (19, 1, 4, False), (40, 2, 8, True),
                                        (1, 2, 3, False), (300, 2, 5, False)])
def test_sort_matches_stable_argsort(n, k, e, skew):
    experts, _ = _routing(n, k, e, skew)
    plan = kernels.make_plan(experts.to(DEVICE), e, backend="triton")
    ref = kernels.make_plan(experts, e, backend="torch")
    assert plan.order.cpu().tolist() == ref.order.tolist()
    assert plan.inverse.cpu().tolist() == ref.inverse.tolist()
    assert plan.counts.cpu().tolist() == ref.counts.tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,e", [(23, 2, 5), (9, 1, 3)])
def test_permute_unpermute_forward_backward(n, k, e, dtype):
    experts, weights = _routing(n, k, e, seed=n)
    plan = kernels.make_plan(experts.to(DEVICE), e, backend="triton")
    x = _leaf(torch.randn(n, 20), dtype)
    rows = kernels.permute(x, plan, backend="triton")
    xr = _ref_copy([x])[0]
    torch.testing.assert_close(rows.float().cpu(), xr[plan.tokens.cpu()])
    out_rows = _leaf(torch.randn(n * k, 20), dtype)
    w = weights.to(DEVICE).requires_grad_()
    y = kernels.unpermute(out_rows, plan, w, backend="triton")
    out_ref, w_ref = _ref_copy([out_rows])[0], weights.clone().requires_grad_()
    y_ref = unpermute_loop(out_ref, plan.order.cpu(), w_ref)
    torch.testing.assert_close(y.float().cpu(), y_ref, **TOL[dtype])
    _check_grads(y, y_ref, [out_rows, w], [out_ref, w_ref], dtype)
    # permute's backward sums the k copies of each token
    _check_grads(rows, xr[plan.tokens.cpu()], [x], [xr], dtype)


@pytest.mark.parametrize("n,k,e,skew", [(29, 2, 6, False), (17, 1, 4, False), (24, 2, 5, True)])
def test_whole_moe_against_wenet_loop(n, k, e, skew):
    """permute -> grouped FFN -> unpermute == the per-expert loop, incl. router-weight gradients."""
    experts, weights = _routing(n, k, e, skew, seed=5)
    params = _params(e, 16, 24, torch.float32, seed=6)
    x = _leaf(torch.randn(n, 16, generator=torch.Generator().manual_seed(7)), torch.float32)
    w = weights.to(DEVICE).requires_grad_()
    plan = kernels.make_plan(experts.to(DEVICE), e, backend="triton")
    rows = kernels.permute(x, plan, backend="triton")
    y = kernels.unpermute(kernels.grouped_ffn(rows, plan.counts, *params, backend="triton"), plan, w,
                          backend="triton")
    ref = _ref_copy([x] + params)
    w_ref = weights.clone().requires_grad_()
    y_ref = moe_loop(ref[0], experts, w_ref, *ref[1:])
    torch.testing.assert_close(y.cpu(), y_ref, **TOL[torch.float32])
    _check_grads(y, y_ref, [x, w] + params, [ref[0], w_ref] + ref[1:], torch.float32)


def test_moe_layer_on_triton_kernels_equals_loop(monkeypatch):
    """MoEFeedForward(impl='grouped') on the Triton kernels == impl='loop': forward, backward, 3 Adam steps."""
    from moe_asr.moe.config import MoEConfig
    from moe_asr.moe.layer import MoEFeedForward
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "triton")
    assert kernels.resolve_backend(torch.zeros(1)) == "triton"
    torch.manual_seed(8)
    a = MoEFeedForward(12, 20, MoEConfig(8, 2, impl="grouped")).to(DEVICE)
    b = MoEFeedForward(12, 20, MoEConfig(8, 2, impl="loop")).to(DEVICE)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(9)
    for step in range(3):
        x = torch.randn(2, 13, 12, generator=gen).to(DEVICE)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        torch.testing.assert_close(ya, yb, **TOL[torch.float32])
        g = torch.randn(ya.shape, generator=gen).to(DEVICE)
        opt_a.zero_grad(), opt_b.zero_grad()
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float32])
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, **TOL[torch.float32], msg=f"{name} step {step}")
        opt_a.step(), opt_b.step()
