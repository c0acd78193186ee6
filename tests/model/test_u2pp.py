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


def _smoothed_kl(logits, target, smoothing):
    """WeNet's label-smoothed loss with torch.nn.functional: KL to a target of 1 - s on the token and
    s / (V - 1) on every other, summed over real tokens, divided by the batch size."""
    v = logits.shape[-1]
    true = torch.full(logits.shape, smoothing / (v - 1))
    true.scatter_(-1, target.clamp(min=0).unsqueeze(-1), 1 - smoothing)
    kl = F.kl_div(logits.float().log_softmax(-1), true, reduction="none").sum(-1)
    return (kl * (target != IGNORE_ID)).sum() / logits.shape[0]


def test_label_smoothing_equals_kl_div():
    logits = torch.randn(2, 5, 7)
    target = torch.tensor([[1, 2, 3, 4, IGNORE_ID], [0, 6, IGNORE_ID, IGNORE_ID, IGNORE_ID]])
    torch.testing.assert_close(label_smoothing_loss(logits, target, 0.1), _smoothed_kl(logits, target, 0.1))
    cross_entropy = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_ID, reduction="sum")
    torch.testing.assert_close(label_smoothing_loss(logits, target, 0.0), cross_entropy / 2)


def test_loss_is_the_u2pp_combination_of_losses_computed_by_hand():
    """Each part recomputed with torch.nn.functional from the model's encoder output and decoder logits on
    hand-written <sos>/<eos> targets, the R2L ones reversed: a decoder fed other targets, another CTC or
    smoothing, or another combination gives other numbers."""
    model = build_model(tiny_config(ctc_weight=0.3, reverse_weight=0.3, lsm_weight=0.1)).eval()
    feats, lengths, ys, ys_lens = _batch()
    encoded = {}
    model.encoder.register_forward_hook(lambda module, args, out: encoded.update(out=out))
    out = model(feats, lengths, ys, ys_lens)
    enc, mask = encoded["out"]
    s, x = 11, IGNORE_ID  # <sos/eos> is the last of the 12 ids
    assert model.sos == model.eos == s
    ys_in = torch.tensor([[s, 1, 2, 3, 4], [s, 5, 6, s, s], [s, 7, s, s, s]])
    ys_out = torch.tensor([[1, 2, 3, 4, s], [5, 6, s, x, x], [7, s, x, x, x]])
    r_ys_in = torch.tensor([[s, 4, 3, 2, 1], [s, 6, 5, s, s], [s, 7, s, s, s]])
    r_ys_out = torch.tensor([[4, 3, 2, 1, s], [6, 5, s, x, x], [7, s, x, x, x]])
    with torch.no_grad():
        l2r, r2l, _ = model.decoder(enc, mask, ys_in, ys_lens + 1, r_ys_in, 0.3)
        log_probs = model.ctc.ctc_lo(enc).float().log_softmax(-1).transpose(0, 1)
    ctc = F.ctc_loss(log_probs, ys.clamp(min=0), mask.squeeze(1).sum(1), ys_lens, blank=0, reduction="sum") / 3
    expect = {"loss_ctc": ctc, "loss_l2r": _smoothed_kl(l2r, ys_out, 0.1), "loss_r2l": _smoothed_kl(r2l, r_ys_out, 0.1)}
    expect["loss"] = 0.3 * ctc + 0.7 * (0.7 * expect["loss_l2r"] + 0.3 * expect["loss_r2l"])
    for key, value in expect.items():
        torch.testing.assert_close(out[key].detach(), value, msg=key)
    assert all(math.isfinite(float(v)) and v > 0 for v in expect.values())


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


def test_grouped_model_equals_the_loop_model():
    """The whole model on the grouped expert path and on WeNet's per-expert loop: loss and every gradient."""
    cfg = tiny_config()
    cfg.moe.impl = "grouped"
    grouped = build_model(cfg).eval()
    cfg.moe.impl = "loop"
    loop = build_model(cfg).eval()
    loop.load_state_dict(grouped.state_dict())
    losses = []
    for model in (grouped, loop):
        torch.manual_seed(2)  # the same dynamic chunk
        losses.append(model(*_batch())["loss"])
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(grouped.named_parameters(), loop.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_batch_shorter_than_the_front_end_window():
    model = build_model(tiny_config()).eval()
    enc, mask = model.encode(torch.randn(2, 5, 20), torch.tensor([5, 3]))
    assert enc.shape[1] == 1 and not mask.any()
