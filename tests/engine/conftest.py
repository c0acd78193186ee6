"""Fixtures for the training tests: real FSDD shards and a launcher for multi-rank training runs.

Training uses four FSDD speakers; george and yweweler are held out of training
entirely. CV uses other recordings of the training speakers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from moe_asr.data.manifest import Utterance
from moe_asr.data.shards import SHARD_LIST, write_shards

REPO = Path(__file__).resolve().parents[2]
FSDD = (REPO / "../shared/data/fsdd/recordings").resolve()
DIGITS = "zero one two three four five six seven eight nine".split()
TRAIN_SPEAKERS = ("jackson", "lucas", "nicolas", "theo")
LETTERS = sorted({c for d in DIGITS for c in d})
UNITS = ["<blank>", "<unk>", "\u2581", *LETTERS, "<sos/eos>"]  # 19 symbols


@dataclass
class Corpus:
    train: Path
    cv: Path
    units: Path


def _utterances(indices: range) -> list[Utterance]:
    if not FSDD.is_dir():
        pytest.fail(f"real audio not found at {FSDD}: the shared data folder (../shared from the repo) is missing")
    utts = []
    for speaker in TRAIN_SPEAKERS:
        for digit in range(10):
            for i in indices:
                path = FSDD / f"{digit}_{speaker}_{i}.wav"
                utts.append(Utterance(path.stem, str(path), DIGITS[digit]))
    return utts


def build_corpus(root: Path, train_indices: range, cv_indices: range, per_shard: int) -> Corpus:
    write_shards(_utterances(train_indices), root / "train", per_shard)
    write_shards(_utterances(cv_indices), root / "cv", per_shard)
    units = root / "units.txt"
    units.write_text("".join(f"{t} {i}\n" for i, t in enumerate(UNITS)))
    return Corpus(root / "train" / SHARD_LIST, root / "cv" / SHARD_LIST, units)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Corpus:
    """160 training utterances (4 speakers x 10 digits x 4) in 8 shards, 40 CV utterances in 2."""
    return build_corpus(tmp_path_factory.mktemp("fsdd_small"), range(0, 4), range(45, 46), 20)


# A model small enough for many 2-rank runs on 2 cores, with every FFN an MoE.
SMALL_MODEL = {
    "model.vocab_size": len(UNITS), "model.input_dim": 80,
    "model.encoder.output_size": 32, "model.encoder.attention_heads": 2, "model.encoder.linear_units": 48,
    "model.encoder.num_blocks": 2, "model.encoder.cnn_module_kernel": 5,
    "model.decoder.attention_heads": 2, "model.decoder.linear_units": 48, "model.decoder.num_blocks": 1,
    "model.decoder.r_num_blocks": 1, "model.moe.num_experts": 4, "model.moe.top_k": 2,
}


def data_overrides(corpus: Corpus, max_frames: int = 3000) -> dict:
    return {"data.tokenizer.symbol_table": str(corpus.units), "data.num_workers": 1, "data.prefetch_factor": 2,
            "data.features.dither": 0.0, "data.batching.max_frames_in_batch": max_frames,
            "data.filters.max_frames": max_frames, "data.batching.shuffle_size": 50, "data.batching.sort_size": 20}


def train_cmd(corpus: Corpus, out_dir: Path, ds_config: str, overrides: dict, port: int, nproc: int = 2,
              config: str = "conf/tiny_moe.yaml", launcher: str = "torchrun",
              script: str = "launch/train.py") -> list[str]:
    bin_dir = Path(sys.executable).parent
    heads = {"torchrun": [str(bin_dir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port)],
             "deepspeed": [str(bin_dir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port)],
             "python": [sys.executable]}  # one plain process
    head = heads[launcher]
    cmd = [*head, script, "--config", config, "--deepspeed_config", ds_config,
           "--train-shards", str(corpus.train), "--cv-shards", str(corpus.cv), "--out-dir", str(out_dir)]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return cmd


def run_training(cmd: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def one_rank() -> None:
    """A one-rank gloo world in this process (DeepSpeed's expert groups need one).

    The launcher variables that ``init_distributed`` sets are removed again, so
    training runs started from the tests get a clean environment.
    """
    import torch.distributed as dist

    from moe_asr.engine.distributed import init_distributed

    if not dist.is_initialized():
        saved = dict(os.environ)
        init_distributed()
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
            if key not in saved:
                os.environ.pop(key, None)
