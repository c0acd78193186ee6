"""The topk router's expert bias (loss-free balancing): it changes which experts are chosen, never
how the chosen ones are weighted; the update rule on hand-made counts; the config's rules; files
without the bias load with a zero one."""
from __future__ import annotations

import pytest
import torch

from moe_asr.moe.config import MoEConfig
from moe_asr.moe.layer import MoEFeedForward
from moe_asr.moe.router import TopKRouter, choice_bias_step, top_k_softmax
from moe_asr.schema import ConfigError

D, E, K = 8, 4, 2


def _router(seed: int = 0) -> TopKRouter:
    torch.manual_seed(seed)
    return TopKRouter(D, MoEConfig(E, K)).train()


def test_a_zero_bias_is_wenets_gate():
    router = _router()
    x = torch.randn(64, D)
    routing, _ = router(x)
    plain = top_k_softmax(router.gate(x), K)
    assert torch.equal(routing.experts, plain.experts) and torch.equal(routing.weights, plain.weights)


def test_the_bias_changes_the_choice_not_the_weighting():
    router = _router()
    x = torch.randn(256, D)
    before, _ = router(x)
    router.choice_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0]))  # expert 3 is chosen far more often
    after, _ = router(x)
    assert (after.experts == 3).any(1).sum() > (before.experts == 3).any(1).sum() + 50
    changed = (after.experts != before.experts).any(1)
    assert changed.sum() > 50
    # Each token's weights: a softmax over the *plain* logits of the experts it was given.
    logits = router.gate(x).detach()
    torch.testing.assert_close(after.weights, torch.softmax(logits.gather(1, after.experts), -1), rtol=0, atol=0)
    # A token that kept its experts kept its weights exactly.
    kept = ~changed
    assert torch.equal(after.weights[kept], before.weights[kept])
    # The chosen experts are the top k of the biased logits, in that order.
    assert torch.equal(after.experts, (logits + router.choice_bias).topk(K, -1).indices)
    assert router.tokens_per_expert.tolist() == torch.bincount(after.experts.flatten(), minlength=E).tolist()


def test_the_bias_is_state_not_a_parameter():
    router = _router()
    assert "choice_bias" in router.state_dict() and "choice_bias" not in dict(router.named_parameters())
    # DeepSpeed files every key of an MoE layer that holds "expert" as an expert's: the router has none.
    assert not [k for k in MoEFeedForward(D, 16, MoEConfig(E, K)).state_dict() if "expert" in k.split(".")[-1]]
    router.choice_bias.fill_(0.5)
    routing, _ = router(torch.randn(16, D))
    routing.weights.sum().backward()
    assert router.gate.weight.grad is not None and not router.choice_bias.requires_grad


def test_update_rule_on_hand_made_counts():
    """``rate * sign(mean - load)`` per layer: busy experts down, idle ones up, the mean one unmoved."""
    tokens = torch.tensor([[10, 0, 5, 5], [3, 3, 3, 3], [0, 0, 0, 8]])
    step = choice_bias_step(tokens, 0.1)
    assert step.dtype == torch.float32
    expected = torch.tensor([[-0.1, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, -0.1]])
    torch.testing.assert_close(step, expected, rtol=0, atol=0)
    # A fixed step, whatever the size of the imbalance: 1000 tokens too many move the bias as 1 does.
    torch.testing.assert_close(choice_bias_step(torch.tensor([1001, 1, 1, 1]), 0.1),
                               choice_bias_step(torch.tensor([2, 1, 1, 1]), 0.1), rtol=0, atol=0)


def test_files_without_the_bias_load_with_a_zero_one():
    """A model file written before the bias existed routes as it did: the same as a zero bias."""
    torch.manual_seed(0)
    layer = MoEFeedForward(D, 16, MoEConfig(E, K))
    old = {k: v for k, v in layer.state_dict().items() if not k.endswith("choice_bias")}
    loaded = MoEFeedForward(D, 16, MoEConfig(E, K))
    loaded.router.choice_bias.fill_(1.0)
    loaded.load_state_dict(old)
    assert not loaded.router.choice_bias.any()
    biased = {**old, "router.choice_bias": torch.arange(E, dtype=torch.float32)}
    loaded.load_state_dict(biased)
    assert loaded.router.choice_bias.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"bias_update_rate": -0.001}, "bias_update_rate: must be a finite number >= 0"),
    ({"bias_update_rate": float("nan")}, "bias_update_rate: must be a finite number >= 0"),
    ({"num_experts": 1, "top_k": 1, "bias_update_rate": 0.001}, "bias_update_rate: needs num_experts > 1"),
    ({"router": "tests.moe.hash_router:HashRouter", "bias_update_rate": 0.001},
     "bias_update_rate: router 'tests.moe.hash_router:HashRouter' has no expert bias"),
    ({"impl": "deepspeed", "bias_update_rate": 0.001}, "bias_update_rate: impl deepspeed routes by DeepSpeed"),
])
def test_config_rules_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**kwargs)


def test_the_rate_is_off_by_default_and_a_rate_is_accepted():
    assert MoEConfig().bias_update_rate == 0.0
    assert MoEConfig(bias_update_rate=0.001).bias_update_rate == 0.001


def test_impl_deepspeed_refuses_a_nonzero_bias():
    """DeepSpeed's gate would route by the plain logits: a silently different model."""
    layer = MoEFeedForward(D, 16, MoEConfig(E, 2, impl="deepspeed"))
    layer.router.choice_bias[0] = 0.5
    with pytest.raises(ValueError, match="impl deepspeed routes by DeepSpeed's own gate"):
        layer(torch.randn(3, D))


def test_the_rate_is_not_part_of_the_model():
    """The bias is in the weights; the rate only trains it: a run may start balancing a model trained
    without it (--init-from, a WeNet import) or freeze a bias at rate 0, and old runs' fingerprints,
    written before the key existed, still match."""
    from moe_asr.model.config import comparable, model_differences
    from tests.helpers import tiny_config

    plain, balanced = tiny_config(), tiny_config()
    balanced.moe = MoEConfig(num_experts=4, top_k=2, bias_update_rate=0.001)
    assert model_differences(plain, balanced) == {}
    assert "moe.bias_update_rate" not in comparable(balanced)
