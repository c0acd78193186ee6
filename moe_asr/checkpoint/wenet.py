"""Import a WeNet U2++ Conformer checkpoint (dense FFNs or WeNet's MoE FFNs) as one of our models.

``import_wenet(final.pt, train.yaml)`` gives our state dict, the experiment
config that rebuilds the same function, and the tokenizer over WeNet's
``units.txt``. The config takes WeNet's values and, for absent keys, WeNet's
defaults (which differ from ours: e.g. 6 encoder blocks, batch norm, no causal
convolution), and picks the two encoder options that reproduce WeNet's
arithmetic: ``rel_pos_shift: false`` (WeNet's attention scores absolute key
positions) and ``causal_pad: input`` (WeNet pads the convolution module's input).

WeNet saves its sinusoidal position tables (``pe`` buffers ``[1, 5000, d]``)
in every checkpoint; ours are computed, so those are checked against WeNet's
formula and left out. Relative paths in ``train.yaml`` are relative to where
WeNet trained: each is looked up from the working directory, then beside
``train.yaml``.

Nothing is guessed: a WeNet option with a value we do not implement, an unknown
key in a model section, a checkpoint key we do not map, a missing one or a
shape mismatch is a one-line error that names it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import Tensor

from moe_asr.data.tokenizer import Tokenizer, read_symbol_table
from moe_asr.run.config import ExperimentConfig
from moe_asr.model.cmvn import GlobalCMVN
from moe_asr.model.positional import sinusoid
from moe_asr.model.u2pp import build_model
from moe_asr.schema import ConfigError, from_dict
from moe_asr.symbols import BLANK_ID, LAST, UNK_ID, SosEos

CMVN_KEYS = ("encoder.global_cmvn.mean", "encoder.global_cmvn.istd")
DENSE, MOE = "position_wise_feed_forward", "moe"
# WeNet's MoE gate (bias-free Linear, top-k of its logits, softmax over the k) is our registered `topk`
# router (moe_asr.moe.registry), whose Linear is its `gate`: the imported config names it explicitly.
WENET_ROUTER = "topk"
# Its expert bias (loss-free balancing), which WeNet's gate does not have: imported as zero, the same choice.
CHOICE_BIAS = ".router.choice_bias"
# Top-level keys of WeNet models other than the CTC/attention U2++ model.
OTHER_MODELS = ("predictor", "joint_conf", "cif_predictor_conf", "paraformer", "lfmmi_dir")
# WeNet `speed_perturb: true` draws one of these factors per utterance.
WENET_SPEEDS = [0.9, 1.0, 1.1]
# How far a saved position table may stray from the formula: WeNet computes it in float32, where a
# last-bit difference in exp() between machines moves the angle at position 5000 by about 3e-4.
PE_TOLERANCE = 1e-3


class _Section:
    """One section of WeNet's yaml: each key read once, a value we cannot import refused by its key.

    ``done()`` refuses the keys nobody read, so a WeNet option we do not know
    is never silently dropped.
    """

    def __init__(self, name: str, data: Any, source: Path) -> None:
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{source}: {name}: expected a mapping, got {data!r}")
        self.name, self.data, self.source = name, dict(data or {}), source
        self.read: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key(key)}: {message}")

    def get(self, key: str, default: Any) -> Any:
        self.read.add(key)
        return self.data.get(key, default)

    def only(self, key: str, default: Any, *supported: Any) -> Any:
        """The value of ``key``, which must be one of ``supported`` (``default`` when absent)."""
        value = self.get(key, default)
        if value not in supported:
            raise self.error(key, f"{value!r} is not supported (supported: {', '.join(map(repr, supported))})")
        return value

    def ignore(self, *keys: str) -> None:
        """Keys that change training only, not the function the weights compute."""
        self.read.update(keys)

    def sub(self, key: str) -> "_Section":
        return _Section(self.key(key), self.get(key, None), self.source)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise self.error(unknown[0], f"{self.data[unknown[0]]!r}: unknown WeNet option, not imported")


def _plain_options(conf: _Section, *keys: str) -> None:
    """Architecture switches our model has in one position only: WeNet's default or refused."""
    defaults = {"normalize_before": True, "concat_after": False, "layer_norm_type": "layer_norm",
                "norm_eps": 1e-5, "n_kv_head": None, "mlp_bias": True}
    for key in keys:
        value = defaults.get(key, True)  # the *_bias switches
        conf.only(key, value, value)


def _ffn(conf: _Section) -> tuple[str, int, int]:
    """``(mlp_type, n_expert, n_expert_activated)`` of a section's FFNs (experts 1 of 1 when dense)."""
    mlp = conf.only("mlp_type", DENSE, DENSE, MOE)
    n_expert, top_k = conf.get("n_expert", 8), conf.get("n_expert_activated", 2)
    return (mlp, n_expert, top_k) if mlp == MOE else (mlp, 1, 1)


def _encoder(conf: _Section) -> tuple[dict, tuple[str, int, int]]:
    """Our ``model.encoder`` from WeNet's ``encoder_conf`` (WeNet's ConformerEncoder defaults)."""
    d, heads = conf.get("output_size", 256), conf.get("attention_heads", 4)
    causal = conf.get("causal", False)
    encoder = {
        "output_size": d, "attention_heads": heads,
        "linear_units": conf.get("linear_units", 2048), "num_blocks": conf.get("num_blocks", 6),
        "dropout_rate": conf.get("dropout_rate", 0.1),
        "positional_dropout_rate": conf.get("positional_dropout_rate", 0.1),
        "attention_dropout_rate": conf.get("attention_dropout_rate", 0.0),
        "input_layer": conf.only("input_layer", "conv2d", "conv2d", "conv2d6", "conv2d8"),
        "macaron_style": conf.get("macaron_style", True),
        "use_cnn_module": conf.get("use_cnn_module", True),
        "cnn_module_kernel": conf.get("cnn_module_kernel", 15),
        "cnn_module_norm": conf.only("cnn_module_norm", "batch_norm", "batch_norm", "layer_norm"),
        "causal": causal,
        "causal_pad": "input" if causal else "glu_output",
        "rel_pos_shift": False,
        "activation": conf.only("activation_type", "swish", "swish", "relu", "gelu"),
        "use_dynamic_chunk": conf.get("use_dynamic_chunk", False),
        "use_dynamic_left_chunk": conf.get("use_dynamic_left_chunk", False),
        "static_chunk_size": conf.get("static_chunk_size", 0),
    }
    conf.only("pos_enc_layer_type", "rel_pos", "rel_pos")
    conf.only("selfattention_layer_type", "rel_selfattn", "rel_selfattn")
    _plain_options(conf, "normalize_before", "concat_after", "layer_norm_type", "norm_eps", "n_kv_head",
                   "mlp_bias", "query_bias", "key_bias", "value_bias", "conv_bias")
    if isinstance(d, int) and isinstance(heads, int) and heads > 0:
        conf.only("head_dim", None, None, d // heads)
    conf.ignore("gradient_checkpointing", "use_sdpa", "positionwise_conv_kernel_size")
    ffn = _ffn(conf)
    conf.done()
    return encoder, ffn


def _decoder(conf: _Section, kind: str, ffn: tuple[str, int, int]) -> dict:
    """Our ``model.decoder`` from WeNet's ``decoder_conf`` (its TransformerDecoder defaults)."""
    decoder = {
        "attention_heads": conf.get("attention_heads", 4), "linear_units": conf.get("linear_units", 2048),
        "num_blocks": conf.get("num_blocks", 6),
        "r_num_blocks": conf.get("r_num_blocks", 0) if kind == "bitransformer" else 0,  # r2l absent: 0
        "dropout_rate": conf.get("dropout_rate", 0.1),
        "positional_dropout_rate": conf.get("positional_dropout_rate", 0.1),
        "self_attention_dropout_rate": conf.get("self_attention_dropout_rate", 0.0),
        "src_attention_dropout_rate": conf.get("src_attention_dropout_rate", 0.0),
        "activation": conf.only("activation_type", "relu", "swish", "relu", "gelu"),
    }
    if kind == "bitransformer" and not decoder["r_num_blocks"]:
        raise conf.error("r_num_blocks", f"{decoder['r_num_blocks']!r}: decoder: bitransformer needs "
                                         "r_num_blocks > 0 (use decoder: transformer for none)")
    conf.only("input_layer", "embed", "embed")
    conf.only("use_output_layer", True, True)
    conf.only("src_attention", True, True)
    _plain_options(conf, "normalize_before", "concat_after", "layer_norm_type", "norm_eps", "n_kv_head",
                   "mlp_bias", "query_bias", "key_bias", "value_bias", "src_query_bias", "src_key_bias",
                   "src_value_bias")
    conf.only("head_dim", None, None)
    # A tied output layer is saved under both names, so the copied weights stay equal.
    conf.ignore("gradient_checkpointing", "use_sdpa", "tie_word_embedding")
    mine = _ffn(conf)
    if mine != ffn:
        raise conf.error("mlp_type", f"{mine[0]!r}: the decoder's FFNs (mlp_type, n_expert, n_expert_activated) "
                                     f"{mine} differ from the encoder's {ffn}: one model.moe builds every FFN")
    conf.done()
    return decoder


def _model_conf(conf: _Section) -> dict:
    """Loss weights from WeNet's ``model_conf`` (its ASRModel defaults)."""
    out = {"ctc_weight": conf.get("ctc_weight", 0.5), "reverse_weight": conf.get("reverse_weight", 0.0),
           "lsm_weight": conf.get("lsm_weight", 0.0),
           "length_normalized_loss": conf.get("length_normalized_loss", False)}
    conf.only("ignore_id", -1, -1)
    conf.done()
    return out


def _features(top: _Section, input_dim: int) -> dict:
    """Our ``data.features`` from ``dataset_conf`` (fbank, resampling, speed perturbation) when present."""
    data = top.sub("dataset_conf")  # training keys aside: no done()
    features: dict[str, Any] = {"num_mel_bins": input_dim}
    data.only("feats_type", "fbank", "fbank")
    if data.data.get("speed_perturb"):
        features["speed_perturb"] = WENET_SPEEDS
    resample = data.sub("resample_conf")
    if "resample_rate" in resample.data:
        features["sample_rate"] = resample.get("resample_rate", None)
    resample.done()
    fbank = data.sub("fbank_conf")
    for wenet_key, ours in (("num_mel_bins", "num_mel_bins"), ("frame_length", "frame_length_ms"),
                            ("frame_shift", "frame_shift_ms"), ("dither", "dither")):
        if wenet_key in fbank.data:
            features[ours] = fbank.get(wenet_key, None)
    fbank.done()
    if features["num_mel_bins"] != input_dim:
        raise fbank.error("num_mel_bins", f"{features['num_mel_bins']} differs from input_dim: {input_dim}")
    return features


def _beside_yaml(named: str, train_yaml: Path) -> Path:
    """``named`` from the working directory, else beside ``train.yaml`` (the path as given if neither exists)."""
    path = Path(named)
    if path.is_absolute() or path.exists() or not (train_yaml.parent / path).exists():
        return path
    return train_yaml.parent / path


@dataclass
class _Cmvn:
    path: Optional[Path]  # the JSON statistics file, if any is named
    is_json: bool


def _cmvn(top: _Section, cmvn: Optional[Path]) -> _Cmvn:
    """Where the CMVN statistics live: ``cmvn_conf`` (newer WeNet) or top-level ``cmvn_file`` (older)."""
    kind = top.only("cmvn", "global_cmvn", "global_cmvn", None)
    conf = top.sub("cmvn_conf")
    named = conf.get("cmvn_file", None) or top.get("cmvn_file", None)
    is_json = conf.get("is_json_cmvn", top.get("is_json_cmvn", True))
    conf.done()
    if cmvn is not None:
        return _Cmvn(cmvn, True)
    return _Cmvn(_beside_yaml(named, top.source) if kind and named else None, bool(is_json))


def _tokenizer(top: _Section, units: Optional[Path], vocab_size: int) -> tuple[dict, Path, SosEos]:
    """Our ``data.tokenizer``, the symbol table's path and the <sos/eos> id, from ``tokenizer_conf``."""
    kind = top.only("tokenizer", "char", "char", "bpe")
    conf = top.sub("tokenizer_conf")
    named = conf.get("symbol_table_path", None)
    table = units if units is not None else _beside_yaml(named, top.source) if named else None
    bpe = conf.get("bpe_path", None)
    conf.only("non_lang_syms_path", None, None)
    conf.only("split_with_space", False, False)
    conf.only("is_multilingual", False, False)
    conf.only("num_languages", 1, 1)
    special = conf.get("special_tokens", None) or {}
    conf.done()
    if table is None:
        raise ConfigError(f"{top.source}: tokenizer_conf.symbol_table_path is not set: "
                          "pass the units.txt file (--units)")
    if units is None and not table.is_file():
        raise conf.error("symbol_table_path", f"{named!r} is found neither from the working directory nor "
                                              f"beside {top.source.name}: pass the units.txt file (--units)")
    last = vocab_size - 1
    sos, eos = special.get("<sos>", last), special.get("<eos>", last)
    if special.get("<blank>", BLANK_ID) != BLANK_ID or special.get("<unk>", UNK_ID) != UNK_ID or sos != eos:
        raise conf.error("special_tokens", f"{special!r} is not supported (needs <blank> {BLANK_ID}, "
                                           f"<unk> {UNK_ID} and one id for <sos> and <eos>)")
    cfg = {"type": kind, "symbol_table": str(table)}
    if kind == "bpe":
        if bpe is None or not Path(bpe).is_file():
            raise conf.error("bpe_path", f"{bpe!r}: the sentencepiece model is not found")
        cfg.update(bpe_model=str(bpe), case="upper")  # WeNet upper-cases text for its bpe models
    return cfg, Path(table), LAST if sos == last else sos


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read WeNet's train.yaml ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a WeNet train.yaml (expected a mapping)")
    return data


def _experiment_config(train_yaml: Path, cmvn: Optional[Path] = None,
                 units: Optional[Path] = None) -> tuple[ExperimentConfig, _Cmvn, Path]:
    """Our experiment config for WeNet's ``train.yaml``, where CMVN comes from, the symbol table."""
    top = _Section("", _read_yaml(train_yaml), train_yaml)  # training keys aside: no done()
    for key in OTHER_MODELS:
        if top.data.get(key):
            raise ConfigError(f"{train_yaml}: {key}: {top.data[key]!r}: only WeNet's CTC/attention model is imported")
    top.only("model", "asr_model", "asr_model")
    top.only("encoder", "conformer", "conformer")
    decoder_kind = top.only("decoder", "bitransformer", "bitransformer", "transformer")
    top.only("ctc", "ctc", "ctc")
    ctc = top.sub("ctc_conf")
    ctc.only("ctc_blank_id", BLANK_ID, BLANK_ID)
    ctc.done()
    for key in ("input_dim", "output_dim"):
        if not isinstance(top.data.get(key), int):
            raise ConfigError(f"{train_yaml}: {key}: {top.data.get(key)!r}: an integer is required")
    input_dim, vocab_size = top.get("input_dim", None), top.get("output_dim", None)
    encoder, ffn = _encoder(top.sub("encoder_conf"))
    decoder = _decoder(top.sub("decoder_conf"), decoder_kind, ffn)
    where = _cmvn(top, cmvn)
    tokenizer, table, sos_eos = _tokenizer(top, units, vocab_size)
    model = {"vocab_size": vocab_size, "input_dim": input_dim, "encoder": encoder, "decoder": decoder,
             "moe": {"num_experts": ffn[1], "top_k": ffn[2], "router": WENET_ROUTER},
             "cmvn": str(where.path) if where.path else None, "sos_eos_id": sos_eos,
             **_model_conf(top.sub("model_conf"))}
    data = {"features": _features(top, input_dim), "tokenizer": tokenizer}
    try:
        config = from_dict(ExperimentConfig, {"model": model, "data": data})
    except ConfigError as e:
        raise ConfigError(f"{train_yaml}: the imported config is not a valid model: {e}") from None
    return config, where, table


def _wenet_name(key: str, config: ExperimentConfig) -> str:
    """WeNet's name of our parameter ``key`` (FFNs aside, see :func:`_sources`)."""
    subsampling = "out.0" if config.model.encoder.input_layer == "conv2d" else "linear"
    key = re.sub(r"^encoder\.embed\.out\.", f"encoder.embed.{subsampling}.", key)
    key = re.sub(r"^(decoder\.\w+_decoder)\.embed\.", r"\1.embed.0.", key)
    if config.model.decoder.r_num_blocks == 0:  # WeNet's single TransformerDecoder sits at `decoder.`
        key = re.sub(r"^decoder\.left_decoder\.", "decoder.", key)
    return key


_EXPERT = re.compile(r"^(?P<ffn>.+)\.experts\.(?P<p>w1|b1|w2|b2)$")
_PARAMS = {"w1": "w_1.weight", "b1": "w_1.bias", "w2": "w_2.weight", "b2": "w_2.bias"}


def _sources(key: str, config: ExperimentConfig) -> tuple[list[str], bool]:
    """The WeNet keys our ``key`` is made of, and whether each is a torch Linear weight to transpose.

    Our experts are stacked ``[E, ...]`` in ``x @ w`` layout; WeNet's are
    ``feed_forward.experts.<e>.w_1`` Linear layers, or, dense, ``feed_forward.w_1``
    (our expert 0 of a one-expert layer).
    """
    m = _EXPERT.match(key)
    if m is None:
        return [_wenet_name(key.replace(".router.gate.", ".gate."), config)], False
    ffn, param = _wenet_name(m["ffn"], config), _PARAMS[m["p"]]
    experts = config.model.moe.num_experts
    names = [f"{ffn}.{param}"] if experts == 1 else [f"{ffn}.experts.{e}.{param}" for e in range(experts)]
    return names, m["p"].startswith("w")


def _position_tables(wenet: dict[str, Tensor], config: ExperimentConfig, source: Path) -> set[str]:
    """WeNet's saved sinusoid tables of this model's encoder and decoders, each checked against the formula.

    They are ``[1, max_len, d]`` persistent buffers of WeNet's positional
    encodings (older WeNet releases do not save them); ours computes them.
    """
    decoders = ["decoder.left_decoder", "decoder.right_decoder"] if config.model.decoder.r_num_blocks else ["decoder"]
    names = [n for n in ("encoder.embed.pos_enc.pe", *(f"{d}.embed.1.pe" for d in decoders)) if n in wenet]
    d = config.model.encoder.output_size
    for n in names:
        table = wenet[n]
        if table.dim() != 3 or table.shape[0] != 1 or table.shape[2] != d or not table.is_floating_point():
            raise ValueError(f"{source}: {n} has shape {tuple(table.shape)} ({table.dtype}), a position table "
                             f"of the model of train.yaml is (1, max_len, {d}) floating point")
        error = (table[0].float() - sinusoid(torch.arange(table.shape[1]), d)).abs().amax(dim=1)
        if error.max() > PE_TOLERANCE:
            row = int((error > PE_TOLERANCE).nonzero()[0])
            raise ValueError(f"{source}: {n} is not WeNet's sinusoid table: position {row} differs by "
                             f"{float(error[row]):.3g}")
    return set(names)


def _read_checkpoint(path: Path) -> dict[str, Tensor]:
    """WeNet's ``final.pt`` (a state dict), read without unpickling code: it may come from anywhere."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        raise ValueError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a WeNet model state dict (a mapping of names to tensors)")
    return state


def _convert_state(wenet: dict[str, Tensor], config: ExperimentConfig, source: Path) -> dict[str, Tensor]:
    """Our state dict (``build_model(config.model)``'s keys and shapes, fp32) from WeNet's tensors."""
    with torch.device("meta"):  # shapes only: no memory for a full-size model
        expected = build_model(config.model, load_cmvn=False).state_dict()
    state, used = {}, set()
    for key, like in expected.items():
        if key.endswith(CHOICE_BIAS):
            state[key] = torch.zeros(like.shape, dtype=like.dtype)
            continue
        names, transpose = _sources(key, config)
        missing = [n for n in names if n not in wenet]
        if missing:
            raise ValueError(f"{source}: {missing[0]} is missing (the model of train.yaml needs it"
                             f"{f'; {len(missing) - 1} more missing' if len(missing) > 1 else ''})")
        stacked = _EXPERT.match(key) is not None
        part = like.shape[1:] if stacked else like.shape
        need = torch.Size(reversed(part)) if transpose else part
        for n in names:
            if wenet[n].shape != need:
                raise ValueError(f"{source}: {n} has shape {tuple(wenet[n].shape)}, the model of train.yaml "
                                 f"needs {tuple(need)}")
        parts = [wenet[n].t() if transpose else wenet[n] for n in names]
        value = torch.stack(parts) if stacked else parts[0]
        state[key] = (value.float() if value.is_floating_point() else value).contiguous()
        used.update(names)
    unmapped = sorted(set(wenet) - used - _position_tables(wenet, config, source))
    if unmapped:
        n = unmapped[0]
        raise ValueError(f"{source}: {n} {tuple(wenet[n].shape)} is not part of the model of train.yaml"
                         f"{f' ({len(unmapped) - 1} more such keys)' if len(unmapped) > 1 else ''}")
    return state


def _with_cmvn(wenet: dict[str, Tensor], where: _Cmvn, input_dim: int, checkpoint: Path,
               train_yaml: Path) -> dict[str, Tensor]:
    """WeNet's tensors with the CMVN statistics: the checkpoint's own, else the JSON file's."""
    if all(k in wenet for k in CMVN_KEYS):
        if where.path is None:
            raise ConfigError(f"{train_yaml}: cmvn_conf.cmvn_file is not set, but {checkpoint} holds "
                              f"{CMVN_KEYS[0]}: pass its JSON statistics file (--cmvn)")
        return wenet
    if where.path is None:
        return wenet
    if not where.is_json:
        raise ConfigError(f"{train_yaml}: cmvn_conf.is_json_cmvn: False: only JSON CMVN files are read, and "
                          f"{checkpoint} holds no {CMVN_KEYS[0]}")
    stats = GlobalCMVN.from_json(where.path, input_dim)
    return {**wenet, CMVN_KEYS[0]: stats.mean, CMVN_KEYS[1]: stats.istd}


def import_wenet(checkpoint: Path, train_yaml: Path, cmvn: Optional[Path] = None,
                 units: Optional[Path] = None) -> tuple[dict[str, Tensor], ExperimentConfig, Tokenizer]:
    """Our state dict, experiment config and tokenizer for a WeNet checkpoint and its ``train.yaml``.

    ``cmvn``: a JSON CMVN file for a checkpoint without ``encoder.global_cmvn``
    (default: the yaml's); ``units``: the symbol table (default: the yaml's).
    """
    checkpoint, train_yaml = Path(checkpoint), Path(train_yaml)
    config, where, table = _experiment_config(train_yaml, None if cmvn is None else Path(cmvn),
                                        None if units is None else Path(units))
    tok_cfg, sos_eos = config.data.tokenizer, config.model.sos_eos_id
    table_ids = read_symbol_table(table, sos_eos)
    if len(table_ids) != config.model.vocab_size:
        raise ConfigError(f"{train_yaml}: output_dim: {config.model.vocab_size}, but {table} has "
                          f"{len(table_ids)} symbols")
    sp_model = Path(tok_cfg.bpe_model).read_bytes() if tok_cfg.bpe_model else None
    tokenizer = Tokenizer(tok_cfg, table_ids, sp_model, sos_eos)
    wenet = _with_cmvn(_read_checkpoint(checkpoint), where, config.model.input_dim, checkpoint, train_yaml)
    return _convert_state(wenet, config, checkpoint), config, tokenizer
