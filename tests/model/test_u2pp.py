"""The whole model: loss composition, targets, CTC robustness, dense reduction, gradient flow."""
import math

import pytest
import torch
import torch.nn.functional as F

from moe_asr.model.loss import label_smoothing_loss
from moe_asr.model.targets import add_sos_eos, reverse_padded
from moe_asr.model.u2pp import build_model
from moe_asr.symbols import IGNORE_ID
from tests.helpers import tiny_config


def _batch():
    feats = torch.randn(3, 90, 20)
    lengths = torch.tensor([90, 61, 30])
    ys = torch.tensor([[1, 2, 3, 4], [5, 6, IGNORE_ID, IGNORE_ID], [7, IGNORE_ID, IGNORE_ID, IGNORE_ID]])
    return feats, lengths, ys, torch.tensor([4, 2, 1])


def test_targets():
    ys = torch.tensor([[1, 2, 3], [4, IGNORE_ID, IGNORE_ID]])
    ys_in, ys_out = add_sos_eos(ys, sos=9, eos=9)
    assert ys_in.tolist() == [[9, 1, 2, 3], [9, 4, 9, 9]]
    assert ys_out.tolist() == [[1, 2, 3, 9], [4, 9, IGNORE_ID, IGNORE_ID]]
    assert reverse_padded(ys, torch.tensor([3, 1])).tolist() == [[3, 2, 1], [4, IGNORE_ID, IGNORE_ID]]


def test_label_smoothing_equals_kl_div():
    logits = torch.randn(2, 5, 7)
    target = torch.tensor([[1, 2, 3, 4, IGNORE_ID], [0, 6, IGNORE_ID, IGNORE_ID, IGNORE_ID]])
    s = 0.1
    true = torch.full((2, 5, 7), s / 6)
    true.scatter_(-1, target.clamp(min=0).unsqueeze(-1), 1 - s)
    kl = F.kl_div(logits.log_softmax(-1), true, reduction="none").sum(-1)
    expect = (kl * (target != IGNORE_ID)).sum() / 2
    torch.testing.assert_close(label_smoothing_loss(logits, target, s), expect)
    cross_entropy = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_ID, reduction="sum")
    torch.testing.assert_close(label_smoothing_loss(logits, target, 0.0), cross_entropy / 2)


def test_loss_is_the_u2pp_combination():
    model = build_model(tiny_config(ctc_weight=0.3, reverse_weight=0.3)).eval()
    torch.manual_seed(5)
    out = model(*_batch())
    expect = 0.3 * out["loss_ctc"] + 0.7 * (0.7 * out["loss_l2r"] + 0.3 * out["loss_r2l"])
    torch.testing.assert_close(out["loss"], expect)
    assert all(math.isfinite(float(v.detach())) for v in out.values())
    assert out["loss_r2l"] > 0 and out["loss_ctc"] > 0


def test_ctc_too_short_input_gives_no_nan():
    model = build_model(tiny_config()).train()
    feats = torch.randn(4, 40, 20)
    # 7 input frames -> 1 encoder frame for 3 tokens; 3 frames -> no encoder frame; an empty transcript
    lengths = torch.tensor([40, 7, 3, 40])
    ys = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, IGNORE_ID], [IGNORE_ID] * 3])
    out = model(feats, lengths, ys, torch.tensor([3, 3, 2, 0]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_every_expert_that_received_tokens_gets_gradient():
    model = build_model(tiny_config(num_experts=4, top_k=2)).train()
    routed = {}

    def recorder(layer):
        def record(router, args, output):
            routed[layer] = set(output[0].experts.flatten().tolist())
        return record

    hooks = [m.router.register_forward_hook(recorder(m)) for m in model.moe_layers()]
    model(*_batch())["loss"].backward()
    for h in hooks:
        h.remove()
    assert len(routed) == len(model.moe_layers()) == 2 * 2 + 2 + 1  # 2 per encoder block, 1 per decoder layer
    for layer in model.moe_layers():
        assert layer.router.gate.weight.grad.abs().sum() > 0
        for e in range(4):
            has_grad = bool(layer.experts.w1.grad[e].abs().sum() > 0)
            assert has_grad == (e in routed[layer]), f"expert {e}"


def test_dense_model_has_no_routers():
    model = build_model(tiny_config(num_experts=1, top_k=1))
    assert all(m.router is None for m in model.moe_layers())
    assert not any("router" in n for n, _ in model.named_parameters())
    out = model(*_batch())
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_model_impls_agree(impl):
    cfg = tiny_config()
    cfg.moe.impl = "grouped"
    torch.manual_seed(1)
    ref = build_model(cfg).eval()
    cfg.moe.impl = impl
    other = build_model(cfg).eval()
    other.load_state_dict(ref.state_dict())
    batch = _batch()
    torch.manual_seed(2)
    a = ref(*batch)["loss"]
    torch.manual_seed(2)
    b = other(*batch)["loss"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_batch_shorter_than_the_front_end_window():
    model = build_model(tiny_config()).eval()
    enc, mask = model.encode(torch.randn(2, 5, 20), torch.tensor([5, 3]))
    assert enc.shape[1] == 1 and not mask.any()
