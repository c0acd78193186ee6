"""The exported encoder graphs under ONNX Runtime, for `moe-asr bench-rtf --onnx`.

A model is exported once at startup (``moe_asr.export.export_model``, into a
temporary folder that is gone once the sessions hold the graphs): one
streaming graph per ``C/L`` context the run asks for, the full-context
encoder + CTC from the first, and with ``int8`` their int8 twins too (the
graph kinds ``onnx`` and ``onnx_int8``). ``prepare`` turns a cell's input into
a callable that runs a graph as the eager encoder mode runs the model (the
whole padded batch at once, or chunk by chunk with the N streams as one
batch) and returns the encoder output, so the same call is both checked
against the eager output (``check``: to ``ATOL``, an int8 graph to
``INT8_RELATIVE_RMS``) and timed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from moe_asr.export import export_model
from moe_asr.export.bundle import int8_path
from moe_asr.export.graphs import StreamingEncoder
from moe_asr.model.u2pp import U2PPModel

STATE = ("offset", "cache_mask", "att_cache", "cnn_cache")
NO_LEFT_LIMIT = "no left limit, and the streaming graph keeps a bounded cache (give C/L, e.g. 16/4)"
ATOL = 1e-4
# An int8 graph's encoder output against eager: RMS of the difference over RMS of the output.
INT8_RELATIVE_RMS = 0.05
FLOAT, INT8 = "onnx", "onnx_int8"
RUNTIME = f"ONNX Runtime {ort.__version__}"


def _session(path: Path, threads: int) -> ort.InferenceSession:
    """CPU, ``threads`` intra-op threads, no spinning: the pool would otherwise keep spinning
    after each run, into the eager model's turn of the round."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """One model's exported encoder graphs, ready to run: full context and each streaming ``(C, L)``,
    of each kind (``FLOAT``, and ``INT8`` when asked)."""

    def __init__(self, model: U2PPModel, streaming: list[tuple[int, int]], threads: int, int8: bool = False) -> None:
        self.model = model
        self.kinds = (FLOAT, INT8) if int8 else (FLOAT,)
        self.full: dict[str, ort.InferenceSession] = {}
        self.streaming: dict[tuple[str, int, int], ort.InferenceSession] = {}

        def sessions(path: Path) -> dict[str, ort.InferenceSession]:
            return {kind: _session(int8_path(path) if kind == INT8 else path, threads) for kind in self.kinds}

        with tempfile.TemporaryDirectory(prefix="bench-rtf-onnx-") as tmp:
            first = Path(tmp) / "0"  # any export brings the full-context graph
            summary = export_model(model, first, *(streaming[0] if streaming else ()), int8=int8)
            self.full = sessions(first / "encoder_ctc.onnx")
            self.skipped = summary["skipped"].get("streaming", "")  # why the model has no streaming graphs
            for i, (chunk, left) in enumerate([] if self.skipped else streaming):
                if i:
                    export_model(model, Path(tmp) / str(i), chunk, left, int8=int8)
                for kind, session in sessions(Path(tmp) / str(i) / "streaming_encoder.onnx").items():
                    self.streaming[kind, chunk, left] = session

    def skip_reason(self, chunk: int, left: int) -> str:
        """Why context ``chunk``/``left`` has no graph here ('' if it has one; chunk < 0 is full context)."""
        if chunk < 0:
            return ""
        return self.skipped or ("" if left >= 0 else NO_LEFT_LIMIT)

    def check(self, kind: str, got: np.ndarray, eager: torch.Tensor, mask: torch.Tensor, where: str) -> None:
        """``check_equal`` for a float graph, ``check_close`` for an int8 one."""
        if kind == INT8:
            check_close(got, eager, mask, f"{where} (int8)")
        else:
            check_equal(got, eager, mask, where)

    def prepare(self, chunk: int, left: int, feats: torch.Tensor, lengths: torch.Tensor,
                kind: str = FLOAT) -> Callable[[], np.ndarray]:
        """The ``kind`` graph's run on ``feats``, returning ``encoder_out [B, T', d]``; inputs are cut beforehand."""
        x, lens = feats.cpu().numpy(), lengths.cpu().numpy()
        if chunk < 0:
            session = self.full[kind]
            return lambda: session.run(["encoder_out"], {"feats": x, "feats_lengths": lens})[0]
        session, w = self.streaming[kind, chunk, left], self.model.encoder.stream_windows(chunk, left)
        start_state = {k: v.numpy() for k, v in zip(STATE, StreamingEncoder(self.model, chunk, left)
                                                    .initial_state(x.shape[0]))}
        chunks = [{"chunk": np.ascontiguousarray(x[:, s:s + w.window]),
                   "chunk_lengths": np.clip(lens - s, 0, min(w.window, x.shape[1] - s))}
                  for s in range(0, x.shape[1] - w.context + 1, w.stride)]
        outputs = ["encoder_out", *(f"next_{k}" for k in STATE)]

        def run() -> np.ndarray:
            state, outs = start_state, []
            for feed in chunks:
                enc, *new = session.run(outputs, {**feed, **state})
                outs.append(enc)
                state = dict(zip(STATE, new))
            return np.concatenate(outs, axis=1)
        return run


class OnnxMismatch(ValueError):
    """A graph's output is not the eager model's: its timings would not compare like with like."""


def check_equal(got: np.ndarray, eager: torch.Tensor, mask: torch.Tensor, where: str) -> None:
    """Refuse to time a graph whose output differs from the eager one by more than ``ATOL``
    (on the valid frames, ``mask [B, 1, T']``)."""
    valid = mask.squeeze(1).cpu()
    if got.shape != tuple(eager.shape):
        raise OnnxMismatch(f"{where}: ONNX encoder output {got.shape} is not the eager {tuple(eager.shape)}")
    diff = float((torch.from_numpy(got) - eager.cpu())[valid].abs().max()) if bool(valid.any()) else 0.0
    if not diff <= ATOL:
        raise OnnxMismatch(f"{where}: ONNX encoder output differs from eager by {diff:.2e} (> {ATOL:g})")


def check_close(got: np.ndarray, eager: torch.Tensor, mask: torch.Tensor, where: str) -> None:
    """Refuse to time an int8 graph whose output is off the eager one by more than ``INT8_RELATIVE_RMS``."""
    valid = mask.squeeze(1).cpu()
    if got.shape != tuple(eager.shape):
        raise OnnxMismatch(f"{where}: ONNX encoder output {got.shape} is not the eager {tuple(eager.shape)}")
    a, e = torch.from_numpy(got)[valid].double(), eager.cpu()[valid].double()
    rel = float((a - e).square().mean().sqrt() / e.square().mean().sqrt().clamp_min(1e-12))
    if not rel <= INT8_RELATIVE_RMS:
        raise OnnxMismatch(f"{where}: ONNX encoder output is off eager by {rel:.3f} relative RMS "
                           f"(> {INT8_RELATIVE_RMS:g})")
