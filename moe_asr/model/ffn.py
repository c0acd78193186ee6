"""Every feed-forward layer of the model comes from here, as an MoE layer."""
from __future__ import annotations

from moe_asr.moe.config import MoEConfig
from moe_asr.moe.layer import MoEFeedForward


def build_ffn(moe: MoEConfig, d_model: int, d_ff: int, activation: str, dropout: float) -> MoEFeedForward:
    """An MoE FFN with all its experts (a dense FFN when ``moe.num_experts == 1``)."""
    return MoEFeedForward(d_model, d_ff, moe, activation, dropout)
