"""Every feed-forward layer of the model comes from here, as an MoE layer."""
from __future__ import annotations

from moe_asr.model.config import MoEConfig
from moe_asr.moe.layer import MoEFeedForward


def build_ffn(moe: MoEConfig, d_model: int, d_ff: int, activation: str, dropout: float,
              ep_rank: int = 0) -> MoEFeedForward:
    """An MoE FFN (a dense FFN when ``moe.num_experts == 1``) holding this rank's experts."""
    return MoEFeedForward(d_model, d_ff, moe.num_experts, moe.top_k, activation, dropout,
                          impl=moe.impl, aux_loss_coef=moe.aux_loss_coef,
                          z_loss_coef=moe.z_loss_coef, ep_size=moe.ep_size, ep_rank=ep_rank)
