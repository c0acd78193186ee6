"""CV is computed on every CV utterance of every rank, also when the shards split unevenly over the ranks.

Training stops every rank at the first one out of data (so every step is a step of all ranks); CV must not:
with expert parallelism the ranks still run their forwards in step (a rank that has finished runs weightless
filler batches), and the logged CV loss is the one a single process computes over the whole CV set.
"""
from __future__ import annotations

import pytest
import torch

from moe_asr.checkpoint import load_model
from moe_asr.data.loader import build_loader
from moe_asr.data.shards import read_shard_list
from moe_asr.model.u2pp import LOSS_KEYS
from tests.engine.conftest import SMALL_MODEL, build_corpus, data_overrides, read_metrics, run_training, train_cmd

NO_RANDOMNESS = {"model.encoder.use_dynamic_chunk": False, "data.features.dither": 0.0}


@pytest.mark.slow
def test_two_expert_parallel_ranks_score_every_cv_utterance(tmp_path):
    # 120 CV utterances in shards of 50, 50 and 20: one rank reads 70, the other 50.
    corpus = build_corpus(tmp_path / "corpus", range(0, 2), range(45, 48), 50)
    assert len(read_shard_list(corpus.cv)) == 3
    run = tmp_path / "run"
    overrides = {**SMALL_MODEL, **data_overrides(corpus), **NO_RANDOMNESS, "parallel.ep_size": 2,
                 "train.max_steps": 1, "train.max_epochs": 1}
    run_training(train_cmd(corpus, run, "ds_configs/zero1_cpu.json", overrides, 29661))
    (record,) = [r for r in read_metrics(run) if "cv_loss" in r]
    skipped = sum(next(r for r in read_metrics(run) if "cv_data_skipped" in r)["cv_data_skipped"].values())
    assert skipped == 0 and record["cv_utterances"] == 120

    trained = load_model(run)
    loader = build_loader(trained.config.data, "cv", trained.tokenizer, rank=0, world_size=1)
    sums, n = torch.zeros(len(LOSS_KEYS), dtype=torch.float64), 0
    with torch.no_grad():
        trained.model.eval()
        for batch in loader:
            out = trained.model(batch.feats, batch.feats_lengths, batch.targets, batch.target_lengths)
            sums += torch.stack([out[k].double() * len(batch) for k in LOSS_KEYS])
            n += len(batch)
    assert n == 120
    for i, key in enumerate(LOSS_KEYS):
        assert record[f"cv_{key}"] == pytest.approx((sums[i] / n).item(), rel=1e-5), key
