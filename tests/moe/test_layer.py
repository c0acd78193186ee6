"""MoE layer equivalences: grouped fast path == per-expert loop, one expert == dense FFN."""
import pytest
import torch
from torch import nn

from moe_asr.moe.config import MoEConfig
from moe_asr.moe.dispatch import make_plan, permute, unpermute
from moe_asr.moe.layer import MoEFeedForward
from moe_asr.moe.router import TopKRouter, load_balancing_loss


def _pair(num_experts: int, top_k: int, seed: int = 0, impl: str = "grouped",
          **kw) -> tuple[MoEFeedForward, MoEFeedForward]:
    torch.manual_seed(seed)
    a = MoEFeedForward(12, 20, MoEConfig(num_experts, top_k, impl=impl, **kw))
    b = MoEFeedForward(12, 20, MoEConfig(num_experts, top_k, impl="loop", **kw))
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("num_experts,top_k,tokens,impl", [
    (8, 2, 37, "grouped"), (8, 1, 5, "grouped"), (4, 4, 9, "grouped"), (16, 2, 1, "grouped"),
    (8, 2, 0, "grouped"), (8, 2, 37, "deepspeed"), (4, 2, 9, "deepspeed")])
def test_impl_equals_loop_forward_backward(num_experts, top_k, tokens, impl):
    a, b = _pair(num_experts, top_k, impl=impl)
    x = torch.randn(tokens, 12)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    if tokens == 0:  # an empty batch (e.g. a rank with no tokens) has nothing to differentiate
        assert ya.shape == (0, 12)
        return
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_skewed_routing_one_expert_takes_all():
    a, b = _pair(8, 2)
    with torch.no_grad():  # make experts 3 and 5 win for every token
        a.router.gate.weight.zero_()
        a.router.gate.weight[3].fill_(1.0)
        a.router.gate.weight[5].fill_(0.5)
    b.load_state_dict(a.state_dict())
    x = torch.rand(23, 12) + 0.1
    plan = make_plan(a.router(x)[0].experts, 8)
    assert plan.counts[3] == 23 and plan.counts[5] == 23 and plan.counts.sum() == 46
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)


def test_one_expert_is_a_dense_ffn():
    torch.manual_seed(0)
    moe = MoEFeedForward(12, 20, MoEConfig(num_experts=1, top_k=1), activation="relu")
    assert moe.router is None
    dense = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 12))
    with torch.no_grad():
        dense[0].weight.copy_(moe.experts.w1[0].T)
        dense[0].bias.copy_(moe.experts.b1[0])
        dense[2].weight.copy_(moe.experts.w2[0].T)
        dense[2].bias.copy_(moe.experts.b2[0])
    x = torch.randn(3, 7, 12)
    torch.testing.assert_close(moe(x), dense(x))
    assert sum(p.numel() for p in moe.parameters()) == sum(p.numel() for p in dense.parameters())


def test_router_is_wenet_gate():
    """Top-k of raw logits, softmax over the chosen k only, in float32, no bias."""
    torch.manual_seed(1)
    router = TopKRouter(6, MoEConfig(5, 2))
    assert router.gate.bias is None
    x = torch.randn(4, 6)
    routing, aux = router(x)
    logits = x @ router.gate.weight.T
    for n in range(4):
        best = logits[n].argsort(descending=True)[:2]
        assert routing.experts[n].tolist() == best.tolist()
        torch.testing.assert_close(routing.weights[n], torch.softmax(logits[n, best], -1))
    assert routing.weights.dtype == torch.float32
    assert aux.item() == 0.0


def test_gradient_reaches_every_expert_that_received_tokens():
    torch.manual_seed(2)
    moe = MoEFeedForward(12, 20, MoEConfig(8, 2))
    x = torch.randn(6, 12)
    used = set(moe.router(x)[0].experts.flatten().tolist())
    moe(x).square().sum().backward()
    for e in range(8):
        received = moe.experts.w1.grad[e].abs().sum() > 0
        assert received == (e in used), f"expert {e}: used={e in used}, grad={received}"
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_permute_unpermute_round_trip():
    experts = torch.tensor([[2, 0], [1, 2], [2, 1]])
    plan = make_plan(experts, 3)
    assert plan.counts.tolist() == [1, 2, 3]
    assert plan.tokens.tolist() == [0, 1, 2, 0, 1, 2]
    x = torch.arange(3.0).unsqueeze(1)
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    torch.testing.assert_close(unpermute(permute(x, plan), plan, w), x)


def test_aux_losses():
    probs = torch.full((4, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    torch.testing.assert_close(load_balancing_loss(probs, experts, 4), torch.tensor(1.0))
    torch.manual_seed(3)
    moe = MoEFeedForward(12, 20, MoEConfig(8, 2, aux_loss_coef=0.01, z_loss_coef=0.001))
    moe(torch.randn(10, 12))
    assert moe.aux_loss.requires_grad and moe.aux_loss.item() > 0


def test_shard_keeps_one_ranks_experts():
    torch.manual_seed(4)
    full = MoEFeedForward(12, 20, MoEConfig(8, 2))
    half = MoEFeedForward(12, 20, MoEConfig(8, 2))
    half.load_state_dict(full.state_dict())
    half.shard(None, rank=1, size=2)
    torch.testing.assert_close(half.experts.w1, full.experts.w1[4:])
    torch.testing.assert_close(half.experts.b2, full.experts.b2[4:])
    torch.testing.assert_close(half.router.gate.weight, full.router.gate.weight)
    assert half.experts.num_local == 4 and half.experts.first_expert == 4 and half.experts.ep_size == 2
    with pytest.raises(RuntimeError, match="no expert-parallel group"):
        half(torch.randn(3, 12))
    with pytest.raises(RuntimeError, match="already sharded"):
        half.shard(None, rank=0, size=2)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        MoEFeedForward(12, 20, MoEConfig(8, 2)).shard(None, rank=2, size=2)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_padding_is_not_routed(impl):
    torch.manual_seed(5)
    moe = MoEFeedForward(12, 20, MoEConfig(8, 2, impl=impl)).train()
    x = torch.randn(2, 6, 12)
    valid = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    y_all = moe(x)
    y = moe(x, valid)
    assert int(moe.router.tokens_per_expert.sum()) == 8 * 2  # 8 real tokens x top-2
    torch.testing.assert_close(y[valid], y_all[valid])
    assert y[~valid].abs().sum() == 0


@pytest.mark.parametrize("impl", ["grouped", "deepspeed"])
def test_short_training_run_matches_loop(impl):
    """A few optimiser steps (hidden dropout off, aux loss on) end on the same weights as the loop."""
    a, b = _pair(8, 2, seed=6, impl=impl, aux_loss_coef=0.01 if impl == "grouped" else 0.0)
    a.train(), b.train()
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    target = torch.randn(40, 12, generator=gen)
    for _ in range(5):
        x = torch.randn(40, 12, generator=gen)
        for moe, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss = (moe(x) - target).square().mean()
            if impl == "grouped":
                loss = loss + moe.aux_loss
            loss.backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)


def test_moe_config_rules_name_the_key():
    from moe_asr.schema import ConfigError

    for kwargs, message in [({"impl": "megablocks"}, "impl: 'megablocks' is not one of"),
                            ({"num_experts": 1, "top_k": 2}, "top_k: must be in"),
                            ({"impl": "deepspeed", "top_k": 1}, "impl: deepspeed is a comparison path")]:
        with pytest.raises(ConfigError, match=message):
            MoEConfig(**kwargs)


def test_a_router_given_no_tokens_reports_zeros_not_nan():
    """A rank whose batch is all padding routes nothing: its losses and entropy must stay finite (0), or one
    NaN poisons the all-reduced loss and the logged entropy of every rank."""
    router = TopKRouter(6, MoEConfig(4, 2, aux_loss_coef=0.01, z_loss_coef=0.001)).train()
    x = torch.zeros(0, 6, requires_grad=True)
    routing, aux = router(x)
    assert routing.experts.shape == (0, 2) and aux.item() == 0.0
    assert router.entropy.item() == 0.0 and router.tokens_per_expert.tolist() == [0, 0, 0, 0]
    aux.backward()
    assert router.gate.weight.grad is not None and not router.gate.weight.grad.any()


def test_a_bf16_router_routes_by_float32_logits():
    """bf16 activations and gate, as DeepSpeed's bf16 mode makes them: the logits, the top-k and the
    softmax over it are computed in float32 from those bf16 values (bf16 logits would round first)."""
    torch.manual_seed(3)
    router = TopKRouter(64, MoEConfig(8, 2)).to(torch.bfloat16)
    x = torch.randn(256, 64).to(torch.bfloat16)
    routing, _ = router(x)
    logits = x.float() @ router.gate.weight.float().T
    top, experts = logits.topk(2, dim=-1)
    assert torch.equal(routing.experts, experts)
    torch.testing.assert_close(routing.weights, torch.softmax(top, -1), rtol=1e-6, atol=1e-7)
