"""Model + DeepSpeed engine for training: expert groups, MoE registration, optimizer, schedule.

The DeepSpeed JSON describes the system (ZeRO stage, precision, buckets); the
experiment's ``train:`` section owns the optimisation settings, which are
written into the DeepSpeed config here. A JSON that also sets them is refused,
so each value has one home.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch

from moe_asr.run.config import ConfigError, ExperimentConfig, TrainConfig, precision, zero_stage
from moe_asr.engine.deepspeed_moe import prepare_moe_layers
from moe_asr.engine.distributed import DistInfo, select_accelerator
from moe_asr.engine.optim import build_optimizer, build_scheduler
from moe_asr.model.u2pp import U2PPModel, build_model
from moe_asr.moe.layer import MoEFeedForward
from moe_asr.run.files import load_file

# Keys the engine fills from the train: section.
TRAIN_OWNED = ("optimizer", "scheduler", "gradient_clipping", "gradient_accumulation_steps",
               "train_batch_size", "train_micro_batch_size_per_gpu")


def deepspeed_config(path: str | Path, train: TrainConfig) -> dict:
    """The DeepSpeed config of ``path`` completed from ``train``; unsupported combinations fail here."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the DeepSpeed config: {e}") from None
    clash = sorted(set(cfg) & set(TRAIN_OWNED))
    if clash:
        raise ConfigError(f"{path}: {clash} come from the experiment's train: section "
                          f"(lr, warmup_steps, decay, grad_clip, accum_grad); remove them from the JSON")
    stage = zero_stage(cfg)
    mixed = precision(cfg) != "fp32"
    if stage not in (0, 1, 2):
        raise ConfigError(f"{path}: ZeRO stage {stage} does not support DeepSpeed MoE layers; use 0, 1 or 2")
    if stage == 0 and mixed:
        raise ConfigError(f"{path}: bf16/fp16 training needs ZeRO stage 1 or 2 (stage 0 is the fp32 CPU path)")
    zero = cfg.get("zero_optimization", {})
    if stage == 1 and zero.get("contiguous_gradients") is False:
        # DeepSpeed 0.19.8's non-contiguous ZeRO 1 path reduces gradient buckets over the whole data-parallel
        # world (buffered_reduce_fallback -> allreduce_bucket on dp_process_group), MoE groups or not.
        raise ConfigError(f"{path}: contiguous_gradients: false at ZeRO stage 1 all-reduces expert gradients over "
                          f"every rank, summing different experts' gradients; remove it (true is the default)")
    if cfg.get("use_data_before_expert_parallelism"):
        raise ConfigError(f"{path}: use_data_before_expert_parallelism would be ignored: the engine makes the "
                          f"expert groups (parallel.ep_size) before DeepSpeed reads it; remove it")
    # Dynamic batches: DeepSpeed's micro-batch size only feeds its sample counter.
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=train.accum_grad,
               gradient_clipping=train.grad_clip if stage > 0 else 0.0)  # stage 0: Stage0AdamW clips
    return cfg


def check_precision_supported(path: str | Path, ds_config: dict) -> None:
    """Refuse, in one line, a precision this machine's DeepSpeed accelerator lacks (the config is fine
    elsewhere): DeepSpeed itself stops later, inside ``initialize`` on every rank, with a traceback ("Type
    fp16 is not supported on your device"). Its CPU accelerator has bf16 always, and fp16 only where torch
    reports oneDNN fp16 kernels (``torch.ops.mkldnn._is_mkldnn_fp16_supported()``)."""
    from deepspeed.accelerator import get_accelerator

    select_accelerator()  # the one init_distributed will use
    accelerator = get_accelerator()
    dtype = precision(ds_config)
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported[dtype]:
        others = " or ".join(d for d in ("bf16", "fp16", "fp32") if supported[d] and d != dtype)
        raise ConfigError(f"{path}: {dtype} training is not supported by DeepSpeed's {accelerator.device_name()} "
                          f"accelerator on this machine; use {others}")


@dataclass
class TrainingModel:
    engine: deepspeed.DeepSpeedEngine
    model: U2PPModel
    moe_layers: dict[str, MoEFeedForward]  # routed layers by module name, registered as DeepSpeed MoE
    zero_stage: int


def build_engine(cfg: ExperimentConfig, ds_config: dict, info: DistInfo,
                 weights: dict[str, torch.Tensor] | None = None) -> TrainingModel:
    """Build the model, keep this rank's experts, make DeepSpeed see its MoE layers, and wrap it.

    ``weights``: a whole model's state (every expert) to start from instead of the seeded init.
    """
    torch.manual_seed(cfg.train.seed)  # same dense weights on every rank, same experts for any ep_size
    model = build_model(cfg.model, load_cmvn=weights is None)
    if weights is not None:
        model.load_state_dict(weights)
    layers = prepare_moe_layers(model, cfg.parallel.ep_size)
    stage = zero_stage(ds_config)
    optimizer = build_optimizer(model, cfg.train, stage)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                      lr_scheduler=lambda opt: build_scheduler(opt, cfg.train),
                                      dist_init_required=False)
    engine.checkpoint_engine.load = load_file  # DeepSpeed's reads of a checkpoint never run code from it
    return TrainingModel(engine, model, layers, stage)
