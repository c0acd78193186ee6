"""Find, read and rebuild a trained model from what training left on disk, without DeepSpeed.

What a path may be:

* a **run directory** (``launch/train.py --out-dir``): ``train.yaml`` and
  ``checkpoints/<tag>/``; the tag is ``latest`` unless one is given;
* a **checkpoints directory** (``<run>/checkpoints``) or one **checkpoint tag**
  directory (``<run>/checkpoints/<tag>``); the config is the run's ``train.yaml``;
* a **consolidated file** (:func:`save_model`): one ``torch.save`` of the whole
  model state (experts stacked, fp32), the resolved experiment config, the
  tokenizer (symbol table and sentencepiece model) and a format tag: enough on
  its own to rebuild the model and decode with it.

DeepSpeed writes the model in pieces (``mp_rank_00_model_states.pt`` without
experts, one file per global expert); ``engine.deepspeed_moe`` owns that
layout and reads it back with its ``load_file`` (weights and plain data only,
never code from the file), so ZeRO stage and ep_size do not matter here: model
weights are whole in those files for ZeRO 0-2.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from moe_asr.data.tokenizer import Tokenizer
from moe_asr.run.config import ExperimentConfig, load_config
from moe_asr.run.files import load_file
from moe_asr.run.layout import CHECKPOINTS, CONFIG, LATEST, MANIFEST, MODEL_FILE, read_deepspeed_model
from moe_asr.model.u2pp import U2PPModel, build_model
from moe_asr.schema import ConfigError, from_dict, to_dict

FORMAT = "moe-asr/model/1"


@dataclass
class LoadedModel:
    model: U2PPModel       # eval mode, fp32, on the requested device
    config: ExperimentConfig
    tokenizer: Tokenizer   # ids <-> text, as in training
    source: Path           # the consolidated file or the checkpoint tag directory read


@dataclass
class ModelState:
    """A trained model as data: what :func:`save_model` writes and the converters pass around."""

    state: dict[str, Tensor]  # experts stacked, fp32, CPU
    config: ExperimentConfig
    tokenizer: Tokenizer
    source: Path
    extra: dict[str, Any]     # other entries of a consolidated file (the training state, ...)


def _tag_dir(path: Path, tag: Optional[str]) -> tuple[Path, Path]:
    """``(tag directory, train.yaml)`` for a run, checkpoints or tag directory."""
    if (path / MODEL_FILE).is_file():
        if tag is not None:
            raise ValueError(f"{path}: is already checkpoint {path.name!r}; --tag {tag} does not apply")
        return _complete(path), path.parent.parent / CONFIG
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if not (root / LATEST).is_file() and not any((d / MODEL_FILE).is_file() for d in root.iterdir()):
        raise FileNotFoundError(f"{path}: not a run directory, a checkpoints directory or a checkpoint "
                                f"(no checkpoints/, {LATEST} or {MODEL_FILE})")
    if tag is None:
        if not (root / LATEST).is_file():
            tags = sorted(d.name for d in root.iterdir() if (d / MODEL_FILE).is_file())
            raise FileNotFoundError(f"{root}: no {LATEST} file; pick a tag: {tags}")
        tag = (root / LATEST).read_text().strip()
    tag_dir = root / tag
    if not (tag_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{tag_dir}: no such checkpoint (no {MODEL_FILE})")
    return _complete(tag_dir), root.parent / CONFIG


def _complete(tag_dir: Path) -> Path:
    """``tag_dir``, unless its save never finished (no manifest, which training writes last)."""
    if not (tag_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{tag_dir}: a partial checkpoint (no {MANIFEST}: its save did not finish)")
    return tag_dir


def read_model_state(path: str | Path, tag: Optional[str] = None) -> ModelState:
    """Everything needed to rebuild the trained model at ``path`` (see the module doc), without building it."""
    path = Path(path)
    if path.is_file():
        blob = load_file(path)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"{path}: not a moe-asr model file (format {FORMAT!r})")
        blob = dict(blob)
        try:
            config = from_dict(ExperimentConfig, blob.pop("config"))
        except ConfigError as e:
            raise ConfigError(f"{path}: config inside the model file: {e}") from None
        tok = blob.pop("tokenizer")
        tokenizer = Tokenizer(config.data.tokenizer, tok["symbol_table"], tok["sp_model"], config.model.sos_eos_id)
        state = _fp32(blob.pop("model"))
        del blob["format"]
        return ModelState(state, config, tokenizer, path, blob)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    tag_dir, config_path = _tag_dir(path, tag)
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: the run's config is missing (needed to rebuild the model "
                                f"of {tag_dir})")
    config = load_config(config_path)
    try:
        tokenizer = Tokenizer.from_config(config.data.tokenizer, config.model.sos_eos_id)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{config_path}: the run's tokenizer cannot be read: {e}") from None
    state = read_deepspeed_model(tag_dir, config.model.moe.num_experts)
    return ModelState(_fp32(state), config, tokenizer, tag_dir, {})


def build_trained_model(ms: ModelState) -> U2PPModel:
    """The model of ``ms.config`` holding ``ms.state``; a mismatch names the keys and shapes."""
    model = build_model(ms.config.model, load_cmvn=False)  # CMVN statistics come with the weights
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ms.state))
    unexpected = sorted(set(ms.state) - set(expected))
    wrong = [f"{k} {tuple(ms.state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in ms.state and ms.state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{ms.source}: weights do not fit the model of its config: missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''}, shape (file vs config) {wrong[:3]}")
    model.load_state_dict(ms.state)
    return model


def load_model(path: str | Path, tag: Optional[str] = None, device: str | torch.device = "cpu") -> LoadedModel:
    """The trained model at ``path`` with all its experts, in eval mode (see the module doc for ``path``)."""
    ms = read_model_state(path, tag)
    return LoadedModel(build_trained_model(ms).to(device).eval(), ms.config, ms.tokenizer, ms.source)


def save_model(path: str | Path, state: dict[str, Tensor], config: ExperimentConfig, tokenizer: Tokenizer,
               **extra: Any) -> Path:
    """Write a consolidated model file; it appears under ``path`` only once complete.

    ``extra`` entries are stored beside the model (the conversion tools add theirs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    blob = {"format": FORMAT, "model": _fp32(state), "config": to_dict(config),
            "tokenizer": {"symbol_table": tokenizer.symbol_table, "sp_model": tokenizer.sp_model}, **extra}
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def _fp32(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """bf16/fp16 training keeps half-precision module weights; decoding and conversion work in fp32."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
