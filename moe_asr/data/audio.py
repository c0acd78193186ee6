"""Audio bytes and files <-> mono float32 arrays (soundfile; no torch, so shard writers start fast)."""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

# Containers a shard member may use, by file extension.
AUDIO_EXTENSIONS = ("flac", "wav")
# Audio members a shard reader takes: ours, and every one WeNet's shard reader takes (what
# libsndfile cannot decode is then counted as undecodable audio).
READ_AUDIO_EXTENSIONS = (*AUDIO_EXTENSIONS, "mp3", "m4a", "ogg", "opus", "wma")


class AudioError(ValueError):
    """Audio that cannot be read."""


class EmptyAudioError(AudioError):
    """Audio that reads fine but has no samples."""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    num_frames: int
    channels: int


def _to_mono(wave: np.ndarray) -> np.ndarray:
    """Average the channels: any channel count soundfile reads becomes one."""
    if wave.ndim == 2:
        wave = wave.mean(axis=1, dtype=np.float32) if wave.shape[1] > 1 else wave[:, 0]
    return np.ascontiguousarray(wave, dtype=np.float32)


def read_audio(path: str | Path, offset: float = 0.0, duration: float | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] of ``path`` from ``offset`` seconds for ``duration`` seconds."""
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            start = int(round(offset * sr))
            if start:
                f.seek(min(start, f.frames))
            frames = -1 if duration is None else max(0, int(round(duration * sr)))
            wave = f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"{path}: {e}") from None
    if wave.shape[0] == 0:
        raise EmptyAudioError(f"{path}: no samples")
    return _to_mono(wave), sr


def encode_audio(wave: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """16-bit PCM FLAC or WAV bytes (lossless for the usual 16-bit corpora)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), sample_rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples of in-memory audio bytes; raises AudioError when undecodable."""
    wav = _parse_wav(data)
    if wav is not None and wav.pcm16:  # the common shard format: read it without libsndfile
        n = wav.info.num_frames * wav.info.channels
        ints = np.frombuffer(data, dtype="<i2", count=n, offset=wav.data_offset)
        wave = ints.reshape(-1, wav.info.channels).astype(np.float32) * np.float32(1 / 32768)
        return _to_mono(wave), wav.info.sample_rate
    try:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(str(e)) from None
    return _to_mono(wave), sr


@dataclass(frozen=True)
class _WavLayout:
    info: AudioInfo
    data_offset: int
    pcm16: bool


def _parse_wav(data: bytes) -> _WavLayout | None:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt " and size >= 16:
            fmt = struct.unpack_from("<HHIIHH", data, body)
        elif cid == b"data" and fmt is not None and fmt[4] > 0:
            tag, channels, sr, _, block_align, bits = fmt
            frames = min(size, len(data) - body) // block_align
            return _WavLayout(AudioInfo(sr, frames, channels), body, tag == 1 and bits == 16)
        pos = body + size + (size & 1)
    return None


def _probe_flac(data: bytes) -> AudioInfo | None:
    # fLaC, then the STREAMINFO block: header (4 bytes), 10 bytes of block/frame
    # sizes, then 20 bits rate | 3 bits channels-1 | 5 bits bps-1 | 36 bits samples.
    if len(data) < 26 or data[:4] != b"fLaC" or data[4] & 0x7F != 0:
        return None
    bits = int.from_bytes(data[18:26], "big")
    sr, channels, frames = bits >> 44, ((bits >> 41) & 0x7) + 1, bits & 0xFFFFFFFFF
    return AudioInfo(sr, frames, channels) if sr and frames else None


def probe_audio(data: bytes) -> AudioInfo:
    """Rate and length from the header alone: batching plans with it before decoding anything."""
    wav = _parse_wav(data)
    info = wav.info if wav is not None else _probe_flac(data)
    if info is not None:
        return info
    try:
        i = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(str(e)) from None
    return AudioInfo(i.samplerate, i.frames, i.channels)
