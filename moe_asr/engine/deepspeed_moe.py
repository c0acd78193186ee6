"""Everything moe-asr knows about DeepSpeed's MoE contracts, in one place.

DeepSpeed's engine switches on its MoE machinery only for modules that are
instances of ``deepspeed.moe.layer.MoE``: then it averages expert gradients
over the expert-data-parallel groups only (dense ones over all ranks), gives
ZeRO 1/2 the expert parameter groups to partition over those groups, and
writes one checkpoint file per global expert
(``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``, keys
``<layer>.deepspeed_moe.experts.deepspeed_experts.<E>.<param>``) beside
``mp_rank_00_model_states.pt`` (everything else).

The model is built without DeepSpeed, with all experts. For training,
:func:`prepare_moe_layers` gives each MoE layer its share and makes it
DeepSpeed's:

* **expert groups** (:func:`expert_groups`, the only place they are made):
  ranks ``[k*ep, (k+1)*ep)`` form an expert-parallel group (all-to-all), ranks
  with the same place in their groups an expert-data-parallel group;
* **shard**: the layer keeps experts ``[r*E/ep, (r+1)*E/ep)`` of its group;
* **parameter markers**: expert parameters get ``allreduce=False`` and
  ``group_name`` (:func:`group_name`), which DeepSpeed's optimizer grouping
  and gradient reduction key on;
* **registration**: the layer is re-classed in place (as
  ``torch.nn.utils.parametrize`` does) to a subclass of both
  :class:`~moe_asr.moe.layer.MoEFeedForward` and DeepSpeed's ``MoE``: it
  computes exactly what it did and adds the attributes DeepSpeed reads;
* **key mapping**: our experts are stacked tensors (``experts.w1 [E_local, d, f]``);
  state-dict hooks present them as DeepSpeed's per-expert keys and stack them
  back, so DeepSpeed's own MoE save/load works unchanged for any ``ep_size``.
  ``moe_asr.run.layout.gather_experts`` is the same mapping for reading a
  checkpoint directory without DeepSpeed, and the key and file names live there.

DeepSpeed itself is imported only inside the functions that need it at
training time.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from moe_asr.moe.experts import PARAMS
from moe_asr.moe.layer import MoEFeedForward
from moe_asr.run.layout import EXPERT_KEY



def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel group of ``ep_size`` ranks."""
    return f"ep_size_{ep_size}"


def expert_groups(ep_size: int, use_data_before_expert_parallel: bool = False
                  ) -> tuple[int, dist.ProcessGroup | None]:
    """This rank's place in its expert-parallel group and the group (None for ``ep_size=1``).

    Creates DeepSpeed's expert and expert-data-parallel groups on first use; ``ep_size``
    divides the world (``ParallelConfig.check_world``, before training starts).
    """
    from deepspeed.utils import groups

    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    group = groups._get_expert_parallel_group(name) if ep_size > 1 else None
    return groups._get_expert_parallel_rank(name), group


@functools.cache
def _deepspeed_layer_class() -> type:
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEFeedForward(MoEFeedForward, MoE):
        """An :class:`MoEFeedForward` that DeepSpeed's engine treats as one of its MoE layers.

        Never constructed: :func:`prepare_moe_layers` re-classes existing layers.
        """

        @property
        def num_local_experts(self) -> int:
            return self.experts.num_local

        @property
        def ep_size(self) -> int:
            return self.experts.ep_size

        @property
        def expert_group_name(self) -> str:
            return group_name(self.ep_size)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Called by the engine at init; the groups already exist (made when the layer was sharded)."""
            expert_groups(self.ep_size, use_data_before_expert_parallel_)

    return DeepSpeedMoEFeedForward


def routed_layers(model: nn.Module) -> dict[str, MoEFeedForward]:
    """The MoE layers with a router (more than one expert), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEFeedForward) and m.num_experts > 1}


def prepare_moe_layers(model: nn.Module, ep_size: int) -> dict[str, MoEFeedForward]:
    """Shard, mark and register every routed MoE layer of ``model`` for DeepSpeed (in place)."""
    rank, group = expert_groups(ep_size)
    layers = routed_layers(model)
    cls = _deepspeed_layer_class()
    for layer in layers.values():
        layer.shard(group, rank, ep_size)
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = group_name(ep_size)
        layer.__class__ = cls
        layer.register_state_dict_post_hook(_to_deepspeed_keys)
        layer.register_load_state_dict_pre_hook(_from_deepspeed_keys)
    return layers


def _to_deepspeed_keys(module: MoEFeedForward, state_dict: "OrderedDict[str, Any]", prefix: str,
                       local_metadata: dict) -> None:
    """State-dict post hook: stacked ``experts.<p>`` -> one key per local expert, in DeepSpeed's layout."""
    for name in PARAMS:
        stacked = state_dict.pop(f"{prefix}experts.{name}")
        for e in range(module.experts.num_local):
            state_dict[f"{prefix}{EXPERT_KEY}.{e}.{name}"] = stacked[e]


def _from_deepspeed_keys(module: MoEFeedForward, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre-hook: the inverse of :func:`_to_deepspeed_keys` (keys already in our layout pass through)."""
    for name in PARAMS:
        keys = [f"{prefix}{EXPERT_KEY}.{e}.{name}" for e in range(module.experts.num_local)]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}experts.{name}"] = torch.stack([state_dict.pop(k) for k in keys])


def split_moe_param_groups(param_groups: list[dict]) -> list[dict]:
    """Our optimizer groups split into dense and per-expert-group ones, as DeepSpeed's ZeRO wants them."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def is_expert_param(p: nn.Parameter) -> bool:
    """An expert parameter (marked by :func:`prepare_moe_layers`): averaged over its expert-data group only."""
    return not getattr(p, "allreduce", True)


def copies(params: Iterable[nn.Parameter]) -> list[int]:
    """On how many ranks each parameter's reduced gradient lives (dense: all; expert: its expert-data group)."""
    from deepspeed.utils import groups

    world = dist.get_world_size() if dist.is_initialized() else 1
    return [groups._get_expert_data_parallel_world_size(p.group_name) if is_expert_param(p) else world
            for p in params]
