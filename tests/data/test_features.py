"""Fbank equals torchaudio's Kaldi fbank; length predictions are exact; augmentations stay in bounds."""
from __future__ import annotations

import dataclasses
import math

import pytest
import soundfile as sf
import torch
import torchaudio
from torchaudio.compliance.kaldi import fbank as kaldi_fbank

from moe_asr.data.config import ChannelEqConfig, EdgeCropConfig, FeatureConfig, SpecAugConfig, SpecSubConfig
from moe_asr.data.features import (Fbank, channel_eq, edge_crop, num_frames, resample, resampled_length,
                                    spec_augment, spec_sub)

from .conftest import fsdd_files


def _real_waves(n: int, rate: int) -> list[torch.Tensor]:
    waves = [torch.from_numpy(sf.read(f, dtype="float32")[0]) for f in fsdd_files(n)]
    return [torchaudio.functional.resample(w, 8000, rate) for w in waves]


@pytest.mark.parametrize("rate,mels,shift,options", [
    (16000, 80, 10.0, {}), (8000, 40, 12.5, {}),
    (8000, 40, 10.0, {"snip_edges": False, "high_freq": -400.0}),           # sherpa-onnx's defaults
    (16000, 80, 12.5, {"snip_edges": False, "low_freq": 60.0, "high_freq": 7000.0})])
def test_fbank_equals_torchaudio_kaldi_fbank(rate, mels, shift, options):
    cfg = FeatureConfig(sample_rate=rate, num_mel_bins=mels, frame_shift_ms=shift, **options)
    waves = _real_waves(5, rate) + [torch.randn(cfg.window_size) * 0.1, torch.randn(cfg.window_size - 1)]
    ours = Fbank(cfg)(waves)
    for w, got in zip(waves, ours):
        assert got.shape[0] == num_frames(w.numel(), cfg)
        if w.numel() < cfg.window_size:  # torchaudio refuses audio shorter than a window
            # Kaldi's count: none that fit (snip_edges), else one per shift started
            n = 0 if cfg.snip_edges else (w.numel() + cfg.window_shift // 2) // cfg.window_shift
            assert got.shape == (n, mels)
            continue
        ref = kaldi_fbank(w[None] * 32768, num_mel_bins=mels, frame_length=25.0, frame_shift=shift,
                          dither=0.0, energy_floor=0.0, sample_frequency=rate, **options)
        # |X|^2 is computed without abs()'s sqrt, so float32 rounding differs slightly.
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-4)


def test_mel_floor_is_its_db_above_the_dither_of_one_step():
    """The floor per bin is the mean mel energy that dither N(0, 1) alone gives (computed, not drawn)."""
    cfg = FeatureConfig(sample_rate=8000, num_mel_bins=40, mel_floor_db=0.0)
    silence = [torch.zeros(8000 * 60)]
    dither = Fbank(dataclasses.replace(cfg, mel_floor_db=None))(silence, 1.0, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(Fbank(cfg).log_floor, dither.exp().mean(0).log(), rtol=0, atol=0.05)
    lifted = Fbank(dataclasses.replace(cfg, mel_floor_db=30.0)).log_floor
    torch.testing.assert_close(lifted - Fbank(cfg).log_floor, torch.full((40,), 3 * math.log(10)))
    assert Fbank(dataclasses.replace(cfg, mel_floor_db=None)).log_floor is None


def test_mel_floor_makes_features_all_but_deaf_to_that_dither():
    """A runtime that dithers one 16-bit step (sherpa-onnx's offline WeNet CTC recognizer) moves a
    40 dB-floored feature by under 0.05; without the floor, quiet bins move by whole units."""
    waves = _real_waves(20, 8000)
    moved = {}
    for db in (None, 40.0):
        fbank = Fbank(FeatureConfig(sample_rate=8000, num_mel_bins=40, mel_floor_db=db))
        clean = torch.cat(fbank(waves))
        dithered = torch.cat(fbank(waves, dither=1.0, generator=torch.Generator().manual_seed(0)))
        moved[db] = (dithered - clean).abs().max().item()
        if db is not None:
            assert (clean >= fbank.log_floor).all()
            torch.testing.assert_close(clean, torch.maximum(torch.cat(Fbank(dataclasses.replace(
                fbank.cfg, mel_floor_db=None))(waves)), fbank.log_floor))
    assert moved[40.0] < 0.05 and moved[None] > 1.0, moved


@pytest.mark.parametrize("options,key", [({"high_freq": 4500.0}, "high_freq"), ({"high_freq": -4000.0}, "high_freq"),
                                         ({"low_freq": 150.0, "vtlp": [0.9, 1.1]}, "vtlp"),
                                         ({"high_freq": -600.0, "vtlp": [1.1]}, "vtlp"),
                                         ({"mel_floor_db": -1.0}, "mel_floor_db")])
def test_bad_filterbank_options_are_refused_naming_the_key(options, key):
    with pytest.raises(ValueError, match=key):
        FeatureConfig(sample_rate=8000, num_mel_bins=40, **options)


def test_vtlp_equals_kaldi_vtln_warp_per_utterance():
    """Each wave gets its own warp in one batched call, as Kaldi's fbank with that ``vtln_warp`` computes."""
    cfg = FeatureConfig(sample_rate=8000, num_mel_bins=40)
    waves, warps = _real_waves(4, 8000), [0.85, 1.0, 1.15, 1.2]
    ours = Fbank(cfg)(waves, warps=warps)
    for w, a, got in zip(waves, warps, ours):
        ref = kaldi_fbank(w[None] * 32768, num_mel_bins=40, dither=0.0, energy_floor=0.0, sample_frequency=8000,
                          vtln_warp=a)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-4)
    assert not torch.allclose(ours[0], Fbank(cfg)(waves[:1])[0], atol=0.1)  # the warp does change the bank


def test_channel_eq_is_one_smooth_bounded_curve_per_utterance():
    feats, lengths = torch.randn(3, 20, 40), torch.tensor([20, 12, 5])
    cfg = ChannelEqConfig(max_db=10.0, num_terms=3)
    out = channel_eq(feats, lengths, cfg, torch.Generator().manual_seed(0))
    diff = out - feats
    bound = sum(10.0 / k for k in (1, 2, 3)) * math.log(10) / 10
    for b, n in enumerate(lengths.tolist()):
        curve = diff[b, 0]
        torch.testing.assert_close(diff[b, :n], curve.expand(n, 40))  # the same gain on every real frame
        if n < 20:
            assert diff[b, n:].abs().max() == 0                        # padding untouched
        assert 0 < curve.abs().max() <= bound
        assert (curve[1:] - curve[:-1]).abs().max() < 0.2 * bound     # smooth over the bins
    assert not torch.allclose(diff[0, 0], diff[1, 0])
    again = channel_eq(feats, lengths, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_edge_crop_cuts_each_end_within_its_bounds_and_keeps_the_middle():
    cfg = EdgeCropConfig(enabled=True, max_frames=15, max_fraction=0.3)
    feats = [torch.arange(n * 2, dtype=torch.float32).view(n, 2) for n in (12, 40, 300) for _ in range(200)]
    out = edge_crop(feats, cfg, min_keep=10, generator=torch.Generator().manual_seed(0))
    cut_starts = set()
    for f, g in zip(feats, out):
        n, m = f.shape[0], g.shape[0]
        start = int(g[0, 0]) // 2
        torch.testing.assert_close(g, f[start:start + m], rtol=0, atol=0)  # one contiguous run of frames
        most = min(15, int(0.3 * n), (n - 10) // 2)
        assert start <= most and n - start - m <= most and m >= 10
        cut_starts.add((n, start))
    # Every length is cut (the 12-frame ones only as far as min_keep lets), long ones by at most max_frames.
    assert {s for n, s in cut_starts if n == 300} == set(range(16))
    assert {s for n, s in cut_starts if n == 12} == {0, 1}
    again = edge_crop(feats, cfg, min_keep=10, generator=torch.Generator().manual_seed(0))
    assert [g.shape for g in again] == [g.shape for g in out]


def test_dither_is_random_but_seeded():
    fb = Fbank(FeatureConfig())
    w = _real_waves(1, 16000)
    a = fb(w, 1.0, torch.Generator().manual_seed(1))[0]
    b = fb(w, 1.0, torch.Generator().manual_seed(1))[0]
    c = fb(w, 1.0, torch.Generator().manual_seed(2))[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c) and not torch.equal(a, fb(w)[0])


@pytest.mark.parametrize("source", [8000, 16000, 22050, 44100])
@pytest.mark.parametrize("speed", [0.9, 1.0, 1.1])
def test_resampled_length_is_predicted_exactly(source, speed):
    w = torch.randn(source // 3 + 7)
    out = resample(w, source, 16000, speed)
    assert out.numel() == resampled_length(w.numel(), source, 16000, speed)
    if source == 16000 and speed == 1.0:
        assert out is w
    else:  # speed s: the utterance lasts 1/s as long
        assert abs(out.numel() / 16000 - w.numel() / source / speed) < 1e-3


def test_resample_equals_torchaudio():
    w = _real_waves(1, 8000)[0]
    torch.testing.assert_close(resample(w, 8000, 16000), torchaudio.functional.resample(w, 8000, 16000))


def test_spec_augment_masks_within_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 120, 80) + 1.0
    lengths = torch.tensor([120, 100, 60, 30, 5, 1])
    x[torch.arange(120)[None, :] >= lengths[:, None]] = 0
    cfg = SpecAugConfig(num_t_mask=2, num_f_mask=2, max_t=20, max_f=10)
    masked_bins = 0
    for _ in range(20):
        y = spec_augment(x, lengths, cfg, g)
        assert (y[torch.arange(120)[None, :] >= lengths[:, None]] == 0).all()  # padding stays zero
        for b, n in enumerate(lengths.tolist()):
            yb, xb = y[b, :n], x[b, :n]
            t_masked = (yb == 0).all(dim=1)
            assert t_masked.sum() <= 2 * 20
            if t_masked.all():
                continue
            f_masked = (yb[~t_masked] == 0).all(dim=0)
            assert f_masked.sum() <= 2 * 10
            masked_bins += int(f_masked.sum())
            # nothing but whole frames and whole bins is touched
            keep = ~t_masked[:, None] & ~f_masked[None, :]
            assert torch.equal(yb[keep], xb[keep])
    assert masked_bins > 0
    assert torch.equal(spec_augment(x, lengths, SpecAugConfig(num_t_mask=0, num_f_mask=0), g), x)


def test_spec_sub_copies_earlier_spans_only():
    g = torch.Generator().manual_seed(0)
    t = 50
    x = torch.arange(t, dtype=torch.float32)[None, :, None].expand(3, t, 4).clone()  # row value = its index
    lengths = torch.tensor([50, 30, 10])
    cfg = SpecSubConfig(max_t=8, num_t_sub=3)
    changed = 0
    for _ in range(30):
        y = spec_sub(x, lengths, cfg, g)
        src = y[:, :, 0]
        assert (src <= torch.arange(t)[None, :]).all()  # always from the same or an earlier frame
        assert (src == x[:, :, 0])[torch.arange(t)[None, :] >= lengths[:, None]].all()  # padding untouched
        moved = src != x[:, :, 0]
        changed += int(moved.sum())
        assert moved.sum(dim=1).le(3 * 8).all()
        assert (y == y[:, :, :1]).all()  # whole frames are copied
    assert changed > 0
