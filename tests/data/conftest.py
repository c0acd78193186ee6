"""Shared fixtures: real FSDD recordings from ../shared and tiny shard corpora built from them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from moe_asr.data.config import DataConfig
from moe_asr.data.manifest import Utterance
from moe_asr.data.shards import SHARD_LIST, write_shards
from moe_asr.data.tokenizer import Tokenizer
from moe_asr.schema import from_dict

FSDD = (Path(__file__).resolve().parents[2] / "../shared/data/fsdd/recordings").resolve()
DIGITS = "zero one two three four five six seven eight nine".split()


def fsdd_files(n: int, start: int = 0) -> list[Path]:
    """``n`` real recordings spread over digits and speakers (deterministic)."""
    if not FSDD.is_dir():
        pytest.fail(f"real audio not found at {FSDD}: the shared data folder (../shared from the repo) is missing")
    files = sorted(FSDD.glob("*.wav"))
    return files[start * 7 % len(files)::37][:n]


def transcript(path: Path) -> str:
    return DIGITS[int(path.name.split("_")[0])]


@dataclass
class Corpus:
    shard_list: Path
    units: Path
    keys: list[str]

    def config(self, **overrides) -> DataConfig:
        base = {"train_shards": str(self.shard_list), "num_workers": 0,
                "tokenizer": {"symbol_table": str(self.units)},
                "filters": {"min_frames": 1}}
        for k, v in overrides.items():
            if isinstance(v, dict):
                base[k] = {**base.get(k, {}), **v}
            else:
                base[k] = v
        return from_dict(DataConfig, base)

    def tokenizer(self, cfg: DataConfig) -> Tokenizer:
        return Tokenizer.from_config(cfg.tokenizer)


def build_corpus(root: Path, n: int, per_shard: int) -> Corpus:
    files = fsdd_files(n)
    utts = [Utterance(f.stem, str(f), transcript(f)) for f in files]
    write_shards(utts, root / "shards", per_shard)
    units = root / "units.txt"
    letters = sorted({c for d in DIGITS for c in d})
    units.write_text("".join(f"{t} {i}\n" for i, t in enumerate(["<blank>", "<unk>", "\u2581", *letters, "<sos/eos>"])))
    return Corpus(root / "shards" / SHARD_LIST, units, [u.key for u in utts])


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """40 real utterances in 8 shards of 5."""
    return build_corpus(tmp_path_factory.mktemp("corpus"), 40, 5)
