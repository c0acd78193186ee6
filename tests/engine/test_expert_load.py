"""Expert-load statistics: window sums vs run totals, one-collective packing, impl 'deepspeed' ignored."""
from __future__ import annotations

import torch

from moe_asr.engine import distributed
from moe_asr.engine.distributed import all_reduce_named
from moe_asr.engine.expert_load import ExpertLoad
from moe_asr.moe.config import MoEConfig
from moe_asr.moe.layer import MoEFeedForward

D, E, K = 12, 4, 2
CPU = torch.device("cpu")


def _layers(*impls: str) -> dict[str, MoEFeedForward]:
    torch.manual_seed(0)
    return {f"layer{i}": MoEFeedForward(D, 16, MoEConfig(E, K, impl=impl)) for i, impl in enumerate(impls)}


def _forward(layers: dict[str, MoEFeedForward], tokens: int) -> None:
    for layer in layers.values():
        layer.train()(torch.randn(tokens, D))


def _step(load: ExpertLoad, layers: dict[str, MoEFeedForward], tokens: int) -> None:
    _forward(layers, tokens)
    load.record()


def test_window_restarts_totals_accumulate():
    layers = _layers("grouped", "loop")
    load = ExpertLoad(layers, E, CPU)
    entropy = torch.zeros(2, dtype=torch.float64)
    for tokens in (5, 7):
        _step(load, layers, tokens)
        entropy += torch.stack([m.router.entropy.double() for m in layers.values()])
    assert load.tokens.shape == (2, E) and load.tokens.dtype == torch.int64
    assert load.tokens.sum(1).tolist() == [K * 12, K * 12]
    assert torch.equal(load.entropy, entropy)
    assert torch.equal(load.total, load.tokens)

    load.reset_window()
    assert not load.tokens.any() and not load.entropy.any()
    _step(load, layers, 3)
    assert load.tokens.sum(1).tolist() == [K * 3, K * 3]
    assert load.total.sum(1).tolist() == [K * 15, K * 15]


def test_pack_and_unpack_round_trip():
    layers = _layers("grouped", "grouped", "loop")
    load = ExpertLoad(layers, E, CPU)
    for tokens in (9, 4):
        _step(load, layers, tokens)
    tokens, entropy = ExpertLoad.unpack(all_reduce_named(load.pack(), CPU), batches=2.0)
    assert tokens.dtype == torch.int64 and torch.equal(tokens, load.tokens)
    torch.testing.assert_close(entropy, load.entropy / 2, rtol=0, atol=0)


def test_one_collective_sums_every_named_tensor(monkeypatch):
    """Two identical ranks, faked: every name comes back doubled in its own shape, from one all-reduce."""
    calls = []

    def two_ranks(values: torch.Tensor, op=None) -> torch.Tensor:
        calls.append(values.numel())
        return values.mul_(2)

    monkeypatch.setattr(distributed, "all_reduce", two_ranks)
    layers = _layers("grouped")
    load = ExpertLoad(layers, E, CPU)
    _step(load, layers, 6)
    sums = all_reduce_named({"losses": torch.tensor([1.5, 2.25]), "batches": torch.tensor(3),
                             **load.pack(), "skips": torch.tensor([0, 4, 1])}, CPU)
    assert calls == [2 + 1 + E + 1 + 3]
    assert list(sums) == ["losses", "batches", "moe_tokens", "moe_entropy", "skips"]
    assert all(t.dtype == torch.float64 and t.device == CPU for t in sums.values())
    assert sums["losses"].tolist() == [3.0, 4.5] and sums["batches"].shape == () and sums["batches"].item() == 6
    assert sums["skips"].tolist() == [0, 8, 2]
    tokens, entropy = ExpertLoad.unpack(sums, batches=sums["batches"].item())
    assert torch.equal(tokens, 2 * load.tokens)
    torch.testing.assert_close(entropy, 2 * load.entropy / 6, rtol=0, atol=0)


def test_deepspeed_impl_layers_record_nothing():
    """DeepSpeed's gate routes impl 'deepspeed' layers: their routers keep no counts, so none are taken."""
    layers = _layers("grouped", "deepspeed")
    load = ExpertLoad(layers, E, CPU)
    _step(load, layers, 5)
    assert layers["layer1"].router.tokens_per_expert is None
    assert not load.tokens.any() and not load.entropy.any() and not load.total.any()


def test_no_moe_layers():
    load = ExpertLoad({}, E, CPU)
    load.record()
    tokens, entropy = ExpertLoad.unpack(all_reduce_named(load.pack(), CPU), batches=1.0)
    assert tokens.shape == (0, E) and entropy.shape == (0,)


def test_run_totals_travel_in_checkpoints_as_expert_tokens():
    layers = _layers("grouped", "loop")
    load = ExpertLoad(layers, E, CPU)
    _step(load, layers, 8)
    state = load.state_dict()
    assert list(state) == ["expert_tokens"] and state["expert_tokens"].device == CPU
    resumed = ExpertLoad(layers, E, CPU)
    resumed.load_state_dict({"loop": {}, **state})
    assert torch.equal(resumed.total, load.total) and not resumed.tokens.any()
    assert torch.equal(resumed.run_totals(), load.total)  # one process: the sum over ranks is its own
