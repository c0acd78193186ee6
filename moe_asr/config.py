"""The experiment config: one YAML file with a section per stage of the data flow.

Each section's dataclass lives beside the code that uses it; this module only
composes them, so `load_config("conf/tiny_moe.yaml")` validates everything at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moe_asr.data.config import DataConfig
from moe_asr.engine.config import TrainConfig
from moe_asr.model.config import ModelConfig
from moe_asr.schema import ConfigError, dump_yaml, load_yaml

__all__ = ["ExperimentConfig", "ConfigError", "load_config", "save_config"]


@dataclass
class ExperimentConfig:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path) -> ExperimentConfig:
    return load_yaml(path, ExperimentConfig)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    dump_yaml(config, path)
