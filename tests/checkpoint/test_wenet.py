"""A WeNet checkpoint imported by ``import_wenet`` computes what WeNet's equations compute.

The files are those WeNet's training leaves in a recipe tree (``exp/<tag>/``
``final.pt`` and ``train.yaml``, ``data/dict/lang_char.txt``,
``data/train/global_cmvn``, relative paths as WeNet writes them), with random
weights: ``wenet_written/`` holds two train.yaml files WeNet's own train.py
wrote and a description of its checkpoints (every key, shape and dtype, the
saved position tables), and the fixture is checked against them. The reference
below is written from WeNet's documented equations with torch.nn.functional
only (no module of ours): Conv2d subsampling, macaron FFN (x1/2, dense or top-k
MoE), relative-position MHSA scoring absolute key positions (no Transformer-XL
shift), causal convolution that zero-pads the module's input before
pointwise_conv1 + GLU, final FFN (x1/2), norms, the CTC log-softmax and the
attention decoders, with positions from the checkpoint's tables as WeNet reads them.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from moe_asr.checkpoint.load import load_model
from moe_asr.checkpoint.wenet import import_wenet
from moe_asr.cli import main
from moe_asr.model.u2pp import build_model
from moe_asr.schema import ConfigError
from tests.checkpoint.wenet_written.record import describe

D, HEADS, FF, IDIM, EXPERTS, TOP_K = 16, 2, 24, 20, 4, 2
TOKENS = list("abcdefg")
VOCAB = len(TOKENS) + 3  # <blank>, <unk>, <sos/eos>
MAX_LEN = 5000  # rows of WeNet's saved position tables
WRITTEN = Path(__file__).parent / "wenet_written"
CMVN = ("encoder.global_cmvn.mean", "encoder.global_cmvn.istd")
# (kernel, stride) of WeNet's Conv2dSubsampling4/6/8 and the name of its output Linear.
SUBSAMPLING = {"conv2d": ([(3, 2), (3, 2)], "out.0"), "conv2d6": ([(3, 2), (5, 3)], "linear"),
               "conv2d8": ([(3, 2), (3, 2), (3, 2)], "linear")}
ACT = {"swish": lambda x: x * torch.sigmoid(x), "relu": F.relu}


# ---------------------------------------------------------------- a WeNet checkpoint, train.yaml, units.txt

def _w(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 0.3


def _linear(state: dict, name: str, out: int, inp: int, bias: bool = True) -> None:
    state[f"{name}.weight"] = _w(out, inp)
    if bias:
        state[f"{name}.bias"] = _w(out)


def _norm(state: dict, name: str) -> None:
    state[f"{name}.weight"] = 1 + 0.1 * torch.randn(D)
    state[f"{name}.bias"] = 0.1 * torch.randn(D)


def _ffn(state: dict, name: str, moe: bool) -> None:
    if moe:
        state[f"{name}.gate.weight"] = _w(EXPERTS, D)
        names = [f"{name}.experts.{e}" for e in range(EXPERTS)]
    else:
        names = [name]
    for n in names:
        _linear(state, f"{n}.w_1", FF, D)
        _linear(state, f"{n}.w_2", D, FF)


def _attention(state: dict, name: str, rel: bool) -> None:
    for part in ("linear_q", "linear_k", "linear_v", "linear_out"):
        _linear(state, f"{name}.{part}", D, D)
    if rel:
        _linear(state, f"{name}.linear_pos", D, D, bias=False)
        state[f"{name}.pos_bias_u"] = _w(HEADS, D // HEADS)
        state[f"{name}.pos_bias_v"] = _w(HEADS, D // HEADS)


def wenet_pe() -> torch.Tensor:
    """The ``[1, MAX_LEN, D]`` table WeNet saves: PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(...).

    Evaluated in float32 as WeNet does (``pos * exp(2i * -ln(10000) / D)``), so it is WeNet's to the bit.
    """
    angle = torch.arange(MAX_LEN, dtype=torch.float32).unsqueeze(1) * torch.exp(
        torch.arange(0, D, 2, dtype=torch.float32) * -(math.log(10000.0) / D))
    pe = torch.zeros(MAX_LEN, D)
    pe[:, 0::2], pe[:, 1::2] = angle.sin(), angle.cos()
    return pe.unsqueeze(0)


def _decoder(state: dict, name: str, blocks: int, vocab: int, moe: bool) -> None:
    state[f"{name}.embed.0.weight"] = _w(vocab, D)
    state[f"{name}.embed.1.pe"] = wenet_pe()
    for j in range(blocks):
        layer = f"{name}.decoders.{j}"
        _attention(state, f"{layer}.self_attn", rel=False)
        _attention(state, f"{layer}.src_attn", rel=False)
        _ffn(state, f"{layer}.feed_forward", moe)
        for n in ("norm1", "norm2", "norm3"):
            _norm(state, f"{layer}.{n}")
    _norm(state, f"{name}.after_norm")
    _linear(state, f"{name}.output_layer", vocab, D)


def wenet_state(case: dict, vocab: int) -> dict[str, torch.Tensor]:
    """Random weights under WeNet's names and layouts for the model of ``case``, with its saved buffers."""
    state: dict[str, torch.Tensor] = {CMVN[0]: torch.randn(IDIM), CMVN[1]: 0.5 + torch.rand(IDIM),
                                      "encoder.embed.pos_enc.pe": wenet_pe()}
    layers, out_name = SUBSAMPLING[case["input_layer"]]
    channels, freq = 1, IDIM
    for i, (k, s) in enumerate(layers):
        state[f"encoder.embed.conv.{2 * i}.weight"] = _w(D, channels, k, k) / k
        state[f"encoder.embed.conv.{2 * i}.bias"] = _w(D)
        channels, freq = D, (freq - k) // s + 1
    _linear(state, f"encoder.embed.{out_name}", D, D * freq)
    state[f"encoder.embed.{out_name}.weight"] /= math.sqrt(freq)
    for i in range(2):
        layer = f"encoder.encoders.{i}"
        _attention(state, f"{layer}.self_attn", rel=True)
        _ffn(state, f"{layer}.feed_forward", case["moe"])
        _ffn(state, f"{layer}.feed_forward_macaron", case["moe"])
        conv = f"{layer}.conv_module"
        state[f"{conv}.pointwise_conv1.weight"], state[f"{conv}.pointwise_conv1.bias"] = _w(2 * D, D, 1), _w(2 * D)
        state[f"{conv}.depthwise_conv.weight"] = _w(D, 1, case["kernel"])
        state[f"{conv}.depthwise_conv.bias"] = _w(D)
        _norm(state, f"{conv}.norm")
        if case["norm"] == "batch_norm":
            state[f"{conv}.norm.running_mean"] = 0.1 * torch.randn(D)
            state[f"{conv}.norm.running_var"] = 0.5 + torch.rand(D)
            state[f"{conv}.norm.num_batches_tracked"] = torch.tensor(7)
        state[f"{conv}.pointwise_conv2.weight"], state[f"{conv}.pointwise_conv2.bias"] = _w(D, D, 1), _w(D)
        for n in ("norm_ff", "norm_mha", "norm_ff_macaron", "norm_conv", "norm_final"):
            _norm(state, f"{layer}.{n}")
    _norm(state, "encoder.after_norm")
    if case["decoder"] == "bitransformer":
        _decoder(state, "decoder.left_decoder", 2, vocab, case["moe"])
        _decoder(state, "decoder.right_decoder", 1, vocab, case["moe"])
    else:
        _decoder(state, "decoder", 2, vocab, case["moe"])
    _linear(state, "ctc.ctc_lo", vocab, D)
    return state


def wenet_yaml(case: dict) -> dict:
    """The train.yaml WeNet's train.py wrote for the recorded model of the same FFNs, set to ``case``."""
    conf = yaml.safe_load((WRITTEN / ("u2pp_moe" if case["moe"] else "u2pp_dense") / "train.yaml").read_text())
    conf["encoder_conf"].update(input_layer=case["input_layer"], cnn_module_norm=case["norm"],
                                cnn_module_kernel=case["kernel"], causal=case["causal"])
    if case["decoder"] == "transformer":
        conf["decoder"] = "transformer"
        del conf["decoder_conf"]["r_num_blocks"]
        conf["model_conf"]["reverse_weight"] = 0.0
    sos = 2 if case["sos"] == "2" else VOCAB - 1
    conf["tokenizer_conf"]["special_tokens"].update({"<sos>": sos, "<eos>": sos})
    conf["output_dim"] = conf["vocab_size"] = VOCAB
    return conf


def write_cmvn(path: Path, mean: torch.Tensor, istd: torch.Tensor) -> None:
    """WeNet's JSON global_cmvn (sums over frames) of these statistics."""
    frames = 1000
    var = istd.double().pow(-2)
    stats = {"mean_stat": (mean.double() * frames).tolist(),
             "var_stat": ((var + mean.double() ** 2) * frames).tolist(), "frame_num": frames}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats))


def write_units(path: Path, sos: str) -> None:
    """WeNet's units.txt: <blank> 0, <unk> 1, <sos/eos> at 2 or last."""
    units = ["<blank>", "<unk>", *TOKENS]
    units.insert(2 if sos == "2" else len(units), "<sos/eos>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{u} {i}\n" for i, u in enumerate(units)))


DEFAULT_CASE = {"moe": True, "input_layer": "conv2d", "norm": "layer_norm", "kernel": 8, "causal": True,
                "decoder": "bitransformer", "sos": "2"}
# The models of wenet_written/, as overrides of DEFAULT_CASE.
RECORDED = {"u2pp_moe": {},
            "u2pp_dense": {"moe": False, "sos": "last", "input_layer": "conv2d6", "norm": "batch_norm", "kernel": 5}}


@pytest.fixture
def wenet_files(tmp_path, monkeypatch):
    """``make(**overrides) -> (final.pt, train.yaml, state, yaml dict)`` of ``DEFAULT_CASE`` (a U2++ MoE model).

    A recipe tree as WeNet's training leaves it; the working directory is its
    root, as for WeNet's recipes (train.yaml's relative paths start there).
    """
    def make(**overrides):
        case = {**DEFAULT_CASE, **overrides}
        root = tmp_path / "recipe"
        conf = wenet_yaml(case)
        exp = root / conf["model_dir"]
        exp.mkdir(parents=True, exist_ok=True)
        write_units(root / conf["tokenizer_conf"]["symbol_table_path"], case["sos"])
        state = wenet_state(case, VOCAB)
        write_cmvn(root / conf["cmvn_conf"]["cmvn_file"], state[CMVN[0]], state[CMVN[1]])
        torch.save(state, exp / "final.pt")
        monkeypatch.chdir(root)
        return exp / "final.pt", rewrite(exp / "train.yaml", conf), state, conf
    return make


def rewrite(path: Path, conf: dict) -> Path:
    """Write ``conf`` as WeNet's train.py writes train.yaml (``yaml.dump``)."""
    path.write_text(yaml.dump(conf))
    return path


# ---------------------------------------------------------------- WeNet's equations

def linear(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def layer_norm(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (D,), p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)


def ffn(p: dict, name: str, x: torch.Tensor, act, moe: bool) -> torch.Tensor:
    """w_2(act(w_1 x)); MoE: top-k of the gate logits, softmax over those k, weighted sum of k experts."""
    def expert(n: str) -> torch.Tensor:
        return linear(p, f"{n}.w_2", act(linear(p, f"{n}.w_1", x)))

    if not moe:
        return expert(name)
    top, idx = (x @ p[f"{name}.gate.weight"].t()).topk(TOP_K, dim=-1)
    weights = torch.softmax(top.float(), dim=-1)
    every = torch.stack([expert(f"{name}.experts.{e}") for e in range(EXPERTS)], dim=-2)  # [..., E, D]
    chosen = every.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, D))
    return (weights.unsqueeze(-1) * chosen).sum(-2)


def heads(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], -1, HEADS, D // HEADS).transpose(1, 2)


def attend(p: dict, name: str, q, v, scores, mask) -> torch.Tensor:
    """masked_fill(-inf) -> softmax -> masked_fill(0) -> weighted values -> linear_out."""
    mask = mask.unsqueeze(1)
    attn = torch.softmax(scores.masked_fill(~mask, -float("inf")), -1).masked_fill(~mask, 0.0)
    out = (attn @ v).transpose(1, 2).reshape(q.shape[0], -1, D)
    return linear(p, f"{name}.linear_out", out)


def mha(p: dict, name: str, query, key, mask) -> torch.Tensor:
    q, k, v = (heads(linear(p, f"{name}.linear_{n}", x)) for n, x in (("q", query), ("k", key), ("v", key)))
    return attend(p, name, q, v, q @ k.transpose(-2, -1) / math.sqrt(D // HEADS), mask)


def rel_mha(p: dict, name: str, x, pos_emb, mask) -> torch.Tensor:
    """matrix_ac = (q + u) k^T, matrix_bd = (q + v) p^T with p the encodings of the keys' positions."""
    q, k, v = (heads(linear(p, f"{name}.linear_{n}", x)) for n in ("q", "k", "v"))
    pos = heads(linear(p, f"{name}.linear_pos", pos_emb))
    ac = (q + p[f"{name}.pos_bias_u"].unsqueeze(1)) @ k.transpose(-2, -1)
    bd = (q + p[f"{name}.pos_bias_v"].unsqueeze(1)) @ pos.transpose(-2, -1)
    return attend(p, name, q, v, (ac + bd) / math.sqrt(D // HEADS), mask)


def conv_module(p: dict, name: str, x, mask_pad, case: dict, act) -> torch.Tensor:
    """Causal: zero-pad the (masked) input by kernel - 1 on the left, then pointwise_conv1 + GLU."""
    kernel = case["kernel"]
    x = x.transpose(1, 2).masked_fill(~mask_pad, 0.0)
    if case["causal"]:
        x = F.pad(x, (kernel - 1, 0))
    x = F.glu(F.conv1d(x, p[f"{name}.pointwise_conv1.weight"], p[f"{name}.pointwise_conv1.bias"]), dim=1)
    x = F.conv1d(x, p[f"{name}.depthwise_conv.weight"], p[f"{name}.depthwise_conv.bias"],
                 padding=0 if case["causal"] else (kernel - 1) // 2, groups=D)
    if case["norm"] == "batch_norm":
        x = F.batch_norm(x, p[f"{name}.norm.running_mean"], p[f"{name}.norm.running_var"],
                         p[f"{name}.norm.weight"], p[f"{name}.norm.bias"], training=False, eps=1e-5)
    else:
        x = layer_norm(p, f"{name}.norm", x.transpose(1, 2)).transpose(1, 2)
    x = F.conv1d(act(x), p[f"{name}.pointwise_conv2.weight"], p[f"{name}.pointwise_conv2.bias"])
    return x.masked_fill(~mask_pad, 0.0).transpose(1, 2)


def conformer_block(p: dict, name: str, x, att_mask, pos_emb, mask_pad, case: dict) -> torch.Tensor:
    act, moe = ACT["swish"], case["moe"]
    x = x + 0.5 * ffn(p, f"{name}.feed_forward_macaron", layer_norm(p, f"{name}.norm_ff_macaron", x), act, moe)
    x = x + rel_mha(p, f"{name}.self_attn", layer_norm(p, f"{name}.norm_mha", x), pos_emb, att_mask)
    x = x + conv_module(p, f"{name}.conv_module", layer_norm(p, f"{name}.norm_conv", x), mask_pad, case, act)
    x = x + 0.5 * ffn(p, f"{name}.feed_forward", layer_norm(p, f"{name}.norm_ff", x), act, moe)
    return layer_norm(p, f"{name}.norm_final", x)


def encoder(p: dict, feats, lens, chunk: int, case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """CMVN, Conv2d subsampling, x * sqrt(d), the saved table's encodings, chunk mask, blocks, after_norm."""
    x = ((feats - p["encoder.global_cmvn.mean"]) * p["encoder.global_cmvn.istd"]).unsqueeze(1)
    mask = (torch.arange(feats.shape[1]) < lens.unsqueeze(1)).unsqueeze(1)
    layers, out_name = SUBSAMPLING[case["input_layer"]]
    for i, (k, s) in enumerate(layers):
        x = F.relu(F.conv2d(x, p[f"encoder.embed.conv.{2 * i}.weight"], p[f"encoder.embed.conv.{2 * i}.bias"],
                            stride=s))
        mask = mask[:, :, k - 1::s]
    b, c, t, f = x.shape
    x = linear(p, f"encoder.embed.{out_name}", x.transpose(1, 2).reshape(b, t, c * f)) * math.sqrt(D)
    pos_emb = p["encoder.embed.pos_enc.pe"][:, :t]
    idx = torch.arange(t)
    att_mask = mask & (idx.unsqueeze(0) < ((idx // chunk + 1) * chunk).unsqueeze(1)) if chunk > 0 else mask
    for i in range(2):
        x = conformer_block(p, f"encoder.encoders.{i}", x, att_mask, pos_emb, mask, case)
    return layer_norm(p, "encoder.after_norm", x), mask


def decoder(p: dict, name: str, blocks: int, memory, memory_mask, ys_in, ys_lens, moe: bool) -> torch.Tensor:
    """Embedding * sqrt(d) + the saved table; per layer self-attention, source attention, FFN (pre-norm); output."""
    u = ys_in.shape[1]
    x = p[f"{name}.embed.0.weight"][ys_in] * math.sqrt(D) + p[f"{name}.embed.1.pe"][0, :u]
    tgt_mask = (torch.arange(u) < ys_lens.unsqueeze(1)).unsqueeze(1) & torch.ones(u, u, dtype=torch.bool).tril()
    for j in range(blocks):
        layer = f"{name}.decoders.{j}"
        y = layer_norm(p, f"{layer}.norm1", x)
        x = x + mha(p, f"{layer}.self_attn", y, y, tgt_mask)
        x = x + mha(p, f"{layer}.src_attn", layer_norm(p, f"{layer}.norm2", x), memory, memory_mask)
        x = x + ffn(p, f"{layer}.feed_forward", layer_norm(p, f"{layer}.norm3", x), ACT["relu"], moe)
    return linear(p, f"{name}.output_layer", layer_norm(p, f"{name}.after_norm", x))


# ---------------------------------------------------------------- the proofs

CASES = {
    "moe-sos2-conv2d-layernorm-kernel8": RECORDED["u2pp_moe"],
    "dense-soslast-conv2d6-batchnorm": RECORDED["u2pp_dense"],
    "moe-noncausal-conv2d8-l2r-only": {"causal": False, "kernel": 5, "input_layer": "conv2d8",
                                      "decoder": "transformer"},
}


def assert_computes_wenet(model, p: dict, case: dict, sos: int) -> None:
    """``model`` (eval) gives the encoder, CTC and decoder outputs of WeNet's equations over the weights ``p``."""
    torch.manual_seed(1)
    # A padded batch where causal convolution keeps WeNet padding-independent; equal lengths otherwise.
    lens = torch.tensor([150, 111] if case["causal"] else [150, 150])
    feats = torch.randn(2, 150, IDIM)
    ys_in = torch.tensor([[sos, 3, 4, 5, 6], [sos, 7, 3, 3, 3]])
    ys_lens = torch.tensor([5, 2])
    with torch.no_grad():
        for chunk in (-1, 4):
            ref, ref_mask = encoder(p, feats, lens, chunk, case)
            out, mask = model.encoder(feats, lens, chunk, -1)
            assert torch.equal(mask, ref_mask)
            valid = mask.squeeze(1)
            torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.ctc.log_softmax(out)[valid],
                                       F.log_softmax(linear(p, "ctc.ctc_lo", ref), -1)[valid], rtol=1e-5, atol=1e-5)
        if case["causal"]:  # streaming (caches, offsets) gives WeNet's chunk-masked forward too
            stream, _ = model.encoder.forward_chunk_by_chunk(feats, lens, 4)
            torch.testing.assert_close(stream[valid], ref[valid], rtol=1e-5, atol=1e-5)
        bi = case["decoder"] == "bitransformer"
        for ours, name, blocks in [(model.decoder.left_decoder, "decoder.left_decoder" if bi else "decoder", 2),
                                   *([(model.decoder.right_decoder, "decoder.right_decoder", 1)] if bi else [])]:
            expect = decoder(p, name, blocks, ref, ref_mask, ys_in, ys_lens, case["moe"])
            got = ours(ref, ref_mask, ys_in, ys_lens)
            for b, n in enumerate(ys_lens.tolist()):
                torch.testing.assert_close(got[b, :n], expect[b, :n], rtol=1e-5, atol=1e-5)
    assert (model.decoder.right_decoder is not None) == bi


@pytest.mark.parametrize("tag", RECORDED)
def test_fixture_is_what_wenets_training_writes(wenet_files, tag):
    """The fixture's files are laid out as WeNet's train.py wrote them (wenet_written/README.md)."""
    ckpt, train_yaml, _, _ = wenet_files(**RECORDED[tag])
    assert train_yaml.read_text() == (WRITTEN / tag / "train.yaml").read_text()
    ours, wenets = describe(ckpt), json.loads((WRITTEN / tag / "final.pt.json").read_text())
    assert ours["tensors"] == wenets["tensors"]
    assert ours["pe_rows"].keys() == wenets["pe_rows"].keys()
    for name, rows in wenets["pe_rows"].items():
        for row, values in rows.items():
            got = torch.tensor(ours["pe_rows"][name][row])
            torch.testing.assert_close(got, torch.tensor(values), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_imported_model_computes_wenets_equations(wenet_files, case):
    ckpt, train_yaml, p, _ = wenet_files(**case)
    case = {**DEFAULT_CASE, **case}
    state, cfg, tokenizer = import_wenet(ckpt, train_yaml)
    assert cfg.model.encoder.rel_pos_shift is False
    assert cfg.model.encoder.causal_pad == ("input" if case["causal"] else "glu_output")
    assert cfg.model.moe.num_experts == (EXPERTS if case["moe"] else 1)
    assert not any(key.endswith(".pe") for key in state)
    biases = [v for k, v in state.items() if k.endswith(".router.choice_bias")]  # WeNet's gate has none: zero
    assert len(biases) == (len([k for k in state if k.endswith(".router.gate.weight")]) if case["moe"] else 0)
    assert all(b.shape == (EXPERTS,) and not b.any() for b in biases)
    model = build_model(cfg.model, load_cmvn=False)
    model.load_state_dict(state)
    assert_computes_wenet(model.eval(), p, case, tokenizer.sos_eos_id)


@pytest.mark.parametrize("with_units", [False, True], ids=["units-of-the-yaml", "units-option"])
@pytest.mark.parametrize("tag", RECORDED)
def test_cli_imports_the_files_wenet_writes(wenet_files, tmp_path, monkeypatch, tag, with_units):
    """From the recipe root the yaml's relative symbol table is found; from elsewhere --units names it."""
    ckpt, train_yaml, p, _ = wenet_files(**RECORDED[tag])
    args = ["convert", "from-wenet", str(ckpt), "--train-yaml", str(train_yaml), "-o", str(tmp_path / "model.pt")]
    if with_units:
        units = Path("data/dict/lang_char.txt").resolve()
        monkeypatch.chdir(tmp_path)
        args += ["--units", str(units)]
    assert main(args) == 0
    loaded = load_model(tmp_path / "model.pt")
    assert loaded.tokenizer.symbol_table["<sos/eos>"] == loaded.model.sos
    assert_computes_wenet(loaded.model, p, {**DEFAULT_CASE, **RECORDED[tag]}, loaded.model.sos)


def test_cli_without_the_symbol_table_names_the_key(wenet_files, tmp_path, monkeypatch, capsys):
    ckpt, train_yaml, _, _ = wenet_files()
    monkeypatch.chdir(tmp_path)  # train.yaml's data/dict/lang_char.txt is relative to the recipe root
    assert main(["convert", "from-wenet", str(ckpt), "--train-yaml", str(train_yaml), "-o", "model.pt"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert (f"{train_yaml}: tokenizer_conf.symbol_table_path: 'data/dict/lang_char.txt' is found neither "
            "from the working directory nor beside train.yaml: pass the units.txt file (--units)") in err


def test_relative_paths_are_found_beside_the_yaml(wenet_files, tmp_path, monkeypatch):
    """A model folder (train.yaml, final.pt, units.txt, global_cmvn side by side) imports from anywhere."""
    ckpt, train_yaml, state, conf = wenet_files()
    folder = train_yaml.parent
    Path(conf["tokenizer_conf"]["symbol_table_path"]).rename(folder / "units.txt")
    Path(conf["cmvn_conf"]["cmvn_file"]).rename(folder / "global_cmvn")
    conf["tokenizer_conf"]["symbol_table_path"], conf["cmvn_conf"]["cmvn_file"] = "units.txt", "global_cmvn"
    mean, istd = state.pop(CMVN[0]), state.pop(CMVN[1])  # so the statistics come from the file
    torch.save(state, ckpt)
    monkeypatch.chdir(tmp_path)
    imported, cfg, tokenizer = import_wenet(ckpt, rewrite(train_yaml, conf))
    assert cfg.model.cmvn == str(folder / "global_cmvn")
    assert cfg.data.tokenizer.symbol_table == str(folder / "units.txt")
    assert tokenizer.encode("gab") == [9, 3, 4]
    torch.testing.assert_close(imported[CMVN[0]], mean)
    torch.testing.assert_close(imported[CMVN[1]], istd)


def test_older_checkpoints_without_position_tables_import_the_same(wenet_files):
    ckpt, train_yaml, state, _ = wenet_files()
    with_tables, _, _ = import_wenet(ckpt, train_yaml)
    torch.save({k: v for k, v in state.items() if not k.endswith(".pe")}, ckpt)
    without, _, _ = import_wenet(ckpt, train_yaml)
    assert with_tables.keys() == without.keys()
    assert all(torch.equal(with_tables[k], without[k]) for k in with_tables)


def test_position_table_computed_elsewhere_is_accepted(wenet_files):
    """The formula in float64, then rounded: up to 7e-5 from WeNet's float32 table, within the tolerance."""
    ckpt, train_yaml, state, _ = wenet_files()
    pos = torch.arange(MAX_LEN, dtype=torch.float64).unsqueeze(1)
    angle = pos / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    table = torch.zeros(1, MAX_LEN, D, dtype=torch.float64)
    table[0, :, 0::2], table[0, :, 1::2] = angle.sin(), angle.cos()
    assert (table.float() - state["encoder.embed.pos_enc.pe"]).abs().max() > 1e-5
    state["encoder.embed.pos_enc.pe"] = table.float()
    torch.save(state, ckpt)
    import_wenet(ckpt, train_yaml)


def _shifted(pe: torch.Tensor) -> torch.Tensor:
    return pe.roll(1, dims=1)


def _one_row_off(pe: torch.Tensor) -> torch.Tensor:
    pe = pe.clone()
    pe[0, 4321, 3] += 0.01
    return pe


BAD_TABLES = {
    "shifted": ("decoder.right_decoder.embed.1.pe", _shifted,
                r"decoder\.right_decoder\.embed\.1\.pe is not WeNet's sinusoid table: position 0 differs by"),
    "one-value-off": ("encoder.embed.pos_enc.pe", _one_row_off,
                      r"encoder\.embed\.pos_enc\.pe is not WeNet's sinusoid table: position 4321 differs by 0\.01"),
    "other-width": ("decoder.left_decoder.embed.1.pe", lambda pe: torch.zeros(1, MAX_LEN, 2 * D),
                    r"decoder\.left_decoder\.embed\.1\.pe has shape \(1, 5000, 32\) \(torch\.float32\), a position "
                    r"table of the model of train\.yaml is \(1, max_len, 16\) floating point"),
    "two-dims": ("encoder.embed.pos_enc.pe", lambda pe: pe[0], r"pos_enc\.pe has shape \(5000, 16\)"),
}


@pytest.mark.parametrize("key,change,match", BAD_TABLES.values(), ids=BAD_TABLES.keys())
def test_position_table_not_wenets_is_named(wenet_files, key, change, match):
    ckpt, train_yaml, state, _ = wenet_files()
    state[key] = change(state[key])
    _raises(ckpt, train_yaml, state, match)


def test_position_table_of_an_absent_decoder_is_unmapped(wenet_files):
    ckpt, train_yaml, state, _ = wenet_files(decoder="transformer")
    state["decoder.right_decoder.embed.1.pe"] = wenet_pe()
    _raises(ckpt, train_yaml, state, r"decoder\.right_decoder\.embed\.1\.pe \(1, 5000, 16\) is not part of the model")


def test_same_weights_with_our_relative_positions_still_a_model(wenet_files):
    """Turning the shift back on (ours) keeps the state dict loadable and streaming exact; it is another function."""
    ckpt, train_yaml, p, _ = wenet_files()
    state, cfg, _ = import_wenet(ckpt, train_yaml)
    ours = replace(cfg.model, encoder=replace(cfg.model.encoder, rel_pos_shift=True))
    model = build_model(ours, load_cmvn=False)
    model.load_state_dict(state)
    model.eval()
    feats, lens = torch.randn(2, 120, IDIM), torch.tensor([120, 90])
    with torch.no_grad():
        full, mask = model.encoder(feats, lens, 4, -1)
        stream, _ = model.encoder.forward_chunk_by_chunk(feats, lens, 4)
        wenet, _ = encoder(p, feats, lens, 4, DEFAULT_CASE)
    valid = mask.squeeze(1)
    torch.testing.assert_close(stream[valid], full[valid], rtol=1e-5, atol=1e-5)
    assert (full[valid] - wenet[valid]).abs().max() > 1e-3


def test_sos_eos_at_two_carries_through(wenet_files):
    ckpt, train_yaml, _, _ = wenet_files(sos="2")
    state, cfg, tokenizer = import_wenet(ckpt, train_yaml)
    model = build_model(cfg.model, load_cmvn=False)
    assert cfg.model.sos_eos_id == 2
    assert model.sos == model.eos == tokenizer.sos_eos_id == tokenizer.symbol_table["<sos/eos>"] == 2
    assert tokenizer.vocab_size == cfg.model.vocab_size
    assert tokenizer.decode([0, 2, *tokenizer.encode("gab"), 2]) == "gab"


def test_sos_eos_last_by_default(wenet_files):
    ckpt, train_yaml, _, conf = wenet_files(sos="last")
    del conf["tokenizer_conf"]["special_tokens"]
    _, cfg, tokenizer = import_wenet(ckpt, rewrite(train_yaml, conf))
    assert cfg.model.sos_eos_id == "last"
    assert build_model(cfg.model, load_cmvn=False).sos == tokenizer.sos_eos_id == cfg.model.vocab_size - 1


def test_units_and_special_tokens_must_agree(wenet_files):
    ckpt, train_yaml, _, conf = wenet_files(sos="2")
    conf["tokenizer_conf"]["special_tokens"] = {"<blank>": 0, "<unk>": 1, "<sos>": 9, "<eos>": 9}
    with pytest.raises(ValueError, match="<sos/eos>=9"):
        import_wenet(ckpt, rewrite(train_yaml, conf))


UNSUPPORTED = [
    ("encoder_conf", "selfattention_layer_type", "selfattn"),
    (None, "encoder", "transformer"),
    ("encoder_conf", "pos_enc_layer_type", "abs_pos"),
    ("encoder_conf", "activation_type", "selu"),
    ("encoder_conf", "cnn_module_norm", "rms_norm"),
    ("encoder_conf", "normalize_before", False),
    ("encoder_conf", "mlp_type", "gated"),
    ("encoder_conf", "conv_bias", False),
    ("encoder_conf", "a_new_wenet_option", 3),
    ("decoder_conf", "r_num_blocks", 0),
    ("decoder_conf", "mlp_type", "position_wise_feed_forward"),
    ("decoder_conf", "src_attention", False),
    ("model_conf", "ignore_id", 0),
    ("tokenizer_conf", "split_with_space", True),
    ("ctc_conf", "ctc_blank_id", 3),
    (None, "model", "transducer"),
    (None, "cmvn", "utterance_cmvn"),
]


@pytest.mark.parametrize("section,key,value", UNSUPPORTED, ids=[f"{s}.{k}" if s else k for s, k, _ in UNSUPPORTED])
def test_unsupported_option_is_one_line_naming_key_and_value(wenet_files, section, key, value):
    ckpt, train_yaml, _, conf = wenet_files()
    (conf[section] if section else conf)[key] = value
    with pytest.raises(ConfigError) as err:
        import_wenet(ckpt, rewrite(train_yaml, conf))
    message = str(err.value)
    assert f"{section + '.' if section else ''}{key}: {value!r}" in message
    assert "\n" not in message


def _raises(ckpt: Path, train_yaml: Path, state: dict, match: str) -> str:
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=match) as err:
        import_wenet(ckpt, train_yaml)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_missing_expert_key_is_named(wenet_files):
    ckpt, train_yaml, state, _ = wenet_files()
    del state["encoder.encoders.1.feed_forward.experts.3.w_1.weight"]
    _raises(ckpt, train_yaml, state, r"encoder\.encoders\.1\.feed_forward\.experts\.3\.w_1\.weight is missing")


def test_unmapped_key_is_named(wenet_files):
    ckpt, train_yaml, state, _ = wenet_files()
    state["encoder.encoders.0.extra_scale"] = torch.ones(3)
    _raises(ckpt, train_yaml, state, r"encoder\.encoders\.0\.extra_scale \(3,\) is not part of the model")


def test_shape_mismatch_names_key_and_shapes(wenet_files):
    ckpt, train_yaml, state, _ = wenet_files()
    state["decoder.left_decoder.decoders.0.feed_forward.experts.1.w_2.weight"] = torch.zeros(D, FF + 1)
    _raises(ckpt, train_yaml, state, r"decoders\.0\.feed_forward\.experts\.1\.w_2\.weight has shape "
                                     r"\(16, 25\), the model of train\.yaml needs \(16, 24\)")


def test_cmvn_from_the_json_file_when_the_checkpoint_has_none(wenet_files, tmp_path):
    ckpt, train_yaml, state, conf = wenet_files()
    mean, istd = state.pop(CMVN[0]), state.pop(CMVN[1])
    torch.save(state, ckpt)
    imported, cfg, _ = import_wenet(ckpt, train_yaml)  # the yaml's data/train/global_cmvn
    assert cfg.model.cmvn == conf["cmvn_conf"]["cmvn_file"]
    torch.testing.assert_close(imported[CMVN[0]], mean)
    torch.testing.assert_close(imported[CMVN[1]], istd)
    write_cmvn(tmp_path / "other_cmvn", mean + 1, istd)
    imported, cfg, _ = import_wenet(ckpt, train_yaml, cmvn=tmp_path / "other_cmvn")  # --cmvn wins
    assert cfg.model.cmvn == str(tmp_path / "other_cmvn")
    torch.testing.assert_close(imported[CMVN[0]], mean + 1)
    Path(conf["cmvn_conf"]["cmvn_file"]).unlink()
    with pytest.raises(ValueError, match="global_cmvn: not a CMVN stats file"):
        import_wenet(ckpt, train_yaml)


def test_imported_config_keeps_wenet_features_and_tokenizer(wenet_files):
    ckpt, train_yaml, _, _ = wenet_files()
    _, cfg, tokenizer = import_wenet(ckpt, train_yaml)
    features = cfg.data.features
    assert (features.num_mel_bins, features.frame_length_ms, features.frame_shift_ms) == (IDIM, 25.0, 10.0)
    assert features.speed_perturb == [0.9, 1.0, 1.1]
    assert (cfg.model.ctc_weight, cfg.model.reverse_weight, cfg.model.lsm_weight) == (0.3, 0.3, 0.1)
    assert cfg.model.encoder.cnn_module_kernel == 8 and cfg.model.encoder.use_dynamic_chunk
    assert cfg.data.tokenizer.type == "char" and tokenizer.encode("abc") == [3, 4, 5]
