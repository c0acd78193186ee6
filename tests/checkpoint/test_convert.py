"""Averaging and upcycling: the mean is the hand-computed mean; an upcycled MoE computes its dense model."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from moe_asr.checkpoint import load_model, read_model_state, save_model
from moe_asr.checkpoint.average import average, run_checkpoints
from moe_asr.checkpoint.convert import upcycle
from moe_asr.cli import main
from moe_asr.data.config import TokenizerConfig
from moe_asr.data.tokenizer import Tokenizer
from moe_asr.run.config import ExperimentConfig
from moe_asr.model.u2pp import build_model
from moe_asr.schema import to_dict
from tests.helpers import tiny_config


def _tokenizer(vocab: int = 12) -> Tokenizer:
    table = {"<blank>": 0, "<unk>": 1, **{chr(ord("a") + i): 2 + i for i in range(vocab - 3)}, "<sos/eos>": vocab - 1}
    return Tokenizer(TokenizerConfig(), table)


def _saved(path, seed: int, **cfg_kw):
    torch.manual_seed(seed)
    cfg = ExperimentConfig(model=tiny_config(**cfg_kw))
    model = build_model(cfg.model)
    return save_model(path, model.state_dict(), cfg, _tokenizer()), model


def test_average_is_the_mean_of_the_tensors(tmp_path):
    paths, models = zip(*(_saved(tmp_path / f"m{i}.pt", i, cnn_module_norm="batch_norm") for i in range(3)))
    with torch.no_grad():
        for i, m in enumerate(models):  # distinct integer buffers, to see whose are kept
            for name, buf in m.named_buffers():
                if name.endswith("num_batches_tracked"):
                    buf.fill_(10 + i)
    paths = [save_model(p, m.state_dict(), read_model_state(p).config, _tokenizer()) for p, m in zip(paths, models)]
    ms = average(paths)
    states = [m.state_dict() for m in models]
    for key, value in ms.state.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (states[0][key] + states[1][key] + states[2][key]) / 3, msg=key)
        else:
            assert torch.equal(value, states[0][key]), key  # the first source's
    assert any(k.endswith("num_batches_tracked") for k in ms.state)
    assert ms.extra["averaged"] == [str(p) for p in paths]


def test_convert_average_writes_the_mean_of_the_named_checkpoints(tmp_path):
    paths, models = zip(*(_saved(tmp_path / f"m{i}.pt", i) for i in range(3)))
    out = tmp_path / "avg.pt"
    assert main(["convert", "average", *map(str, paths), "-o", str(out)]) == 0
    states = [m.state_dict() for m in models]
    written = read_model_state(out).state
    assert written.keys() == states[0].keys()
    for key, value in written.items():
        torch.testing.assert_close(value, sum(s[key] for s in states) / 3, rtol=0, atol=1e-5, msg=key)


def test_average_means_the_choice_bias_and_so_the_choice_scores(tmp_path):
    """A router chooses by ``x W + b``, affine in (W, b): the average model's router scores every
    token with the mean of the sources' scores. Runs balanced at another rate are the same model."""
    paths, routers = [], []
    for i, rate in enumerate((0.0, 0.001)):
        torch.manual_seed(i)
        cfg = ExperimentConfig(model=tiny_config())
        cfg.model.moe.bias_update_rate = rate
        model = build_model(cfg.model)
        for layer in model.moe_layers():
            layer.router.choice_bias.copy_(torch.randn(4))
        paths.append(save_model(tmp_path / f"m{i}.pt", model.state_dict(), cfg, _tokenizer()))
        routers.append(model.moe_layers()[0].router)
    ms = average(paths)
    mean = build_model(ms.config.model)
    mean.load_state_dict(ms.state)
    router = mean.moe_layers()[0].router
    torch.testing.assert_close(router.choice_bias, (routers[0].choice_bias + routers[1].choice_bias) / 2)
    x = torch.randn(50, 32)
    with torch.no_grad():
        scores = [r.gate(x) + r.choice_bias for r in (*routers, router)]
    torch.testing.assert_close(scores[2], (scores[0] + scores[1]) / 2, rtol=0, atol=1e-6)


def test_average_refuses_different_models(tmp_path):
    a, _ = _saved(tmp_path / "a.pt", 0)
    b, _ = _saved(tmp_path / "b.pt", 0, num_experts=2)
    with pytest.raises(ValueError, match=r"b.pt: another model than .*a.pt \(config model.moe.num_experts differs\)"):
        average([a, b])


def test_run_checkpoints_picks_best_and_last(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    index = [{"tag": "step_10", "step": 10, "epoch": 0, "cv_loss": 3.0},
             {"tag": "epoch_0", "step": 20, "epoch": 0, "cv_loss": 1.0},
             {"tag": "step_30", "step": 30, "epoch": 1, "cv_loss": None},
             {"tag": "epoch_1", "step": 40, "epoch": 1, "cv_loss": 2.0},
             {"tag": "step_45", "step": 45, "epoch": 2, "cv_loss": float("nan")}]
    (root / "checkpoints.json").write_text(json.dumps(index))
    assert run_checkpoints(tmp_path, 2, "best") == [root / "epoch_0", root / "epoch_1"]  # NaN is no best
    assert run_checkpoints(tmp_path, 3, "last") == [root / "step_45", root / "epoch_1", root / "step_30"]
    with pytest.raises(ValueError, match="4 checkpoints asked for, 3 with a CV loss listed"):
        run_checkpoints(tmp_path, 4, "best")


def _moe_yaml(tmp_path, dense_cfg: ExperimentConfig, **moe) -> str:
    data = to_dict(dense_cfg)
    data["model"]["moe"].update(moe)
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_upcycled_model_computes_the_dense_model(tmp_path):
    dense_pt, dense = _saved(tmp_path / "dense.pt", 3, num_experts=1, top_k=1)
    ms = upcycle(dense_pt, _moe_yaml(tmp_path, read_model_state(dense_pt).config, num_experts=4, top_k=2))
    assert ms.config.model.moe.num_experts == 4
    moe = load_model(save_model(tmp_path / "moe.pt", ms.state, ms.config, ms.tokenizer, **ms.extra)).model
    assert sum(p.numel() for p in moe.parameters()) > 3 * sum(p.numel() for p in dense.parameters()) // 2
    dense.eval()
    gen = torch.Generator().manual_seed(4)
    feats, lengths = torch.randn(2, 50, 20, generator=gen), torch.tensor([50, 33])
    targets = torch.tensor([[2, 5, 7, 3], [4, 4, 9, -1]])
    target_lengths = torch.tensor([4, 3])
    with torch.no_grad():
        for chunk in (-1, 4):  # valid frames (an MoE layer leaves padding at 0, a dense FFN does not)
            (ours, mask), (theirs, _) = moe.encode(feats, lengths, chunk), dense.encode(feats, lengths, chunk)
            valid = mask.squeeze(1)
            torch.testing.assert_close(ours[valid], theirs[valid], rtol=1e-5, atol=1e-6)
        losses = []
        for model in (moe, dense):
            torch.manual_seed(5)  # the same dynamic-chunk draw for both
            losses.append(model(feats, lengths, targets, target_lengths))
        ours, theirs = losses
    for key in ("loss", "loss_ctc", "loss_l2r", "loss_r2l"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_upcycle_refuses_other_shapes(tmp_path):
    dense_pt, _ = _saved(tmp_path / "dense.pt", 3, num_experts=1, top_k=1)
    cfg = read_model_state(dense_pt).config
    cfg.model.encoder.linear_units = 64
    with pytest.raises(ValueError, match=r"model.encoder.linear_units is 64, the dense model's 48; only model.moe may differ"):
        upcycle(dense_pt, _moe_yaml(tmp_path, cfg, num_experts=4, top_k=2))
    moe_pt, _ = _saved(tmp_path / "moe.pt", 3)
    with pytest.raises(ValueError, match="not a dense model"):
        upcycle(moe_pt, _moe_yaml(tmp_path, cfg, num_experts=4, top_k=2))
