"""Waveforms -> log-mel fbank for a whole batch at once, plus resampling, VTLP, channel EQ and spectral augmentation.

``torchaudio.compliance.kaldi.fbank`` rebuilds its window and mel matrix and
computes an unused energy on every call, and a per-utterance call is mostly
that overhead for short utterances. ``Fbank`` computes the same numbers
(tested equal) with the window and mel matrix cached and one FFT over the
frames of every utterance in the batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torchaudio
from torchaudio.compliance.kaldi import get_mel_banks

from moe_asr.data.config import (VTLN_HIGH, VTLN_LOW, ChannelEqConfig, EdgeCropConfig, FeatureConfig, SpecAugConfig,
                                 SpecSubConfig)

# Kaldi works on 16-bit integer sample values: dither 1.0 means one LSB.
WAVE_SCALE = float(1 << 15)
_PREEMPHASIS = 0.97
_EPS = torch.finfo(torch.float32).eps


def _rate_pair(source_rate: int, target_rate: int, speed: float) -> tuple[int, int]:
    """Speed perturbation as resampling: audio at ``rate`` played as if recorded at ``rate * speed``."""
    orig = int(round(source_rate * speed))
    g = math.gcd(orig, target_rate)
    return orig // g, target_rate // g


def resampled_length(num_samples: int, source_rate: int, target_rate: int, speed: float = 1.0) -> int:
    """Output length of :func:`resample` (torchaudio's formula), known before decoding."""
    orig, new = _rate_pair(source_rate, target_rate, speed)
    if orig == new:
        return num_samples
    return math.ceil(new * num_samples / orig)


@lru_cache(maxsize=64)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(orig, new)


def resample(wave: torch.Tensor, source_rate: int, target_rate: int, speed: float = 1.0) -> torch.Tensor:
    """Resample to ``target_rate`` and change speed by ``speed`` in one pass (cached sinc kernel)."""
    orig, new = _rate_pair(source_rate, target_rate, speed)
    if orig == new:
        return wave
    return _resampler(orig, new)(wave)


def num_frames(num_samples: int, cfg: FeatureConfig) -> int:
    """Fbank frames of ``num_samples`` at ``cfg.sample_rate`` (Kaldi's framing, ``cfg.snip_edges``)."""
    if not cfg.snip_edges:
        return (num_samples + cfg.window_shift // 2) // cfg.window_shift
    if num_samples < cfg.window_size:
        return 0
    return 1 + (num_samples - cfg.window_size) // cfg.window_shift


class Fbank:
    """Kaldi log-mel fbank of a list of waveforms, equal to ``torchaudio.compliance.kaldi.fbank``.

    Kaldi's options as WeNet uses them (povey window, preemphasis 0.97, DC
    removal, power spectrum), framing, filterbank edges and an optional floor
    from ``cfg``; waveforms are float in [-1, 1] and scaled by 2^15 here.
    """

    def __init__(self, cfg: FeatureConfig):
        self.cfg = cfg
        self.window_size, self.window_shift = cfg.window_size, cfg.window_shift
        self.fft_size = 1 << (self.window_size - 1).bit_length()
        self.window = torch.hann_window(self.window_size, periodic=False).pow(0.85)
        self._mels: dict[float, torch.Tensor] = {}
        self.mel = self.mel_bank(1.0)
        self.floor = torch.full((cfg.num_mel_bins,), _EPS)
        if cfg.mel_floor_db is not None:
            # White noise N(0, 1) through a linear chain M gives E|X_k|^2 = sum_n |M_kn|^2: the power
            # spectra of the unit impulses, summed.
            noise = self._power(torch.eye(self.window_size)).sum(0) @ self.mel
            self.floor = (noise * 10 ** (cfg.mel_floor_db / 10)).clamp_min(_EPS)

    @property
    def log_floor(self) -> torch.Tensor | None:
        """The floor per mel bin on log-mel features (``cfg.mel_floor_db``), None without one."""
        return None if self.cfg.mel_floor_db is None else self.floor.log()

    def mel_bank(self, warp: float) -> torch.Tensor:
        """[fft_size // 2 + 1, num_mel_bins] for a VTLN warp factor (Kaldi's cutoffs); the Nyquist bin weighs 0."""
        if warp not in self._mels:
            cfg = self.cfg
            mel, _ = get_mel_banks(cfg.num_mel_bins, self.fft_size, float(cfg.sample_rate), cfg.low_freq,
                                   cfg.high_freq, VTLN_LOW, VTLN_HIGH, warp)
            self._mels[warp] = torch.nn.functional.pad(mel, (0, 1)).T.contiguous()
        return self._mels[warp]

    def _frames(self, wave: torch.Tensor, n: int) -> torch.Tensor:
        """[n, window_size] view of ``wave``; without snip_edges frame f starts at f * shift + shift // 2 -
        window // 2 and the wave is mirrored at its ends (x[-1] = x[0]), as Kaldi does."""
        if not self.cfg.snip_edges:
            start = self.window_shift // 2 - self.window_size // 2
            index = torch.arange(start, start + (n - 1) * self.window_shift + self.window_size) % (2 * wave.numel())
            wave = wave[torch.where(index < wave.numel(), index, 2 * wave.numel() - 1 - index)]
        return wave.as_strided((n, self.window_size), (self.window_shift, 1))

    def _power(self, x: torch.Tensor) -> torch.Tensor:
        """Power spectra [N, fft_size // 2 + 1] of frames [N, window_size] (``x`` is overwritten):
        DC removal, preemphasis, window, FFT, as Kaldi does."""
        x -= x.mean(dim=1, keepdim=True)
        # Preemphasis (x[j] - 0.97 x[j-1], x[-1] := x[0]) and the window, written straight into
        # the zero-padded FFT buffer: one pass each, no temporaries.
        buf = x.new_zeros(x.shape[0], self.fft_size)
        torch.sub(x[:, 1:], _PREEMPHASIS * x[:, :-1], out=buf[:, 1:self.window_size])
        buf[:, 0] = x[:, 0] * (1 - _PREEMPHASIS)
        buf[:, :self.window_size] *= self.window
        spec = torch.fft.rfft(buf)
        return torch.addcmul(spec.real.square(), spec.imag, spec.imag)  # |X|^2 without the sqrt of abs()

    def __call__(self, waves: list[torch.Tensor], dither: float = 0.0, generator: torch.Generator | None = None,
                 warps: Sequence[float] | None = None) -> list[torch.Tensor]:
        """Features of each wave; ``warps`` (one VTLN factor per wave) warps its mel bank (VTLP)."""
        counts = [num_frames(w.numel(), self.cfg) for w in waves]
        frames = []
        for w, n in zip(waves, counts):
            if n == 0:
                continue
            w = w * WAVE_SCALE
            if dither:
                # Kaldi draws noise per frame; drawing it per sample gives every frame sample the same
                # N(0, dither^2) at 1/2.5 of the cost (frames overlap by 60%).
                w += torch.randn(w.shape, generator=generator) * dither
            frames.append(self._frames(w, n))
        if not frames:
            return [torch.empty(0, self.cfg.num_mel_bins) for _ in waves]
        power = self._power(torch.cat(frames))
        if warps is None or all(a == 1.0 for a in warps):
            feats = torch.mm(power, self.mel)
        else:
            feats = torch.cat([torch.mm(p, self.mel_bank(a)) for p, a in zip(power.split(counts), warps)])
        return list(torch.maximum(feats, self.floor, out=feats).log_().split(counts))


def edge_crop(feats: list[torch.Tensor], cfg: EdgeCropConfig, min_keep: int,
              generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Each ``[T, F]`` utterance without a random count of its first and last frames (see EdgeCropConfig);
    none is cut below ``min_keep`` frames (the length filter's minimum, which the model's front end needs)."""
    out = []
    for f in feats:
        n = f.shape[0]
        most = max(0, min(cfg.max_frames, int(cfg.max_fraction * n), (n - min_keep) // 2))
        start, end = torch.randint(0, most + 1, (2,), generator=generator).tolist()
        out.append(f[start:n - end])
    return out


def channel_eq(feats: torch.Tensor, lengths: torch.Tensor, cfg: ChannelEqConfig,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Add one random smooth curve over the bins to every real frame of each utterance of ``[B, T, F]``.

    Log-mel is the natural log of power, so ``x`` dB is ``x * ln(10) / 10`` here; padding stays as it is.
    """
    b, t, f = feats.shape
    k = torch.arange(1, cfg.num_terms + 1, dtype=feats.dtype)
    amp = (torch.rand(b, cfg.num_terms, generator=generator, dtype=feats.dtype) * 2 - 1) * (cfg.max_db / k)
    basis = torch.cos(math.pi * k[:, None] * (torch.arange(f, dtype=feats.dtype)[None, :] + 0.5) / f)
    curve = (amp @ basis) * (math.log(10) / 10)
    valid = torch.arange(t)[None, :] < lengths[:, None]
    return feats + curve[:, None, :] * valid[:, :, None]


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor, cfg: SpecAugConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero ``num_t_mask`` time spans (1..max_t frames) and ``num_f_mask`` bands (1..max_f bins).

    Each span starts uniformly inside the utterance's own length and is cut at
    its end, as in WeNet; done for the padded batch [B, T, F] at once.
    """
    b, t, f = feats.shape

    def spans(n: int, limit: torch.Tensor, width: int, size: int) -> torch.Tensor:
        if n == 0 or width == 0:
            return torch.zeros(b, size, dtype=torch.bool)
        start = (torch.rand(b, n, generator=generator) * limit[:, None]).long()
        end = start + torch.randint(1, width + 1, (b, n), generator=generator)
        pos = torch.arange(size)[None, None, :]
        return ((pos >= start[..., None]) & (pos < end[..., None])).any(dim=1)

    time_mask = spans(cfg.num_t_mask, lengths.clamp_min(1).float(), cfg.max_t, t)
    freq_mask = spans(cfg.num_f_mask, torch.full((b,), float(f)), cfg.max_f, f)
    return feats.masked_fill(time_mask[:, :, None] | freq_mask[:, None, :], 0.0)


def spec_sub(feats: torch.Tensor, lengths: torch.Tensor, cfg: SpecSubConfig,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Overwrite ``num_t_sub`` spans [s, s+len) with the earlier span [s-p, s+len-p), 0 <= p <= s.

    Every span copies from the original features (later spans win where they
    overlap), WeNet's SpecSub semantics, as one gather over the padded batch.
    """
    b, t, _ = feats.shape
    pos = torch.arange(t)[None, :].expand(b, t)
    source = pos.clone()
    limit = lengths.clamp_min(1).float()
    for _ in range(cfg.num_t_sub):
        start = (torch.rand(b, generator=generator) * limit).long()
        end = torch.minimum(start + torch.randint(1, cfg.max_t + 1, (b,), generator=generator), lengths)
        shift = (torch.rand(b, generator=generator) * (start + 1).float()).long()
        inside = (pos >= start[:, None]) & (pos < end[:, None])
        source = torch.where(inside, pos - shift[:, None], source)
    return feats.gather(1, source[:, :, None].expand_as(feats))
