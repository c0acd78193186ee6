"""CMVN over shards equals statistics of torchaudio's Kaldi fbank on the same audio; parallel == serial."""
from __future__ import annotations

import json

import numpy as np
import torch
from torchaudio.compliance.kaldi import fbank as kaldi_fbank

from moe_asr.cli import main as cli
from moe_asr.data.audio import decode_audio
from moe_asr.data.cmvn import compute_cmvn
from moe_asr.data.config import FeatureConfig
from moe_asr.data.features import resample
from moe_asr.data.shards import read_shard, read_shard_list
from moe_asr.data.stats import DataStats


def test_cmvn_matches_reference_and_parallel_matches_serial(corpus, tmp_path):
    shards = read_shard_list(corpus.shard_list)
    cfg = FeatureConfig()
    feats = []
    for shard in shards:
        for s in read_shard(shard, DataStats()):
            wave, sr = decode_audio(s.audio)
            w = resample(torch.from_numpy(wave), sr, 16000)
            feats.append(kaldi_fbank(w[None] * 32768, num_mel_bins=80, dither=0.0, energy_floor=0.0).double())
    ref = torch.cat(feats)
    serial = compute_cmvn(shards, cfg, num_workers=1)
    parallel = compute_cmvn(shards, cfg, num_workers=2)
    assert serial.frames == parallel.frames == ref.shape[0] and serial.utterances == len(corpus.keys)
    np.testing.assert_allclose(serial.sum, ref.sum(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(serial.sum_sq, ref.square().sum(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(parallel.sum, serial.sum, rtol=1e-12)

    out = tmp_path / "cmvn.json"
    assert cli(["compute-cmvn", "--shards", str(corpus.shard_list), "--out", str(out), "--num-workers", "2"]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"mean_stat", "var_stat", "frame_num"} and len(data["mean_stat"]) == 80
    n = data["frame_num"]
    mean = torch.tensor(data["mean_stat"]) / n
    var = torch.tensor(data["var_stat"]) / n - mean.square()
    torch.testing.assert_close(mean.float(), ref.mean(0).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(var.float(), ref.var(0, unbiased=False).float(), rtol=1e-4, atol=1e-3)


def test_the_encoder_loads_the_cmvn_file(corpus, tmp_path):
    from moe_asr.data.cmvn import save_cmvn
    from moe_asr.model.cmvn import GlobalCMVN
    stats = compute_cmvn(read_shard_list(corpus.shard_list)[:2], FeatureConfig())
    save_cmvn(stats, tmp_path / "cmvn.json")
    cmvn = GlobalCMVN.from_json(tmp_path / "cmvn.json", 80)
    torch.testing.assert_close(cmvn.mean.double(), torch.from_numpy(stats.sum / stats.frames), rtol=1e-6, atol=1e-5)
