"""Run WeNet's tools/make_shard_list.py with torchaudio.save writing through a temporary file.

torchaudio 2.11 saves through torchcodec, which cannot write to the io.BytesIO that WeNet hands it;
here the same encoder writes a temporary .wav file whose bytes go into that BytesIO, so the tar holds
what FFmpeg writes. torchcodec also takes every tensor as float samples in [-1, 1], so WeNet's int16
tensor (samples times 2^15) would be clipped to full scale; it is handed over as the torchaudio
versions that could save to a BytesIO took it, as 16-bit PCM values (divided by 2^15 for torchcodec).
Usage: python record_shards.py tools/make_shard_list.py [its arguments]
"""
import os
import runpy
import sys
import tempfile

import torch
import torchaudio

_save = torchaudio.save


def save(uri, src, sample_rate, **kw):
    if isinstance(uri, (str, os.PathLike)):
        return _save(uri, src, sample_rate, **kw)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "audio." + kw.get("format", "wav"))
        if src.dtype == torch.int16:
            src = src.float() / 32768
        _save(path, src, sample_rate, **kw)
        with open(path, "rb") as f:
            uri.write(f.read())


if __name__ == "__main__":
    torchaudio.save = save
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
