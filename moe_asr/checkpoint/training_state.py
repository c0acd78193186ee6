"""Read a DeepSpeed MoE checkpoint's optimizer into a layout-free :class:`TrainingState`, without DeepSpeed.

Where DeepSpeed keeps what, for our engine (``engine/deepspeed_engine.py``):

* **ZeRO 1/2**: ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` per rank r.
  Each parameter group is flattened and split over the group's data-parallel
  ranks: all ranks for dense groups, the ``world / ep_size`` ranks holding the
  same experts for expert groups (DeepSpeed's layout: rank r holds the
  experts of expert-parallel rank ``r % ep_size`` and is partition
  ``r // ep_size`` of its expert-data-parallel group). ``param_slice_mappings``
  names the slice of each parameter in each partition, so concatenating a
  parameter's slices in partition order gives it back whole; the fp32 master
  weights (``single_partition_of_fp32_groups``) and AdamW's moments are
  flat partitions laid out the same way.
* **ZeRO 0**: ``expp_rank_{e}_mp_rank_00_optim_states.pt`` per expert-parallel
  rank e, each the whole torch AdamW state of one rank holding experts e;
  our optimizer names its parameters (``param_names`` in each group).
* Everywhere: ``mp_rank_00_model_states.pt`` holds DeepSpeed's step counters
  and the LR schedule; ``trainer_state_rank_{r}.pt`` the loop's counters and
  rank r's loader position and RNG.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from moe_asr.run.files import load_file
from moe_asr.run.layout import MODEL_FILE, trainer_state_file
from moe_asr.run.training_state import MOMENTS, TrainingState

_ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_STAGE0_FILE = re.compile(r"^expp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _numbered(tag_dir: Path, pattern: re.Pattern) -> list[Path]:
    """The files matching ``pattern`` ordered by their number, which must run 0..n-1."""
    found = {int(m.group(1)): p for p in tag_dir.iterdir() if (m := pattern.match(p.name))}
    missing = sorted(set(range(max(found) + 1)) - set(found)) if found else []
    if missing:
        raise FileNotFoundError(f"{tag_dir}: optimizer file(s) of rank(s) {missing} are missing")
    return [found[i] for i in sorted(found)]


def read_training_state(tag_dir: Path, shapes: dict[str, torch.Size], ep_size: int
                        ) -> tuple[TrainingState, dict[str, Tensor]]:
    """The training state of checkpoint ``tag_dir`` and, for ZeRO 1/2, the fp32 master weights by name.

    ``shapes``: the full (all-experts) shape of every parameter, from the model's config.
    """
    tag_dir = Path(tag_dir)
    model_states = load_file(tag_dir / MODEL_FILE)
    zero_files = _numbered(tag_dir, _ZERO_FILE)
    if zero_files:
        moments, masters, adam_step, stage = _read_zero(zero_files, shapes, ep_size)
    else:
        stage0 = _numbered(tag_dir, _STAGE0_FILE)
        if not stage0:
            raise FileNotFoundError(f"{tag_dir}: no optimizer files (zero_pp_rank_* or expp_rank_*)")
        moments, adam_step = _read_stage0(stage0, shapes)
        masters, stage = {}, 0
    world = len(zero_files) if zero_files else model_states["dp_world_size"]
    ranks = [load_file(tag_dir / trainer_state_file(r)) for r in range(world)]
    ts = TrainingState(step=model_states["global_steps"], skipped_steps=model_states["skipped_steps"],
                       global_samples=model_states["global_samples"],
                       lr_step=model_states["lr_scheduler"]["last_epoch"], adam_step=adam_step, moments=moments,
                       loop=ranks[0]["loop"], ranks=ranks,
                       layout={"world_size": world, "ep_size": ep_size, "zero_stage": stage})
    return ts, masters


def _read_zero(files: list[Path], shapes: dict[str, torch.Size], ep_size: int
               ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor], float, int]:
    world = len(files)
    # name -> kind -> ep rank -> [(partition index, fragment)]
    pieces: dict[str, dict[str, dict[int, list[tuple[int, Tensor]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    steps, stage = set(), 0
    for r, path in enumerate(tqdm(files, desc="optimizer partitions", unit="rank")):
        osd = load_file(path)["optimizer_state_dict"]
        stage = int(osd["zero_stage"])
        base = osd["base_optimizer_state"]["state"]
        for i, mapping in enumerate(osd["param_slice_mappings"]):
            expert_group = osd["partition_count"][i] != world
            if expert_group and osd["partition_count"][i] * ep_size != world:
                raise ValueError(f"{path}: group {i} is split over {osd['partition_count'][i]} ranks, which does "
                                 f"not match ep_size={ep_size} on {world} ranks")
            ep_rank, part = (r % ep_size, r // ep_size) if expert_group else (0, r)
            flats = {"weight": osd["single_partition_of_fp32_groups"][i],
                     **{k: base[i][k] for k in MOMENTS}}
            steps.add(float(base[i]["step"]))
            for name, frag in mapping.items():
                for kind, flat in flats.items():
                    pieces[name][kind][ep_rank].append((part, flat[frag.start:frag.start + frag.numel]))
    if len(steps) != 1:
        raise ValueError(f"{files[0].parent}: parameter groups disagree on Adam's step: {sorted(steps)}")
    full = {name: {kind: _assemble(name, by_ep, shapes) for kind, by_ep in kinds.items()}
            for name, kinds in pieces.items()}
    moments = {name: {k: v[k] for k in MOMENTS} for name, v in full.items()}
    masters = {name: v["weight"] for name, v in full.items()}
    return moments, masters, steps.pop(), stage


def _assemble(name: str, by_ep: dict[int, list[tuple[int, Tensor]]], shapes: dict[str, torch.Size]) -> Tensor:
    """A parameter from its fragments: partitions in order within each expert-parallel rank, ranks along dim 0."""
    if name not in shapes:
        raise ValueError(f"the optimizer has a parameter {name!r} that the model of the config does not")
    shards = []
    for e in sorted(by_ep):
        shards.append(torch.cat([t for _, t in sorted(by_ep[e], key=lambda x: x[0])]))
    shape = shapes[name]
    local = (shape[0] // len(shards), *shape[1:])
    return torch.cat([s.view(local) for s in shards]).clone()


def _read_stage0(files: list[Path], shapes: dict[str, torch.Size]
                 ) -> tuple[dict[str, dict[str, Tensor]], float]:
    per_ep: dict[str, list[dict[str, Tensor]]] = defaultdict(list)
    steps = set()
    for path in tqdm(files, desc="optimizer states", unit="rank"):
        opt = load_file(path)["optimizer"]
        for group in opt["param_groups"]:
            if "param_names" not in group:
                raise ValueError(f"{path}: the optimizer's parameter groups carry no names; this checkpoint "
                                 f"cannot be mapped to parameters")
            for index, name in zip(group["params"], group["param_names"]):
                state = opt["state"][index]
                steps.add(float(state["step"]))
                per_ep[name].append({k: state[k] for k in MOMENTS})
    if len(steps) != 1:
        raise ValueError(f"{files[0].parent}: parameters disagree on Adam's step: {sorted(steps)}")
    moments = {}
    for name, copies in per_ep.items():
        if name not in shapes:
            raise ValueError(f"the optimizer has a parameter {name!r} that the model of the config does not")
        full = shapes[name]
        if copies[0]["exp_avg"].shape == full:  # a dense parameter: every rank holds the same state
            moments[name] = copies[0]
        else:  # an expert parameter: each expert-parallel rank holds its experts
            moments[name] = {k: torch.cat([c[k] for c in copies]) for k in MOMENTS}
    return moments, steps.pop()
