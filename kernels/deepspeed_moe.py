"""``deepspeed.moe.layer.MoE`` (dropless) running on weights owned by someone else.

For side-by-side comparison only: the gate weight and the expert FFN are
borrowed from the caller's modules at every call, so DeepSpeed's layer computes
the same function as the other paths on the same parameters. It builds
DeepSpeed's layer with ``ep_size=1`` (no expert parallelism), no token
dropping, no random token selection and no sampled second expert, which makes
its top-2 gate WeNet's (softmax over all logits renormalised over the chosen
two equals a softmax over the two chosen logits).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor, nn


class _BorrowedExpert(nn.Module):
    """One expert of DeepSpeed's expert list that calls the owner's ``ffn(x, e)``; holds no parameters."""

    def __init__(self, ffn: Callable[[Tensor, int], Tensor], e: int) -> None:
        super().__init__()
        self.ffn, self.e = ffn, e

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(x.reshape(-1, x.shape[-1]), self.e).view(*x.shape[:-1], -1)


class DeepSpeedMoE:
    """Callable ``(x [N, d]) -> (y [N, d], l_aux)``; not an ``nn.Module`` on purpose (owns no parameters)."""

    def __init__(self, gate: nn.Linear, ffn: Callable[[Tensor, int], Tensor], num_experts: int,
                 top_k: int) -> None:
        if top_k != 2:
            raise ValueError("only DeepSpeed's top-2 gate computes WeNet's routing weights")
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        from deepspeed.moe.layer import MoE

        d = gate.weight.shape[1]
        self.gate = gate
        self.moe = MoE(d, nn.Identity(), num_experts=num_experts, ep_size=1, k=top_k,
                       capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
                       drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        self.moe.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(
            [_BorrowedExpert(ffn, e) for e in range(num_experts)])

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        wg = self.moe.deepspeed_moe.gate.wg
        wg.weight = self.gate.weight  # borrow: same Parameter, gradients land on the owner
        self.moe.train(self.gate.training)
        y, l_aux, _ = self.moe(x)
        return y, l_aux
