"""The names and layout of a run folder, and the readers of DeepSpeed's model files in it.

A run folder (``--out-dir``) holds ``train.yaml`` (the experiment config),
``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/``; there ``latest``
names the newest complete checkpoint, ``checkpoints.json`` (the index) lists
the complete ones with their step, epoch and CV loss, and each tag directory
is DeepSpeed's checkpoint (``mp_rank_00_model_states.pt`` without experts, one
``layer_{L}_expert_{E}_mp_rank_00_model_states.pt`` per global expert, whose
keys are ``<layer>.deepspeed_moe.experts.deepspeed_experts.<E>.<param>``,
optimizer files per rank) plus ``trainer_state_rank_{r}.pt`` per rank,
``fingerprint.json`` and, written last, ``manifest.json``: a tag without one
is incomplete. The engine writes these (``moe_asr.engine.checkpoint``); the
readers after training use the same names from here.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from tqdm import tqdm

from moe_asr.moe.experts import PARAMS
from moe_asr.run.files import load_file

CONFIG = "train.yaml"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
INDEX = "checkpoints.json"
MANIFEST = "manifest.json"
EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts"
MODEL_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE_GLOB = "layer_*_expert_*_mp_rank_00_model_states.pt"
_EXPERT_KEY_RE = re.compile(rf"^(.*)\.{re.escape(EXPERT_KEY)}\.(\d+)\.({'|'.join(PARAMS)})$")


@dataclass
class CheckpointInfo:
    """One complete checkpoint as the index lists it."""

    tag: str
    step: int
    epoch: int
    cv_loss: Optional[float] = None


def trainer_state_file(rank: int) -> str:
    """Rank ``rank``'s loop counters, loader position and RNG inside a checkpoint tag directory."""
    return f"trainer_state_rank_{rank}.pt"


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
