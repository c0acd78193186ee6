"""Our MoE layers, presented to DeepSpeed as its own ``deepspeed.moe.layer.MoE`` layers.

DeepSpeed's engine switches on its MoE machinery only when it finds modules
that are instances of ``deepspeed.moe.layer.MoE``: then it averages expert
gradients over the expert-data-parallel groups only (dense ones over all
ranks), gives ZeRO 1/2 the expert parameter groups to partition over those
groups, broadcasts expert weights within them, and writes one checkpoint file
per global expert (``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``) with
keys ``<layer>.deepspeed_moe.experts.deepspeed_experts.<E>.<param>``.

The model is built without DeepSpeed (decoding and export never import it),
so for training each :class:`MoEFeedForward` with more than one expert is
re-classed in place (as ``torch.nn.utils.parametrize`` does) to
:class:`DeepSpeedMoEFeedForward`, which inherits from both. It computes exactly
what it did before and adds what DeepSpeed reads from an MoE layer:

* ``ep_size``, ``expert_group_name``, ``num_local_experts``, ``num_experts``;
* ``set_deepspeed_parallelism()``, which the engine calls at init: it creates
  (or reuses) DeepSpeed's expert groups and hands the layer its all-to-all group;
* DeepSpeed's per-expert state-dict keys. Our experts are stacked tensors
  (``experts.w1 [E_local, d, f]``); a state-dict hook presents them as
  ``deepspeed_moe.experts.deepspeed_experts.<local id>.w1 [d, f]`` and a load
  hook stacks them back, so DeepSpeed's own MoE save/load (local -> global
  expert ids, one file per expert, ``mp_rank_00`` without experts) works
  unchanged for any ``ep_size``.

Expert parameters already carry ``allreduce=False`` and
``group_name=ep_size_<ep>`` (``moe/experts.py``), which is what
``split_params_into_different_moe_groups_for_optimizer`` and the gradient
reduction key on.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from moe_asr.moe.layer import MoEFeedForward

EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts"
EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


class DeepSpeedMoEFeedForward(MoEFeedForward, MoE):
    """An :class:`MoEFeedForward` that DeepSpeed's engine treats as one of its MoE layers.

    Never constructed: :func:`register_moe_layers` re-classes existing layers.
    """

    @property
    def num_local_experts(self) -> int:
        return self.experts.num_local

    @property
    def ep_size(self) -> int:
        return self.num_experts // self.num_local_experts

    @property
    def expert_group_name(self) -> str:
        return f"ep_size_{self.ep_size}"

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine at init: make DeepSpeed's expert groups and join the all-to-all one."""
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        group = groups._get_expert_parallel_group(self.expert_group_name)
        self.set_expert_parallel_group(group if self.ep_size > 1 else None)


def _to_deepspeed_keys(module: DeepSpeedMoEFeedForward, state_dict: "OrderedDict[str, Any]", prefix: str,
                       local_metadata: dict) -> None:
    """State-dict post hook: stacked ``experts.<p>`` -> one key per local expert, in DeepSpeed's layout."""
    for name in EXPERT_PARAMS:
        stacked = state_dict.pop(f"{prefix}experts.{name}")
        for e in range(module.num_local_experts):
            state_dict[f"{prefix}{EXPERT_KEY}.{e}.{name}"] = stacked[e]


def _from_deepspeed_keys(module: DeepSpeedMoEFeedForward, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre-hook: the inverse of :func:`_to_deepspeed_keys` (keys already in our layout pass through)."""
    for name in EXPERT_PARAMS:
        keys = [f"{prefix}{EXPERT_KEY}.{e}.{name}" for e in range(module.num_local_experts)]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}experts.{name}"] = torch.stack([state_dict.pop(k) for k in keys])


def register_moe_layers(model: nn.Module) -> list[DeepSpeedMoEFeedForward]:
    """Make every routed MoE layer of ``model`` visible to DeepSpeed as an MoE layer (in place)."""
    layers = []
    for module in model.modules():
        if isinstance(module, MoEFeedForward) and module.num_experts > 1:
            if not isinstance(module, DeepSpeedMoEFeedForward):
                module.__class__ = DeepSpeedMoEFeedForward
                module.register_state_dict_post_hook(_to_deepspeed_keys)
                module.register_load_state_dict_pre_hook(_from_deepspeed_keys)
            layers.append(module)
    return layers
