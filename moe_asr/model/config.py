"""Model section of the experiment config: encoder, decoders, MoE, loss weights.

Defaults follow WeNet's U2++ Conformer recipes (macaron Conformer with causal
convolution, bidirectional decoders, CTC weight 0.3, reverse weight 0.3, label
smoothing 0.1) and the U2++ MoE paper's MoE layer (8 experts, top-2, no aux loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from moe_asr.moe.config import MoEConfig
from moe_asr.schema import check, flatten, to_dict
from moe_asr.symbols import LAST, SosEos, sos_eos_id

Activation = Literal["swish", "relu", "gelu"]


@dataclass
class EncoderConfig:
    output_size: int = 256
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 12
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    input_layer: Literal["conv2d", "conv2d6", "conv2d8"] = "conv2d"
    macaron_style: bool = True
    use_cnn_module: bool = True
    # Odd, or any size >= 1 with causal convolution (WeNet's U2++ recipes use 8).
    cnn_module_kernel: int = 15
    cnn_module_norm: Literal["batch_norm", "layer_norm"] = "layer_norm"
    causal: bool = True
    # Where causal convolution gets its kernel - 1 frames of left context (zeros at
    # the start, the cache when streaming): `glu_output` pads the GLU output, so
    # the depthwise conv sees exact zeros; `input` pads the module's input before
    # pointwise_conv1 and the GLU (WeNet's, so its first frames see glu(bias)),
    # for models imported from WeNet. Needs causal: true.
    causal_pad: Literal["glu_output", "input"] = "glu_output"
    # Relative-position attention: true scores the distance i - j (Transformer-XL
    # shift); false scores the absolute key position, as WeNet's attention does
    # (it drops the shift), for models imported from WeNet.
    rel_pos_shift: bool = True
    activation: Activation = "swish"
    # Dynamic chunk training (U2): per batch a random chunk size, so one model
    # decodes both streaming and full context.
    use_dynamic_chunk: bool = True
    use_dynamic_left_chunk: bool = False
    # Largest chunk (encoder frames) of the dynamic draw `c % max_dynamic_chunk + 1`.
    # WeNet fixes 25 (1 s at 4x subsampling) for every rate; 1 s at 6x/8x is 16/12.
    max_dynamic_chunk: int = 25
    # >0: train with this fixed chunk size instead (ignored with dynamic chunk).
    static_chunk_size: int = 0

    def __post_init__(self) -> None:
        check(self.output_size % self.attention_heads == 0, "output_size",
              f"{self.output_size} is not divisible by attention_heads={self.attention_heads}")
        check(self.num_blocks >= 1, "num_blocks", "must be >= 1")
        check(self.cnn_module_kernel >= 1 and (self.causal or self.cnn_module_kernel % 2 == 1),
              "cnn_module_kernel", f"must be odd without causal convolution, got {self.cnn_module_kernel}")
        check(self.causal or self.causal_pad == "glu_output", "causal_pad",
              "input padding is for causal convolution (causal: true)")
        check(self.max_dynamic_chunk >= 1, "max_dynamic_chunk", "must be >= 1")
        check(self.static_chunk_size >= 0, "static_chunk_size", "must be >= 0")


@dataclass
class DecoderConfig:
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 3
    # Right-to-left decoder depth (U2++); 0 disables it (then reverse_weight must be 0).
    r_num_blocks: int = 3
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    self_attention_dropout_rate: float = 0.0
    src_attention_dropout_rate: float = 0.0
    activation: Activation = "relu"

    def __post_init__(self) -> None:
        check(self.num_blocks >= 1, "num_blocks", "must be >= 1")
        check(self.r_num_blocks >= 0, "r_num_blocks", "must be >= 0")


# `model.vocab_size: auto` takes the size from the symbol table (data.tokenizer.symbol_table).
AUTO = "auto"


@dataclass
class ModelConfig:
    # An integer, or `auto`: the line count of data.tokenizer.symbol_table, read when the
    # experiment config is loaded (the model cannot be built before it is known).
    vocab_size: Union[int, Literal["auto"]]
    input_dim: int = 80
    # JSON file of global CMVN stats (from `moe-asr compute-cmvn`); loaded into
    # the encoder so the statistics travel with the model.
    cmvn: Optional[str] = None
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    ctc_weight: float = 0.3
    reverse_weight: float = 0.3
    lsm_weight: float = 0.1
    length_normalized_loss: bool = False
    # Id of <sos/eos>: "last" (vocab_size - 1, our tables) or a fixed id, e.g. 2 for
    # WeNet's newer recipes; the symbol table must agree (moe_asr/symbols.py).
    sos_eos_id: SosEos = LAST

    def __post_init__(self) -> None:
        if self.vocab_size != AUTO:
            self._check_vocabulary()
        check(0.0 <= self.ctc_weight <= 1.0, "ctc_weight", "must be in [0, 1]")
        check(0.0 <= self.reverse_weight <= 1.0, "reverse_weight", "must be in [0, 1]")
        check(self.decoder.r_num_blocks > 0 or self.reverse_weight == 0.0, "reverse_weight",
              "must be 0 when decoder.r_num_blocks is 0")
        check(0.0 <= self.lsm_weight < 1.0, "lsm_weight", "must be in [0, 1)")

    def _check_vocabulary(self) -> None:
        check(self.vocab_size >= 3, "vocab_size", "needs at least <blank>, one token and <sos/eos>")
        try:
            sos_eos_id(self.vocab_size, self.sos_eos_id)
        except ValueError as e:
            check(False, "sos_eos_id", str(e))

    def require_vocabulary(self) -> int:
        """The vocabulary size; a model cannot be built while it is still ``auto``."""
        check(self.vocab_size != AUTO, "model.vocab_size",
              "is auto but no symbol table is known: set data.tokenizer.symbol_table (its line count is the "
              "vocabulary) or give model.vocab_size")
        return self.vocab_size


# Not what a model's weights compute, so free to change between runs: how it is computed (how
# it is laid out over ranks is not in the model config at all: the experiment's `parallel:`
# section), and how fast training moves the expert bias (the bias itself is in the weights: a
# run can start balancing a model trained without, or freeze it at 0).
COMPUTE_KEYS = ("moe.impl", "moe.bias_update_rate")


def comparable(cfg: ModelConfig) -> dict[str, Any]:
    """``cfg`` as flat dotted keys, for telling whether two configs describe the same model.

    The CMVN file path counts only as present or absent (its statistics travel
    in the weights, but without it the model has no CMVN buffers), and the
    compute keys are left out.
    """
    flat = flatten(to_dict(cfg))
    flat["cmvn"] = flat["cmvn"] is not None
    for key in COMPUTE_KEYS:
        flat.pop(key)
    return flat


def model_differences(a: ModelConfig, b: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """``key -> (a's value, b's value)`` for every key where the two models differ."""
    x, y = comparable(a), comparable(b)
    return {k: (x.get(k), y.get(k)) for k in sorted(x.keys() | y.keys()) if x.get(k) != y.get(k)}

