"""`launch/train.py`: config + DeepSpeed JSON -> a trained model in ``--out-dir``.

Runs the same under ``deepspeed --num_gpus N``, ``deepspeed --hostfile``,
``torchrun`` and as one plain process. Resumes from ``<out-dir>/checkpoints/latest``
when it exists (``--resume TAG`` picks another checkpoint).
"""
from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from moe_asr.engine.config import ConfigError, ExperimentConfig, save_config
from moe_asr.schema import from_dict

log = logging.getLogger("moe_asr.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (model:, data:, train:)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True,
                   help="DeepSpeed JSON (ZeRO stage, precision), e.g. ds_configs/zero2_cpu.json")
    p.add_argument("--train-shards", help="shard list file; overrides data.train_shards")
    p.add_argument("--cv-shards", help="shard list file; overrides data.cv_shards")
    p.add_argument("--out-dir", default=None, help="checkpoints, logs, plots (default: exp/<config name>)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="TAG",
                   help="resume from checkpoint TAG (default: latest); without this flag training "
                        "resumes from latest automatically when it exists")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.moe.ep_size=2 (VALUE is YAML); repeatable")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def load_experiment(path: str, overrides: list[str], train_shards: Optional[str] = None,
                    cv_shards: Optional[str] = None) -> ExperimentConfig:
    """The YAML at ``path`` with dotted ``KEY=VALUE`` overrides applied, validated as a whole."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    shards = {"data.train_shards": train_shards, "data.cv_shards": cv_shards}
    pairs = [o.split("=", 1) for o in overrides] + [[k, v] for k, v in shards.items() if v is not None]
    for pair in pairs:
        if len(pair) != 2:
            raise ConfigError(f"--set {pair[0]!r}: expected KEY=VALUE")
        key, value = pair
        node: dict[str, Any] = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value) if key not in shards else value
    try:
        return from_dict(ExperimentConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_experiment(args.config, args.set, args.train_shards, args.cv_shards)
    out_dir = Path(args.out_dir or Path("exp") / Path(args.config).stem)

    from moe_asr.data.loader import build_loader
    from moe_asr.data.tokenizer import Tokenizer
    from moe_asr.engine.deepspeed_engine import build_engine, deepspeed_config
    from moe_asr.engine.distributed import init_distributed
    from moe_asr.engine.logging import setup_console
    from moe_asr.engine.loop import Trainer

    tokenizer = Tokenizer.from_config(cfg.data.tokenizer)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        # The model's <sos/eos> id is vocab_size - 1: a mismatch trains silently wrong targets.
        raise ConfigError(f"{args.config}: model.vocab_size is {cfg.model.vocab_size}, but the symbol table "
                          f"{cfg.data.tokenizer.symbol_table} has {tokenizer.vocab_size} entries")
    ds_config = deepspeed_config(args.deepspeed_config, cfg.train)
    info = init_distributed()
    setup_console(info.rank)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "train.yaml")
    tm = build_engine(cfg, ds_config, info)
    # Training randomness (dropout, dynamic chunks) differs per rank; a resume restores it.
    seed = cfg.train.seed + info.rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    trainer = Trainer(cfg, tm, build_loader(cfg.data, "train", tokenizer), build_loader(cfg.data, "cv", tokenizer),
                      out_dir, info)
    tag = trainer.checkpointer.latest_tag() if args.resume in (None, "latest") else args.resume
    if args.resume and tag is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {trainer.checkpointer.root}")
    if tag is not None:
        trainer.resume(tag)
    log.info("training %s on %d rank(s), ep_size %d, ZeRO stage %d -> %s", args.config, info.world_size,
             cfg.model.moe.ep_size, tm.zero_stage, out_dir)
    trainer.fit()
    return 0
