"""The training-step breakdown times forward and backward per module kind without changing the step."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from bench.train_breakdown import KINDS, Subject, make_batch

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_hooks_leave_the_step_unchanged_and_time_every_kind_in_both_directions():
    timed, plain = (Subject(str(CONF / "tiny_moe.yaml"), 20, "grouped") for _ in range(2))
    plain.timers.active = False
    batch = make_batch(400, 100, timed.model.cfg.input_dim, 20)
    torch.manual_seed(0)
    with warnings.catch_warnings():  # a module whose input needs no gradient would have its backward uncounted
        warnings.simplefilter("error")
        parts = timed.step(batch)
    torch.manual_seed(0)
    plain.step(batch)
    for (name, a), b in zip(timed.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(a, b), name  # same forward, gradients and AdamW step
    for kind in KINDS:
        assert parts[f"{kind} fwd"] > 0 and parts[f"{kind} bwd"] > 0, kind
    timed_sum = sum(v for k, v in parts.items() if k != "step")
    assert abs(timed_sum - parts["step"]) < 1e-9  # "other" closes the sum: nothing counted twice
    assert parts["other fwd"] > 0 and parts["other bwd"] > 0 and parts["optimizer"] > 0


def test_impl_override_reaches_the_moe_layers_and_not_the_dense_model():
    loop = Subject(str(CONF / "tiny_moe.yaml"), 20, "loop")
    dense = Subject(str(CONF / "tiny_dense.yaml"), 20, "loop")
    assert {m.impl for m in loop.model.moe_layers()} == {"loop"}
    assert dense.label == str(CONF / "tiny_dense.yaml") and loop.label.endswith("(loop)")
