"""Model section of the experiment config: encoder, decoders, MoE, loss weights.

Defaults follow WeNet's U2++ Conformer recipes (macaron Conformer with causal
convolution, bidirectional decoders, CTC weight 0.3, reverse weight 0.3, label
smoothing 0.1) and the U2++ MoE paper's MoE layer (8 experts, top-2, no aux loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from moe_asr.moe.config import MoEConfig
from moe_asr.schema import check

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
    cnn_module_kernel: int = 15
    cnn_module_norm: Literal["batch_norm", "layer_norm"] = "layer_norm"
    causal: bool = True
    activation: Activation = "swish"
    # Dynamic chunk training (U2): per batch a random chunk size, so one model
    # decodes both streaming and full context.
    use_dynamic_chunk: bool = True
    use_dynamic_left_chunk: bool = False
    # >0: train with this fixed chunk size instead (ignored with dynamic chunk).
    static_chunk_size: int = 0

    def __post_init__(self) -> None:
        check(self.output_size % self.attention_heads == 0, "output_size",
              f"{self.output_size} is not divisible by attention_heads={self.attention_heads}")
        check(self.num_blocks >= 1, "num_blocks", "must be >= 1")
        check(self.cnn_module_kernel % 2 == 1, "cnn_module_kernel", "must be odd")
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


@dataclass
class ModelConfig:
    vocab_size: int
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

    def __post_init__(self) -> None:
        check(self.vocab_size >= 3, "vocab_size", "needs at least <blank>, one token and <sos/eos>")
        check(0.0 <= self.ctc_weight <= 1.0, "ctc_weight", "must be in [0, 1]")
        check(0.0 <= self.reverse_weight <= 1.0, "reverse_weight", "must be in [0, 1]")
        check(self.decoder.r_num_blocks > 0 or self.reverse_weight == 0.0, "reverse_weight",
              "must be 0 when decoder.r_num_blocks is 0")
        check(0.0 <= self.lsm_weight < 1.0, "lsm_weight", "must be in [0, 1)")
