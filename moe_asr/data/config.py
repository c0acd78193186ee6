"""Data section of the experiment config: shards, features, augmentation, filters, batching, tokens.

Defaults follow WeNet's U2++ recipes (80-dim fbank 25/10 ms, dither 1.0 in
training, SpecAugment 2x50 time / 2x10 freq masks, dynamic batching by frames)
so a config that only names the shard lists and the symbol table trains like
WeNet would. Training-only randomness (dither, speed perturbation, VTLP, channel EQ,
edge crop, SpecAugment, SpecSub, shuffling) is switched off automatically for evaluation data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from moe_asr.schema import check


# Kaldi's VTLN cutoffs (vtln-low, vtln-high: an offset from Nyquist), as VTLP uses them.
VTLN_LOW, VTLN_HIGH = 100.0, -500.0


@dataclass
class FeatureConfig:
    """Waveform -> log-mel fbank, exactly as ``torchaudio.compliance.kaldi.fbank`` computes it."""

    # Model input rate; audio at any other rate is resampled to it.
    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    # Gaussian noise added to every frame before the FFT (training only).
    dither: float = 1.0
    # Speed factors drawn uniformly per utterance in training; [1.0] disables it.
    speed_perturb: list[float] = field(default_factory=lambda: [1.0])
    # VTLP: Kaldi VTLN warp factors of the mel bank drawn uniformly per utterance in training;
    # [1.0] disables it. It moves formants as another vocal tract length would, without changing
    # tempo, so a few real speakers and male synthetic voices also stand for higher and lower voices.
    vtlp: list[float] = field(default_factory=lambda: [1.0])
    # Edges of the mel filterbank in Hz; high_freq <= 0 is an offset from Nyquist (Kaldi's rule).
    # Kaldi's and WeNet's 20 and 0 by default; sherpa-onnx's recognizers use 20 and -400.
    low_freq: float = 20.0
    high_freq: float = 0.0
    # Kaldi's framing: true keeps the frames that fit inside the audio (Kaldi, torchaudio, WeNet);
    # false puts a frame every shift from the start, the audio mirrored at both ends (sherpa-onnx).
    snip_edges: bool = True
    # Floor on every mel bin's energy, in dB above what dither of one 16-bit step (N(0, 1) on the
    # 2^15-scaled wave) gives that bin; null: no floor. Below it a bin says nothing that survives a
    # runtime that dithers (sherpa-onnx's offline WeNet CTC recognizer always adds that dither).
    mel_floor_db: Optional[float] = None

    def __post_init__(self) -> None:
        check(self.sample_rate >= 1000, "sample_rate", f"must be >= 1000 Hz, got {self.sample_rate}")
        check(self.num_mel_bins >= 1, "num_mel_bins", "must be >= 1")
        check(0 < self.frame_shift_ms <= self.frame_length_ms, "frame_shift_ms",
              "must be > 0 and <= frame_length_ms")
        check(self.dither >= 0, "dither", "must be >= 0")
        check(len(self.speed_perturb) >= 1 and all(0.5 <= s <= 2.0 for s in self.speed_perturb),
              "speed_perturb", f"needs one or more factors in [0.5, 2.0], got {self.speed_perturb}")
        check(len(self.vtlp) >= 1 and all(0.7 <= a <= 1.4 for a in self.vtlp),
              "vtlp", f"needs one or more warp factors in [0.7, 1.4], got {self.vtlp}")
        nyquist = self.sample_rate / 2
        check(0 <= self.low_freq < nyquist, "low_freq", f"must be in [0, {nyquist:g}) Hz, got {self.low_freq}")
        check(self.low_freq < self.mel_high_freq <= nyquist, "high_freq",
              f"{self.high_freq} puts the filterbank's top at {self.mel_high_freq:g} Hz: it must lie above "
              f"low_freq ({self.low_freq:g}) and at most at Nyquist ({nyquist:g}); <= 0 counts from Nyquist")
        warps_inside = self.low_freq < VTLN_LOW and nyquist + VTLN_HIGH < self.mel_high_freq
        check(all(a == 1.0 for a in self.vtlp) or warps_inside, "vtlp",
              f"warps the bank between {VTLN_LOW:g} Hz and Nyquist - {-VTLN_HIGH:g} Hz (Kaldi's VTLN cutoffs), "
              f"which must lie inside low_freq..high_freq ({self.low_freq:g}..{self.mel_high_freq:g})")
        check(self.mel_floor_db is None or self.mel_floor_db >= 0, "mel_floor_db", "must be >= 0 (or null)")

    @property
    def mel_high_freq(self) -> float:
        """The filterbank's top in Hz (``high_freq`` resolved against Nyquist)."""
        return self.high_freq if self.high_freq > 0 else self.sample_rate / 2 + self.high_freq

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * self.frame_length_ms * 0.001)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms * 0.001)


@dataclass
class SpecAugConfig:
    """Time and frequency masks (zeros) on training features."""

    enabled: bool = True
    num_t_mask: int = 2
    num_f_mask: int = 2
    max_t: int = 50
    max_f: int = 10

    def __post_init__(self) -> None:
        check(min(self.num_t_mask, self.num_f_mask, self.max_t, self.max_f) >= 0, "num_t_mask",
              "mask counts and widths must be >= 0")


@dataclass
class SpecSubConfig:
    """Replace random time spans with an earlier span of the same utterance (WeNet's SpecSub)."""

    enabled: bool = False
    max_t: int = 20
    num_t_sub: int = 3

    def __post_init__(self) -> None:
        check(self.max_t >= 1 and self.num_t_sub >= 0, "max_t", "needs max_t >= 1 and num_t_sub >= 0")


@dataclass
class ChannelEqConfig:
    """A random smooth gain curve over the mel bins per training utterance: another microphone or line.

    A linear channel multiplies the power spectrum, so in log-mel it adds one curve to every frame;
    the curve is ``sum_k a_k cos(pi k (m + 1/2) / F)``, k = 1..num_terms, ``a_k`` uniform in
    ``+-max_db / k`` (dB of power): tilts and broad bumps, as microphones and lines differ.
    """

    enabled: bool = False
    max_db: float = 10.0
    num_terms: int = 3

    def __post_init__(self) -> None:
        check(self.max_db >= 0, "max_db", "must be >= 0")
        check(self.num_terms >= 1, "num_terms", "must be >= 1")


@dataclass
class EdgeCropConfig:
    """Cut a random number of frames off both ends of each training utterance.

    Recordings trimmed of their silence are often trimmed into their first and last
    consonants (a "six" whose /s/ is gone is a short vowel): each end loses
    ``uniform{0..min(max_frames, max_fraction * T)}`` frames, drawn independently, so the
    model also learns words from what is left of them. ``max_frames`` keeps a long
    utterance from losing a whole word.
    """

    enabled: bool = False
    max_frames: int = 10
    max_fraction: float = 0.2

    def __post_init__(self) -> None:
        check(self.max_frames >= 0, "max_frames", "must be >= 0")
        check(0 <= self.max_fraction < 0.5, "max_fraction", f"must be in [0, 0.5), got {self.max_fraction}")


@dataclass
class FilterConfig:
    """Utterances outside these limits are dropped (and counted) before batching."""

    min_frames: int = 10
    max_frames: int = 10240
    min_tokens: int = 1
    max_tokens: int = 200
    # tokens / frames; the upper bound drops transcripts too long for their audio.
    min_output_input_ratio: float = 0.0
    max_output_input_ratio: float = 1.0

    def __post_init__(self) -> None:
        check(1 <= self.min_frames <= self.max_frames, "min_frames", "needs 1 <= min_frames <= max_frames")
        check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", "needs 0 <= min_tokens <= max_tokens")
        check(0 <= self.min_output_input_ratio <= self.max_output_input_ratio, "min_output_input_ratio",
              "needs 0 <= min_output_input_ratio <= max_output_input_ratio")


@dataclass
class BatchConfig:
    """Shuffle buffer -> sort buffer -> batches -> padding."""

    # `dynamic`: as many utterances as fit in max_frames_in_batch padded frames
    # (batch size x longest utterance); `static`: batch_size utterances.
    batch_type: Literal["static", "dynamic"] = "dynamic"
    batch_size: int = 16
    max_frames_in_batch: int = 12000
    shuffle: bool = True
    shuffle_size: int = 1500
    sort: bool = True
    sort_size: int = 500

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.max_frames_in_batch >= 1, "max_frames_in_batch", "must be >= 1")
        check(self.shuffle_size >= 1 and self.sort_size >= 1, "shuffle_size", "buffer sizes must be >= 1")


@dataclass
class TokenizerConfig:
    """Transcript -> token ids. The symbol table (``units.txt``) fixes the model's vocab_size."""

    # `word`: whitespace-separated words are the units (small closed vocabularies, e.g. digits).
    type: Literal["char", "word", "bpe", "unigram"] = "char"
    # `moe-asr train-tokenizer` writes both files and prints this section.
    symbol_table: Optional[str] = None
    # sentencepiece model for bpe/unigram.
    bpe_model: Optional[str] = None
    # Applied before tokenizer training and before every encode, so both see the same text.
    case: Literal["keep", "lower", "upper"] = "keep"
    remove_punctuation: bool = False
    # Punctuation kept even with remove_punctuation (apostrophes of English contractions).
    keep_punctuation: str = "'"


@dataclass
class DataConfig:
    # List files with one shard path a line (`moe-asr make-shards` writes shards.list).
    train_shards: Optional[str] = None
    cv_shards: Optional[str] = None
    # Shard order, shuffle buffer, speed perturbation, dither and masks all derive from
    # (seed, epoch, rank, worker): the same seed and epoch give the same batches.
    seed: int = 777
    num_workers: int = 2
    prefetch_factor: int = 4
    pin_memory: bool = False
    features: FeatureConfig = field(default_factory=FeatureConfig)
    edge_crop: EdgeCropConfig = field(default_factory=EdgeCropConfig)
    channel_eq: ChannelEqConfig = field(default_factory=ChannelEqConfig)
    specaug: SpecAugConfig = field(default_factory=SpecAugConfig)
    specsub: SpecSubConfig = field(default_factory=SpecSubConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    batching: BatchConfig = field(default_factory=BatchConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.prefetch_factor >= 1, "prefetch_factor", "must be >= 1")
        check(self.batching.batch_type != "dynamic"
              or self.filters.max_frames <= self.batching.max_frames_in_batch, "filters.max_frames",
              f"{self.filters.max_frames} exceeds batching.max_frames_in_batch="
              f"{self.batching.max_frames_in_batch}: such an utterance fits in no batch")
