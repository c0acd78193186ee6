"""Routers: which experts see each token, and with what weight.

``Router`` is the contract every router keeps, so the layer, the engine's
expert-load logging, the ONNX export and the benchmarks never depend on one
router's internals:

- ``forward(x [N, d]) -> (Routing, aux_loss)``: ``top_k`` global expert ids per
  token, their weights (float32), and the router's already-weighted auxiliary
  loss (a float32 scalar, 0 when it has none);
- statistics of its last training forward for logging: ``tokens_per_expert``
  ``[E]`` and ``entropy`` (mean entropy of its distribution over experts),
  kept by ``record``;
- what an exporter needs to reproduce it: ``onnx_logits`` (logits whose top-k,
  softmaxed over the k, *is* the routing: the export's top-k softmax
  computes that) and ``onnx_routing`` (the routing in ops that export to standard
  ONNX). A router that has neither says so, and the export names it;
- optionally an expert bias (``has_choice_bias``): a ``choice_bias [E]``
  float32 buffer added to the logits to *choose* the k experts, never to
  weight them, which the engine moves toward balance after each optimizer
  step when ``model.moe.bias_update_rate > 0`` (:func:`choice_bias_step`).

Routers are built as ``cls(d_model, cfg)`` from ``model.moe`` and found by
name in ``moe_asr.moe.registry``. ``TopKRouter`` is WeNet's gate, as in the
U2++ MoE paper: a bias-free linear layer, top-k of the raw logits, softmax
over only the chosen k in float32. No noise, no capacity, no auxiliary loss
unless asked for. Its expert bias (DeepSeek-V3's loss-free balancing) is zero,
and then it is WeNet's gate exactly, unless training moves it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from moe_asr.moe.config import MoEConfig


@dataclass
class Routing:
    weights: Tensor  # [N, k] float32
    experts: Tensor  # [N, k] int64 global expert ids


class RouterExportError(ValueError):
    """The router has no ONNX form."""


class Router(nn.Module):
    """Base of every router: the statistics it keeps and the export hooks' defaults."""

    # True for routers that choose by ``logits + choice_bias`` (a float32 [E] buffer); the engine
    # then balances them when model.moe.bias_update_rate > 0, and MoEConfig refuses the rate for others.
    has_choice_bias: ClassVar[bool] = False

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        # Side outputs for the engine's logging (detached, last training forward only).
        self.tokens_per_expert: Tensor | None = None
        self.entropy: Tensor | None = None

    def forward(self, x: Tensor) -> tuple[Routing, Tensor]:
        raise NotImplementedError

    def record(self, experts: Tensor, probs: Tensor) -> None:
        """Keep the load statistics of a training forward: ``experts [N, k]``, ``probs [N, E]``."""
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert = torch.bincount(experts.flatten(), minlength=self.num_experts)
                p = probs.detach().float()  # no tokens (a rank given only padding): entropy 0, not NaN
                self.entropy = -(p * p.clamp_min(1e-9).log()).sum() / max(p.shape[0], 1)

    def onnx_logits(self, x: Tensor) -> Tensor | None:
        """Logits whose top-k, softmaxed over the k, is this router's routing; None if there are none."""
        return None

    def onnx_routing(self, x: Tensor) -> Routing:
        """The routing of ``x`` in ops that export to standard ONNX (eval mode)."""
        raise RouterExportError(f"router {type(self).__module__}.{type(self).__qualname__} has no ONNX form "
                                f"(it defines neither onnx_logits nor onnx_routing)")


class TopKRouter(Router):
    has_choice_bias = True

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__(d_model, cfg)
        self.aux_loss_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.z_loss_coef
        self.gate = nn.Linear(d_model, cfg.num_experts, bias=False)
        # The expert bias. Always present, so a model starts or stops balancing (and WeNet's gate
        # imports, as zero) without a change of keys; state, not a parameter: no gradient, no
        # optimizer. Its name holds no "expert": DeepSpeed writes every key of an MoE layer that
        # does into the per-expert files, as an expert's.
        self.register_buffer("choice_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Files written before the bias existed chose without one: the same as a zero bias.
        state_dict.setdefault(prefix + "choice_bias", torch.zeros_like(self.choice_bias))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def logits(self, x: Tensor) -> Tensor:
        """The gate in float32 whatever the activations are (as DeepSpeed's gate): in bf16, logits a few
        ulps apart tie or swap, and the top-k and its weights follow the rounding, not the model."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.gate.weight.float())

    def forward(self, x: Tensor) -> tuple[Routing, Tensor]:
        """Route ``x [N, d]``; returns the routing and the weighted auxiliary loss."""
        logits = self.logits(x)
        routing = top_k_softmax(logits, self.top_k, self.choice_bias)
        experts = routing.experts
        aux = logits.new_zeros((), dtype=torch.float32)
        probs = None
        if self.aux_loss_coef > 0:
            probs = torch.softmax(logits, dim=-1)
            aux = aux + self.aux_loss_coef * load_balancing_loss(probs, experts, self.num_experts)
        if self.z_loss_coef > 0:
            z = torch.logsumexp(logits, dim=-1).square()
            aux = aux + self.z_loss_coef * z.sum() / max(z.numel(), 1)
        if self.training:
            self.record(experts, probs if probs is not None else torch.softmax(logits.detach(), dim=-1))
        return routing, aux

    def onnx_logits(self, x: Tensor) -> Tensor | None:
        """The gate's logits while the bias is zero; None once it is not (the export's top-k softmax
        chooses and weights by the same logits, so a biased choice exports its ``onnx_routing``)."""
        return None if bool(self.choice_bias.any()) else self.logits(x)

    def onnx_routing(self, x: Tensor) -> Routing:
        return top_k_softmax(self.logits(x), self.top_k, self.choice_bias)


def top_k_softmax(logits: Tensor, k: int, bias: Tensor | None = None) -> Routing:
    """WeNet's gate on ``logits [N, E]``: top-k, softmax over the k in float32.

    With ``bias [E]`` the k experts are those of ``logits + bias`` (in float32), still weighted by a
    softmax over their plain logits: the bias steers the choice only (a zero bias changes nothing).
    """
    if bias is None:
        top, experts = logits.topk(k, dim=-1)
    else:
        experts = (logits.float() + bias).topk(k, dim=-1).indices
        top = logits.gather(-1, experts)
    return Routing(weights=torch.softmax(top.float(), dim=-1), experts=experts)


def choice_bias_step(tokens: Tensor, rate: float) -> Tensor:
    """DeepSeek-V3's loss-free balancing step (Megatron-Core's ``moe_router_enable_expert_bias``) for
    ``tokens [..., E]``, the tokens routed to each expert summed over every rank:
    ``rate * sign(mean - tokens)``, float32. An expert above the mean load is chosen less next
    step, one below it more; a fixed step, whatever the size of the imbalance."""
    counts = tokens.double()
    return (rate * torch.sign(counts.mean(-1, keepdim=True) - counts)).float()


def load_balancing_loss(probs: Tensor, experts: Tensor, num_experts: int) -> Tensor:
    """Switch-Transformer loss ``E * sum_e f_e * P_e``; equals 1 under uniform routing.

    ``f_e`` is the fraction of the N*k assignments given to expert e (not
    differentiable), ``P_e`` the mean router probability of e (differentiable).
    """
    if experts.numel() == 0:  # no tokens here: no imbalance to penalise (and no 0/0)
        return probs.sum() * 0
    counts = torch.bincount(experts.flatten(), minlength=num_experts).to(probs.dtype)
    fraction = counts / experts.numel()
    return num_experts * (fraction * probs.mean(0)).sum()
