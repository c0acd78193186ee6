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
  :func:`gather_experts` is the same mapping for reading a checkpoint
  directory without DeepSpeed.

DeepSpeed itself is imported only inside the functions that need it at
training time, so the key mapping serves checkpoint readers that must not
import DeepSpeed (``moe_asr.checkpoint``).
"""
from __future__ import annotations

import functools
import pickle
import re
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from moe_asr.moe.experts import PARAMS
from moe_asr.moe.layer import MoEFeedForward

EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts"
MODEL_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE_GLOB = "layer_*_expert_*_mp_rank_00_model_states.pt"
_EXPERT_KEY_RE = re.compile(rf"^(.*)\.{re.escape(EXPERT_KEY)}\.(\d+)\.({'|'.join(PARAMS)})$")


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


def gather_experts(state: dict[str, Tensor], where: str, num_experts: Optional[int] = None) -> dict[str, Tensor]:
    """DeepSpeed's per-expert keys (global ids, from every expert file) -> our stacked ``experts.<p>``.

    Every other key passes through. A layer whose expert ids are not exactly
    ``0..E-1`` (``E = num_experts`` when known, else the highest id found) is
    an error naming the layer and the missing ids (``where``: the checkpoint,
    for the message).
    """
    out: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, Tensor]] = defaultdict(dict)
    for key, value in state.items():
        m = _EXPERT_KEY_RE.match(key)
        if m:
            experts[m.group(1), m.group(3)][int(m.group(2))] = value
        else:
            out[key] = value
    for (layer, name), by_id in experts.items():
        missing = sorted(set(range(num_experts or max(by_id) + 1)) - set(by_id))
        if missing:
            raise FileNotFoundError(f"{where}: layer {layer} has no {name} for expert(s) {missing} "
                                    f"(an expert file is missing)")
        out[f"{layer}.experts.{name}"] = torch.stack([by_id[e] for e in range(len(by_id))])
    return out


def read_deepspeed_model(tag_dir: Path, num_experts: Optional[int] = None) -> dict[str, Tensor]:
    """The whole model state of one DeepSpeed checkpoint tag, experts stacked as our layers hold them."""
    tag_dir = Path(tag_dir)
    model_file = tag_dir / MODEL_FILE
    if not model_file.is_file():
        raise FileNotFoundError(f"{tag_dir}: not a DeepSpeed checkpoint (no {MODEL_FILE})")
    state = dict(load_file(model_file)["module"])
    for f in tqdm(sorted(tag_dir.glob(EXPERT_FILE_GLOB)), desc="expert files", unit="file", disable=None):
        state.update(load_file(f))
    return gather_experts(state, str(tag_dir), num_experts)


class CheckpointFileError(ValueError):
    """A file :func:`load_file` refuses (unpickling it could run code) or cannot read; the message names it."""


def _numpy_arrays() -> list[Any]:
    """NumPy arrays of numbers: the RNG states in ``trainer_state_rank_*.pt`` and in a file's training state."""
    import numpy as np

    rebuild = np.empty(0).__reduce__()[0]  # numpy.core.multiarray._reconstruct, numpy._core... since NumPy 2
    numeric = {type(np.dtype(c)) for c in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]}
    return [(rebuild, "numpy.core.multiarray._reconstruct"), (rebuild, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, *numeric]


def _deepspeed_objects() -> list[Any]:
    """The plain-data objects DeepSpeed 0.19.8 writes into ZeRO 1/2 optimizer files (loss scaler, stage, slices)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


# Everything a file may name beyond tensors and plain containers, by the name its pickle gives, and the
# group that allows it: each is rebuilt from plain data without running anything the file supplies. A
# group is imported only when a file names one of its members (reading a model must not import DeepSpeed).
SAFE_GLOBALS: dict[str, Callable[[], list[Any]]] = {
    "numpy.core.multiarray._reconstruct": _numpy_arrays,
    "numpy._core.multiarray._reconstruct": _numpy_arrays,
    "numpy.ndarray": _numpy_arrays,
    "numpy.dtype": _numpy_arrays,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": _deepspeed_objects,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": _deepspeed_objects,
    "deepspeed.runtime.zero.config.ZeroStageEnum": _deepspeed_objects,
    "deepspeed.utils.tensor_fragment.fragment_address": _deepspeed_objects,
}


def load_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` that never runs code from the file: weights, plain data and :data:`SAFE_GLOBALS` only.

    Every model, checkpoint and state file is read here (DeepSpeed's own reads
    too, see ``build_engine``). A file that names anything else is refused with
    one error naming it and what it names; a damaged one is one error naming it.
    """
    try:
        try:  # what the pickle names, read without unpickling it
            named = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except ValueError:  # torch's legacy format (or no torch file): learnt from the unpickler's refusals below
            named = set()
        while True:
            refused = sorted(named - SAFE_GLOBALS.keys())
            if refused:
                raise CheckpointFileError(f"{path}: refused: the file calls for {', '.join(refused)}, which is "
                                          f"neither weights nor plain data (loading it could run code from it)")
            try:
                with torch.serialization.safe_globals([obj for group in {SAFE_GLOBALS[n] for n in named}
                                                       for obj in group()]):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:  # a name the scan could not see (legacy format): allow or refuse it
                found = re.search(r"GLOBAL (\S+)", str(e))
                if not found:
                    raise
                name = found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"  # torch drops it
                if name in named:
                    raise
                named.add(name)
    except CheckpointFileError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointFileError(f"{path}: cannot read this checkpoint file ({type(e).__name__}: "
                                  f"{_first_words(e)})") from None


def _first_words(e: Exception) -> str:
    """The line of an error message that says what went wrong (torch's unpickler wraps it in advice)."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


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
