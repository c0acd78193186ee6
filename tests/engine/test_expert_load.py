"""Expert-load statistics: window sums vs run totals, one-collective packing, impl 'deepspeed' ignored, the
expert-bias update from the step counts of all ranks, and the balance logged per layer (max/mean, rank shares)."""
from __future__ import annotations

import pytest
import torch

from moe_asr.engine import distributed
from moe_asr.engine.distributed import all_reduce_named
from moe_asr.engine.expert_load import ExpertLoad, max_mean_ratio, rank_shares
from moe_asr.moe.config import MoEConfig
from moe_asr.moe.layer import MoEFeedForward
from moe_asr.moe.router import choice_bias_step

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
    window = load.unpack(all_reduce_named(load.pack(), CPU), batches=2.0)
    assert window.tokens.dtype == torch.int64 and torch.equal(window.tokens, load.tokens)
    torch.testing.assert_close(window.entropy, load.entropy / 2, rtol=0, atol=0)


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
    window = load.unpack(sums, batches=sums["batches"].item())
    assert torch.equal(window.tokens, 2 * load.tokens)
    torch.testing.assert_close(window.entropy, 2 * load.entropy / 6, rtol=0, atol=0)


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
    window = load.unpack(all_reduce_named(load.pack(), CPU), batches=1.0)
    assert window.tokens.shape == (0, E) and window.entropy.shape == (0,) and window.max_mean.shape == (0,)


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


def _biased(layers: dict[str, MoEFeedForward]) -> list[torch.Tensor]:
    return [m.router.choice_bias.clone() for m in layers.values()]


def test_end_step_moves_the_bias_by_the_step_counts_of_all_ranks(monkeypatch):
    """Every micro-batch of the step counts, summed over the ranks (here a faked second rank that
    routed ``other``) in one all-reduce; the next step counts from zero and moves the bias again."""
    from moe_asr.engine import expert_load

    layers = _layers("grouped", "loop")
    load = ExpertLoad(layers, E, CPU, bias_update_rate=0.25)
    other = torch.tensor([[40, 0, 0, 0], [0, 0, 0, 40]])
    reduced = []

    def two_ranks(values: torch.Tensor, op=None) -> torch.Tensor:
        reduced.append(values.clone())
        return values.add_(other)

    monkeypatch.setattr(expert_load, "all_reduce", two_ranks)
    _step(load, layers, 5)
    _step(load, layers, 7)  # a second micro-batch of the same optimizer step
    load.end_step()
    assert len(reduced) == 1 and torch.equal(reduced[0], load.tokens)  # both micro-batches, one collective
    first = [choice_bias_step(counts, 0.25) for counts in load.tokens + other]
    for bias, step in zip(_biased(layers), first):
        torch.testing.assert_close(bias, step, rtol=0, atol=0)
    assert not load.step_tokens.any()
    window = load.tokens.clone()
    _step(load, layers, 3)
    load.end_step()
    assert len(reduced) == 2 and torch.equal(reduced[1], load.tokens - window)  # this step's micro-batch only
    for bias, step, counts in zip(_biased(layers), first, load.tokens - window + other):
        torch.testing.assert_close(bias, step + choice_bias_step(counts, 0.25), rtol=0, atol=0)


def test_end_step_without_a_rate_leaves_the_bias_and_reduces_nothing(monkeypatch):
    from moe_asr.engine import expert_load

    monkeypatch.setattr(expert_load, "all_reduce", lambda *a, **k: pytest.fail("an all-reduce without a rate"))
    layers = _layers("grouped")
    load = ExpertLoad(layers, E, CPU)
    _step(load, layers, 9)
    load.end_step()
    assert not _biased(layers)[0].any() and not load.step_tokens.any()


def test_max_mean_and_rank_shares_on_hand_made_counts():
    tokens = torch.tensor([[10, 0, 5, 5], [3, 3, 3, 3], [0, 0, 0, 0], [1, 1, 1, 9]])
    assert max_mean_ratio(tokens).tolist() == [2.0, 1.0, 0.0, 3.0]
    # ep_size 2: rank 0 holds experts 0-1, rank 1 experts 2-3 (Experts.shard's cut).
    assert rank_shares(tokens, 2).tolist() == [[0.5, 0.5], [0.5, 0.5], [0.0, 0.0], [1 / 6, 5 / 6]]
    assert rank_shares(tokens, 4)[0].tolist() == [0.5, 0.0, 0.25, 0.25]
    load = ExpertLoad(_layers("grouped", "grouped", "grouped", "grouped"), E, CPU, ep_size=2)
    window = load.unpack({"moe_tokens": tokens.double(), "moe_entropy": torch.ones(4)}, batches=2)
    assert window.max_mean.tolist() == [2.0, 1.0, 0.0, 3.0] and window.rank_share[3].tolist() == [1 / 6, 5 / 6]
    assert ExpertLoad({}, E, CPU).unpack({"moe_tokens": tokens.double(), "moe_entropy": torch.ones(4)},
                                         batches=2).rank_share is None


def test_balance_is_logged_per_layer(tmp_path, caplog):
    """metrics.jsonl and TensorBoard get each layer's max/mean load and each expert-parallel rank's share;
    the console line the worst layer's; the end-of-run plot is written with its rank panel."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moe_asr.engine.logging import TrainLogger, read_metrics
    from moe_asr.engine.plots import expert_load_heatmap

    names = ["enc0", "dec0"]
    tokens = torch.tensor([[10, 0, 5, 5], [1, 1, 1, 9]])
    load = ExpertLoad(_layers("grouped", "grouped"), E, CPU, ep_size=2)
    window = load.unpack({"moe_tokens": tokens.double(), "moe_entropy": torch.ones(2)}, batches=1)
    logger = TrainLogger(tmp_path, True, names, 0)
    with caplog.at_level(logging.INFO, logger="moe_asr.train"):
        logger.train(3, 0, {"loss": 1.0}, 1e-3, 100.0, 1.0, 0, window, {})
    logger.close()
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert record["moe_max_mean"] == {"enc0": 2.0, "dec0": 3.0}
    assert record["moe_rank_share"] == {"enc0": [0.5, 0.5], "dec0": [1 / 6, 5 / 6]}
    assert "load max/mean 3.00 busiest rank 83% skipped 0" in caplog.records[-1].getMessage()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert events.Scalars("moe_max_mean/enc0")[-1].value == 2.0
    assert events.Scalars("moe_rank_share/dec0/rank_1")[-1].value == pytest.approx(5 / 6)
    expert_load_heatmap(tokens, names, tmp_path / "expert_load.png", ep_size=2)
    assert (tmp_path / "expert_load.png").stat().st_size > 0


def test_a_bias_cast_below_float32_is_refused():
    """A bf16 bias of 1 plus a step of 1e-3 rounds back to 1: balancing would stop without a word."""
    layers = _layers("grouped")
    layers["layer0"].router.choice_bias = layers["layer0"].router.choice_bias.bfloat16()
    with pytest.raises(ValueError, match="choice_bias must stay float32"):
        ExpertLoad(layers, E, CPU, bias_update_rate=0.001)
    ExpertLoad(layers, E, CPU)  # without a rate the bias never moves: nothing to lose
