"""`launch/train.py`: config + DeepSpeed JSON -> a trained model in ``--out-dir``.

Runs the same under ``deepspeed --num_gpus N``, ``deepspeed --hostfile``,
``torchrun`` and as one plain process. Resumes from ``<out-dir>/checkpoints/latest``
when it exists (``--resume TAG`` picks another checkpoint). ``--init-from model.pt``
starts a new run from a consolidated model file instead, at this run's layout:
with the file's training state (``moe-asr convert ds-to-pt --with-optimizer``) it
continues the old run, moments and schedule included, at another ep_size, world
size or ZeRO stage, which DeepSpeed's own checkpoints refuse.
"""
from __future__ import annotations

import argparse
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from moe_asr.checkpoint import read_model_state
from moe_asr.engine.checkpoint import Checkpointer
from moe_asr.run.config import ConfigError, ExperimentConfig, save_config
from moe_asr.engine.fingerprint import ResumeRefused, check_resume, fingerprint
from moe_asr.engine.training_state import apply_training_state
from moe_asr.model.config import COMPUTE_KEYS, model_differences
from moe_asr.run.layout import CHECKPOINTS, CONFIG, LATEST
from moe_asr.run.training_state import TrainingState
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
                   help="resume from checkpoint TAG (default: latest, else the newest complete one); without "
                        "this flag an out-dir holding a run resumes the same way, and only with a matching "
                        "model, vocabulary and layout")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an out-dir that holds one (its checkpoints, metrics and logs are "
                        "removed once every check has passed)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    p.add_argument("--init-from", metavar="MODEL_PT",
                   help="start from a consolidated model file (moe-asr convert ds-to-pt/average/upcycle/from-wenet) "
                        "at this run's layout (any ep_size, world size, ZeRO stage); its training state "
                        "(ds-to-pt --with-optimizer) continues the run, else --fresh-optimizer is required")
    p.add_argument("--fresh-optimizer", action="store_true",
                   help="with --init-from: new AdamW moments, LR schedule and counters from step 0")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set parallel.ep_size=2 (VALUE is YAML); repeatable")
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


def _init_from(path: str, cfg: ExperimentConfig, fresh_optimizer: bool) -> tuple[dict, Optional[TrainingState]]:
    """The weights (and training state, unless ``fresh_optimizer``) of the model file ``path`` for ``cfg``."""
    ms = read_model_state(path)
    diff = model_differences(ms.config.model, cfg.model)
    if diff:
        key, (theirs, ours) = next(iter(diff.items()))
        raise ConfigError(f"--init-from {path}: its model differs from this config's at model.{key} "
                          f"({theirs!r} vs {ours!r}); only model.{' and model.'.join(COMPUTE_KEYS)} may change")
    state = ms.extra.get("training_state")
    if state is None and not fresh_optimizer:
        raise ConfigError(f"--init-from {path}: the file has no training state (write it with "
                          f"`moe-asr convert ds-to-pt --with-optimizer`); pass --fresh-optimizer to start the "
                          f"optimizer and the LR schedule anew")
    return ms.state, None if fresh_optimizer else TrainingState(**state)


# What a run leaves in its out-dir besides checkpoints; --overwrite removes them.
RUN_FILES = (CONFIG, "metrics.jsonl", "tensorboard", CHECKPOINTS, "loss_curves.png", "expert_load.png")


def _start_point(args: argparse.Namespace, out_dir: Path, checkpoints: Checkpointer) -> Optional[str]:
    """The checkpoint tag to resume, or None for a new run; refuses what the user did not ask for."""
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if args.overwrite or args.init_from:
        if args.init_from and held and not args.overwrite:
            raise ResumeRefused(f"--init-from: {out_dir} already holds a run ({', '.join(held)}); pass "
                                f"--overwrite to replace it, or pick another --out-dir")
        return None
    if args.resume not in (None, "latest"):
        return args.resume
    tag = checkpoints.resume_point()
    latest = checkpoints.latest_tag()
    if tag is not None and tag != latest:
        log.warning("%s: %s; resuming the newest complete checkpoint listed in checkpoints.json: %s",
                    checkpoints.root, f"{LATEST} names {latest}, which is not complete" if latest
                    else f"no {LATEST} file", tag)
    if tag is None and held:
        raise ResumeRefused(f"{out_dir} holds a run ({', '.join(held)}) but no complete checkpoint to resume; "
                            f"pass --overwrite to start it anew, or pick another --out-dir")
    if tag is None and args.resume:
        raise ResumeRefused(f"--resume: nothing to resume in {out_dir} (no run there)")
    return tag


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_experiment(args.config, args.set, args.train_shards, args.cv_shards)
    out_dir = Path(args.out_dir or Path("exp") / Path(args.config).stem)

    from moe_asr.data.loader import build_loader
    from moe_asr.data.tokenizer import Tokenizer
    from moe_asr.engine.deepspeed_engine import build_engine, check_precision_supported, deepspeed_config
    from moe_asr.engine.distributed import barrier, init_distributed, shutdown_distributed
    from moe_asr.engine.logging import setup_console
    from moe_asr.engine.loop import Trainer
    from moe_asr.engine.run_lock import hold_run_dir

    try:
        tokenizer = Tokenizer.from_config(cfg.data.tokenizer, cfg.model.sos_eos_id)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{args.config}: data.tokenizer: {e}") from None
    if tokenizer.vocab_size != cfg.model.vocab_size:
        # The model's <sos/eos> id depends on vocab_size: a mismatch trains silently wrong targets.
        raise ConfigError(f"{args.config}: model.vocab_size is {cfg.model.vocab_size}, but the symbol table "
                          f"{cfg.data.tokenizer.symbol_table} has {tokenizer.vocab_size} entries")
    ds_config = deepspeed_config(args.deepspeed_config, cfg.train)
    check_precision_supported(args.deepspeed_config, ds_config)
    info = init_distributed()
    setup_console(info.rank)
    try:
        cfg.parallel.check_world(info.world_size)
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    hold_run_dir(out_dir, info.rank)  # one live writer per out-dir, taken before anything in it is read
    weights, state = _init_from(args.init_from, cfg, args.fresh_optimizer) if args.init_from else (None, None)
    try:
        loaders = build_loader(cfg.data, "train", tokenizer), build_loader(cfg.data, "cv", tokenizer)
    except (OSError, ValueError) as e:  # a missing or unset shard list (ConfigError is a ValueError too)
        raise ConfigError(f"{args.config}: {e}") from None
    # Every rank decides from the out-dir as it is; nothing in it changes until all ranks have decided
    # and everything is loaded, so a refused or failed start leaves the run as it was.
    checkpoints = Checkpointer(out_dir / CHECKPOINTS, cfg.train.keep_checkpoints, info.rank)
    tag = _start_point(args, out_dir, checkpoints)
    current = fingerprint(cfg, tokenizer, info.world_size, ds_config)
    if tag is not None:
        checkpoints.verify(tag)
        for note in check_resume(checkpoints.root / tag, current, out_dir):
            log.info("%s", note)
    tm = build_engine(cfg, ds_config, info, weights)
    # Training randomness (dropout, dynamic chunks) differs per rank; a resume restores it.
    seed = cfg.train.seed + info.rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    trainer = Trainer(cfg, tm, *loaders, out_dir, info, current, checkpoints)
    if tag is not None:
        trainer.resume(tag)
    elif state is not None:
        apply_training_state(tm.engine, tm.model, tm.zero_stage, state, weights)
        trainer.continue_from(state)
        log.info("continuing %s at step %d (AdamW moments, LR schedule and counters from the file; was %s)",
                 args.init_from, state.step, state.layout)
    elif weights is not None:
        log.info("starting from the weights of %s with a fresh optimizer and LR schedule", args.init_from)
    if info.is_main:
        if args.overwrite:
            for name in RUN_FILES:
                path = out_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / CONFIG)
    barrier()
    log.info("training %s on %d rank(s), ep_size %d, ZeRO stage %d -> %s", args.config, info.world_size,
             cfg.parallel.ep_size, tm.zero_stage, out_dir)
    trainer.fit()
    shutdown_distributed()
    return 0
