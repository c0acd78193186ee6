"""Conversions between what training writes and what everything after it reads.

* :func:`ds_to_pt`: a DeepSpeed MoE checkpoint (ZeRO 0/1/2, any ep_size and
  world size) to one consolidated file, optionally with the layout-free
  training state that ``launch/train.py --init-from`` continues at another layout;
* :func:`upcycle`: a dense model to its MoE counterpart (every expert a copy
  of the dense FFN), after "Upcycling Mixture-of-Experts for Scalable and
  Efficient Automatic Speech Recognition" (2024).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from moe_asr.checkpoint.load import ModelState, read_model_state
from moe_asr.checkpoint.training_state import read_training_state
from moe_asr.run.config import ExperimentConfig, load_config, precision, zero_stage
from moe_asr.run.files import load_file
from moe_asr.run.layout import MODEL_FILE
from moe_asr.model.config import model_differences
from moe_asr.model.u2pp import build_model


def ds_to_pt(path: str | Path, tag: Optional[str], with_optimizer: bool) -> tuple[ModelState, dict]:
    """The consolidated model of a DeepSpeed checkpoint and a summary of what was read.

    Weights are DeepSpeed's model files; for a bf16/fp16 run, and whenever the
    optimizer is read, the fp32 master weights of the ZeRO partitions instead
    (the module copies are rounded).
    """
    ms = read_model_state(path, tag)
    if ms.source.is_file():
        raise ValueError(f"{ms.source}: already a consolidated model file")
    ds_config = load_file(ms.source / MODEL_FILE)["ds_config"]
    mixed = precision(ds_config) != "fp32"
    summary = {"source": str(ms.source), "zero_stage": zero_stage(ds_config), "ep_size": ms.config.parallel.ep_size,
               "precision": precision(ds_config), "with_optimizer": with_optimizer}
    if with_optimizer or mixed:
        with torch.device("meta"):
            shapes = {name: p.shape for name, p in build_model(ms.config.model, load_cmvn=False).named_parameters()}
        ts, masters = read_training_state(ms.source, shapes, ms.config.parallel.ep_size)
        state = {**ms.state, **masters}
        extra = {"training_state": asdict(ts)} if with_optimizer else {}
        ms = replace(ms, state=state, extra=extra)
        summary.update(world_size=ts.layout["world_size"], step=ts.step)
    return ms, summary


def upcycle(dense: str | Path, moe_config: str | Path) -> ModelState:
    """The MoE model of ``moe_config`` whose every expert is a copy of ``dense``'s FFN at the same place.

    The router is the MoE config's own (seeded) initialisation: whatever it
    routes, a token's output is a convex mix of identical experts, so the
    upcycled model's first forward equals the dense model's. Everything else
    (encoder, decoders, CTC, CMVN) is copied; the two configs must agree on
    everything but ``model.moe``.
    """
    source = read_model_state(dense)
    cfg: ExperimentConfig = load_config(moe_config)
    if source.config.model.moe.num_experts != 1:
        raise ValueError(f"{dense}: not a dense model (model.moe.num_experts is "
                         f"{source.config.model.moe.num_experts})")
    if cfg.model.moe.num_experts < 2:
        raise ValueError(f"{moe_config}: model.moe.num_experts must be > 1 to upcycle into, got "
                         f"{cfg.model.moe.num_experts}")
    diff = {k: v for k, v in model_differences(cfg.model, source.config.model).items() if not k.startswith("moe.")}
    if diff:
        key, (ours, theirs) = next(iter(diff.items()))
        raise ValueError(f"{moe_config}: model.{key} is {ours!r}, the dense model's {theirs!r}; "
                         f"only model.moe may differ")
    torch.manual_seed(cfg.train.seed)
    state = build_model(cfg.model, load_cmvn=False).state_dict()
    experts = cfg.model.moe.num_experts
    for key, value in state.items():
        if ".experts." in key:
            state[key] = source.state[key].expand(experts, *value.shape[1:]).clone()
        elif ".router." not in key:
            state[key] = source.state[key].clone()
    return ModelState(state, cfg, source.tokenizer, Path(dense), {"upcycled_from": str(dense)})
