"""The plain-torch path (used without a GPU) against the reference loops."""
import pytest
import torch

from moe_asr_kernels import cpu, make_plan, permute, unpermute
from moe_asr_kernels.reference import grouped_ffn_loop, moe_loop, sort_by_expert, unpermute_loop


def _weights(e, d, f, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g) * 0.3).to(dtype).requires_grad_()
            for s in ((e, d, f), (e, f), (e, f, d), (e, d))]


COUNTS = [
    [3, 0, 5, 1],              # an empty expert in the middle
    [0, 0, 9, 0],              # one expert takes every row
    [2, 2, 2, 2],              # even: no padding needed
    [1, 40, 1, 1, 2, 0, 3, 3],  # a hot expert among small ones
    [0, 0, 0, 0],              # no rows at all
    [7],                       # a single expert
]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("activation", ["swish", "gelu"])
def test_grouped_ffn_matches_loop(counts, activation):
    e, d, f = len(counts), 6, 10
    w = _weights(e, d, f)
    rows = torch.randn(sum(counts), d, requires_grad=True)
    y = cpu.grouped_ffn(rows, torch.tensor(counts), *w, activation)
    w_ref = [p.detach().clone().requires_grad_() for p in w]
    rows_ref = rows.detach().clone().requires_grad_()
    y_ref = grouped_ffn_loop(rows_ref, counts, *w_ref, activation)
    torch.testing.assert_close(y, y_ref)
    with torch.no_grad():  # decoding: the padded runs plan_segments picks
        torch.testing.assert_close(cpu.grouped_ffn(rows, torch.tensor(counts), *w, activation), y_ref)
    if not sum(counts):
        return
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(rows.grad, rows_ref.grad)
    for p, q in zip(w, w_ref):
        torch.testing.assert_close(p.grad, q.grad)


def test_plan_segments_choices():
    # Few rows per expert: one padded batched matmul over all of them.
    assert cpu.plan_segments([6, 4, 2, 2, 3, 6, 6, 3], 256, 1024) == [(0, 8, 6)]
    # Many rows: every expert alone (padding would cost real arithmetic).
    assert cpu.plan_segments([134, 113, 124], 256, 1024) == [(0, 1, 134), (1, 2, 113), (2, 3, 124)]
    # A hot expert is not padded into its neighbours' run; empty experts are skipped.
    segs = cpu.plan_segments([3, 2, 300, 2, 0, 4, 4], 256, 1024)
    assert (2, 3, 300) in segs and all(not (a <= 4 < b) for a, b, _ in segs)
    covered = sorted(e for a, b, _ in segs for e in range(a, b))
    assert covered == [0, 1, 2, 3, 5, 6]


def _unit_dropout(h, p=0.5, training=True, inplace=False):
    """Dropout with one fixed mask over the hidden units (every third dropped), the same for every row: each
    path then drops the same elements of the same rows, whatever its order, padding or grouping of rows."""
    if not training or p == 0:
        return h
    keep = (torch.arange(h.shape[-1], device=h.device) % 3 != 0).to(h.dtype)
    return h * keep / (1 - p)


@pytest.mark.parametrize("n,k,e,path", [(16, 2, 8, "small"), (300, 2, 4, "sorted"), (5, 1, 4, "grouped"),
                                         (300, 2, 4, "grouped")])
def test_hidden_dropout_in_training_equals_the_loop_under_the_same_mask(n, k, e, path, monkeypatch):
    """Forward and gradients in training with dropout, each CPU path (moe_ffn: its sort-free small path
    and its sorted path; grouped_ffn, the expert-parallel path, each expert on its own rows) against
    WeNet's loop, both dropping what the injected mask drops."""
    import moe_asr_kernels as kernels
    torch.manual_seed(n)
    d, f = 6, 12
    w = _weights(e, d, f, seed=n)
    experts = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, k), -1)

    def run(x, training):
        if path in ("small", "sorted"):
            assert (cpu.moe_ffn_small(torch.zeros(n, d), experts, weights, *w) is not None) == (path == "small")
            return kernels.moe_ffn(x, experts, weights, *w, "swish", dropout=0.5, training=training)
        plan = make_plan(experts, e)
        rows = cpu.grouped_ffn(permute(x, plan), plan.counts, *w, "swish", dropout=0.5, training=training)
        return unpermute(rows, plan, weights)

    x = torch.randn(n, d, requires_grad=True)
    without = run(x, False)
    monkeypatch.setattr(torch.nn.functional, "dropout", _unit_dropout)
    y = run(x, True)
    refs = [t.detach().clone().requires_grad_() for t in [x] + w]
    y_ref = moe_loop(refs[0], experts, weights, *refs[1:], "swish", dropout=0.5, training=True)
    assert not torch.allclose(y_ref, without), "the mask should change the output"
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    for i, (a, b) in enumerate(zip(torch.autograd.grad((y * g).sum(), [x] + w),
                                   torch.autograd.grad((y_ref * g).sum(), refs))):
        torch.testing.assert_close(a, b, msg=f"grad {i}")


def test_sorted_path_draws_the_loops_dropout_masks():
    """In training the sorted path runs the experts in the loop's order on their rows in the loop's
    order, so from the same generator state it draws the same dropout masks: equal outputs exactly."""
    import moe_asr_kernels as kernels
    torch.manual_seed(1)
    n, k, e, d, f = 300, 2, 6, 8, 16
    w = _weights(e, d, f, seed=1)
    experts = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, k), -1)
    x = torch.randn(n, d, requires_grad=True)
    torch.manual_seed(7)
    y = kernels.moe_ffn(x, experts, weights, *w, "swish", dropout=0.3, training=True)
    torch.manual_seed(7)
    y_ref = moe_loop(x, experts, weights, *w, "swish", dropout=0.3, training=True)
    assert torch.equal(y, y_ref)
    torch.manual_seed(8)
    assert not torch.equal(kernels.moe_ffn(x, experts, weights, *w, "swish", dropout=0.3, training=True), y_ref)


@pytest.mark.parametrize("n,k,e", [(11, 2, 4), (5, 1, 3), (9, 2, 8), (1, 2, 2)])
def test_plan_permute_unpermute_match_reference(n, k, e):
    torch.manual_seed(n)
    experts = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    plan = make_plan(experts, e)
    order, counts = sort_by_expert(experts, e)
    assert plan.order.tolist() == order.tolist() and plan.counts.tolist() == counts.tolist()
    x = torch.randn(n, 5, requires_grad=True)
    rows = permute(x, plan)
    torch.testing.assert_close(rows, x[plan.tokens])
    weights = torch.softmax(torch.randn(n, k), -1).requires_grad_()
    y = unpermute(rows, plan, weights)
    w_ref = weights.detach().clone().requires_grad_()
    rows_ref = rows.detach().clone().requires_grad_()
    y_ref = unpermute_loop(rows_ref, plan.order, w_ref)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(weights.grad, w_ref.grad)
    torch.testing.assert_close(x.grad, torch.zeros_like(x).index_add_(0, plan.tokens, rows_ref.grad))


def test_whole_moe_matches_wenet_loop():
    torch.manual_seed(3)
    n, k, e, d, f = 13, 2, 5, 6, 12
    w = _weights(e, d, f, seed=3)
    x = torch.randn(n, d)
    experts = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, k), -1)
    plan = make_plan(experts, e)
    y = unpermute(cpu.grouped_ffn(permute(x, plan), plan.counts, *w), plan, weights)
    torch.testing.assert_close(y, moe_loop(x, experts, weights, *w))


@pytest.mark.parametrize("n,k,e,skew,fuses", [(16, 2, 8, False, True), (5, 1, 4, False, False),
                                              (12, 2, 6, True, True), (300, 2, 4, False, False)])
def test_moe_ffn_fused_small_path_matches_loop(n, k, e, skew, fuses):
    """The sort-free path for a few tokens (one padded run) and the general path both equal the loop."""
    import moe_asr_kernels as kernels
    torch.manual_seed(n)
    d, f = 6, 10
    w = _weights(e, d, f, seed=n)
    experts = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    if skew:  # expert 0 never used, expert 1 in every token
        experts = torch.stack([torch.tensor([1] + [2 + (i % (e - 2))] * (k - 1))[:k] for i in range(n)])
    weights = torch.softmax(torch.randn(n, k), -1).requires_grad_()
    x = torch.randn(n, d, requires_grad=True)
    fused = cpu.moe_ffn_small(x, experts, weights, *w)
    # fuses: one padded run (skew: experts 1.. only, so the run starts at 1); not: an empty
    # expert splits the run (5 tokens, k=1), or too many assignments (300 x 2)
    assert (fused is not None) == fuses
    y = kernels.moe_ffn(x, experts, weights, *w)
    refs = [t.detach().clone().requires_grad_() for t in [x, weights] + w]
    y_ref = moe_loop(refs[0], experts, refs[1], *refs[2:])
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, weights] + w)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), refs)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        torch.testing.assert_close(a, b, msg=f"grad {i}")


def test_no_rows_still_gives_every_weight_a_zero_gradient():
    """A rank whose experts receive no rows must still produce (zero) expert gradients: ZeRO reduces a
    parameter's gradient only where its hook fired, so None on one rank of an expert-data-parallel group
    and a tensor on another would make them reduce different buckets."""
    w = _weights(4, 6, 5)
    rows = torch.zeros(0, 6, requires_grad=True)
    out = cpu.grouped_ffn(rows, [0, 0, 0, 0], *w)
    assert out.shape == (0, 6)
    out.sum().backward()
    for p in w:
        assert p.grad is not None and not p.grad.any()


@pytest.mark.parametrize("counts", [[240, 0, 30, 1, 300], [0, 0, 600, 0, 0], [120, 120, 120, 120, 120]])
@pytest.mark.parametrize("activation", ["swish", "relu", "gelu"])
def test_decoding_path_equals_the_loop_bit_for_bit(counts, activation, monkeypatch):
    """Without gradients moe_ffn runs each expert unpadded on its sorted rows (moe_ffn_sorted) where the
    padded sort-free path does not apply (here: more than SMALL_ASSIGNMENTS): the loop's matmuls on the same
    rows, each token's k outputs added in the loop's (expert) order, so the result is the loop's exactly.
    k = 1 with the given counts (empty experts, one expert taking every row), and k = 2."""
    import moe_asr_kernels as kernels
    torch.manual_seed(len(counts))
    e, d, f = len(counts), 8, 12
    w = [p.detach() for p in _weights(e, d, f)]
    flat = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    pairs = torch.stack([torch.randperm(e)[:2] for _ in range(300)])
    calls = []
    real = cpu.moe_ffn_sorted
    monkeypatch.setattr(cpu, "moe_ffn_sorted", lambda *a: calls.append(1) or real(*a))
    for experts in (flat[torch.randperm(flat.numel())].unsqueeze(1), pairs):
        n, k = experts.shape
        weights = torch.softmax(torch.randn(n, k), -1)
        x = torch.randn(n, d)
        with torch.inference_mode():
            y = kernels.moe_ffn(x, experts, weights, *w, activation)
        assert torch.equal(y, moe_loop(x, experts, weights, *w, activation))
    assert calls == [1, 1]


def test_training_takes_the_sorted_path_without_padding(monkeypatch):
    """With gradients, moe_ffn (all experts local) runs the sorted path, not the padded grouped kernel, and
    gives every weight a gradient; with no tokens at all, zero gradients (ZeRO reduces every weight)."""
    import moe_asr_kernels as kernels
    monkeypatch.setattr(cpu, "grouped_ffn", lambda *a, **k: pytest.fail("padded path taken in training"))
    torch.manual_seed(0)
    n, k, e, d, f = 300, 2, 4, 6, 10
    for tokens in (n, 0):
        w = _weights(e, d, f)
        experts = torch.stack([torch.randperm(e)[:k] for _ in range(n)])[:tokens]
        weights = torch.softmax(torch.randn(tokens, k), -1).requires_grad_()
        x = torch.randn(tokens, d, requires_grad=True)
        y = kernels.moe_ffn(x, experts, weights, *w)
        assert y.shape == (tokens, d)
        y.sum().backward()
        assert all(p.grad is not None and bool(p.grad.any()) == (tokens > 0) for p in w + [weights])


def test_grouped_ffn_pads_only_without_autograd(monkeypatch):
    """Few even rows per expert: decoding pads them into one baddbmm run; training (autograd) runs each
    expert on its own rows, since the padding's gathers and their backwards cost more than they save."""
    counts = [6, 4, 2, 2, 3, 6, 6, 3]
    assert cpu.plan_segments(counts, 256, 1024) == [(0, 8, 6)]
    w = _weights(8, 256, 1024)
    rows = torch.randn(sum(counts), 256, requires_grad=True)
    calls = []
    real = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    cpu.grouped_ffn(rows, counts, *w).sum().backward()
    assert calls == [] and all(p.grad is not None for p in w)
    with torch.no_grad():
        cpu.grouped_ffn(rows, counts, *w)
    assert calls == [1, 1]
