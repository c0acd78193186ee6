"""Batched streaming recognition: live streams advanced together, one chunk per encoder call.

A streaming server holds many utterances at once, each at its own position.
``StreamingRecognizer`` keeps them in one batched ``StreamState`` (each row its
own offset and caches), so one ``forward_chunk`` advances every stream that has
a chunk's input. Streams join and leave at any chunk. Over each new chunk's CTC
posteriors every stream advances its greedy path and its CTC prefix beam search,
so partial results are there after every chunk; when a stream's input has ended
and its last chunk is encoded, the attention decoders run once on its whole
encoder output (rescoring its n-best, or beam search) and it leaves the batch.
Rows never mix, so each stream's results are those of streaming it alone
(``decode(..., streaming=True)``), up to float noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from moe_asr.decode.attention import attention_beam_search, attention_rescoring
from moe_asr.decode.ctc import PrefixBeamSearch, collapse
from moe_asr.decode.options import DecodeOptions
from moe_asr.decode.search import Hypothesis, check_methods, effective_reverse_weight
from moe_asr.model.encoder import StreamState, StreamWindows
from moe_asr.symbols import BLANK_ID

_BEAM_METHODS = {"ctc_prefix_beam_search", "attention_rescoring"}
_DECODER_METHODS = {"attention", "attention_rescoring"}


@dataclass
class _Stream:
    """One utterance in flight: its unconsumed input and its searches so far."""

    key: str
    beam: Optional[PrefixBeamSearch]
    keep_memory: bool
    feats: Optional[Tensor] = None  # input frames not consumed yet; the first starts the next window
    ended: bool = False             # no more input will come
    path: list[int] = field(default_factory=list)  # frame-wise best CTC ids
    path_score: float = 0.0
    memory: list[Tensor] = field(default_factory=list)  # encoder output per chunk, for the decoders

    @property
    def frames(self) -> int:
        return 0 if self.feats is None else self.feats.shape[0]

    def ready(self, windows: StreamWindows) -> bool:
        """Its next chunk's input is all there: a whole window, or what is left of an ended input."""
        return self.frames >= windows.window or (self.ended and self.frames >= windows.context)

    def exhausted(self, windows: StreamWindows) -> bool:
        """Its input has ended and what is left cannot give another encoder frame."""
        return self.ended and self.frames < windows.context

    def consume(self, log_probs: Tensor, out: Tensor, stride: int) -> None:
        """Take one chunk's valid CTC log-probs ``[n, V]`` and encoder output ``[n, d]``."""
        best_logp, best_ids = log_probs.max(dim=-1)
        self.path += best_ids.tolist()
        self.path_score += float(best_logp.sum())
        if self.beam is not None:
            self.beam.advance(log_probs)
        if self.keep_memory:
            self.memory.append(out)
        self.feats = self.feats[stride:]


class StreamingRecognizer:
    """Decode live streams chunk by chunk, all streams of a step in one batched encoder call.

    ``add(key)`` starts a stream, ``feed(key, feats, last)`` gives it input
    frames (a whole utterance at once with ``last=True``, or pieces as they
    arrive), ``step()`` advances every stream that has its next window (or has
    ended) by one chunk and returns the results of the streams that finished,
    and ``partial(key)`` is a live stream's best hypothesis so far.

    Args:
        model: the U2++ model, in eval mode.
        options: the chunk size (> 0), left chunks and search, as ``decode`` takes them.
        methods: names from ``METHODS``; each finished stream gets one
            :class:`Hypothesis` per method, as ``decode`` gives.
    """

    def __init__(self, model: torch.nn.Module, options: DecodeOptions,
                 methods: Sequence[str] = ("attention_rescoring",)) -> None:
        check_methods(methods)
        if model.training:
            raise ValueError("streaming needs the model in eval mode (model.eval()), or dropout makes chunks differ")
        self.model, self.methods = model, list(methods)
        self.beam_size, self.ctc_weight = options.beam_size, options.ctc_weight
        self.reverse_weight = effective_reverse_weight(model, options.reverse_weight)
        self.windows = model.encoder.stream_windows(options.chunk_size, options.num_left_chunks)
        self._device = model.encoder.after_norm.weight.device
        self._streams: dict[str, _Stream] = {}  # every live stream
        self._joining: list[_Stream] = []       # added since the last step, no row yet
        self._rows: list[_Stream] = []          # the streams of _state's rows, in order
        self._state: StreamState = model.encoder.init_state(0)

    @property
    def live(self) -> list[str]:
        """Keys of the streams that have joined and not finished."""
        return list(self._streams)

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, key: str, feats: Optional[Tensor] = None, last: bool = False) -> None:
        """Start stream ``key`` (it joins the batch at the next step), optionally with its first input."""
        if key in self._streams:
            raise ValueError(f"stream {key!r} is already live")
        beam = PrefixBeamSearch(self.beam_size) if _BEAM_METHODS & set(self.methods) else None
        self._streams[key] = _Stream(key, beam, bool(_DECODER_METHODS & set(self.methods)))
        self._joining.append(self._streams[key])
        self.feed(key, feats, last)

    def feed(self, key: str, feats: Optional[Tensor] = None, last: bool = False) -> None:
        """Append input frames ``feats [T, idim]`` to stream ``key``; ``last``: its input ends here."""
        stream = self._live(key)
        if stream.ended:
            raise ValueError(f"stream {key!r} has ended: it takes no more input")
        if feats is not None:
            if feats.dim() != 2:
                raise ValueError(f"stream {key!r}: features must be [frames, dim], got {tuple(feats.shape)}")
            feats = feats.to(self._device)
            stream.feats = feats if stream.feats is None else torch.cat([stream.feats, feats])
        stream.ended = last

    def partial(self, key: str) -> Hypothesis:
        """Stream ``key``'s best hypothesis so far: the prefix beam search's if it runs, else the greedy path."""
        stream = self._live(key)
        if stream.beam is not None:
            tokens, score = stream.beam.nbest()[0]
            return Hypothesis(list(tokens), score)
        return Hypothesis(collapse(stream.path, BLANK_ID), stream.path_score)

    def step(self) -> dict[str, dict[str, Hypothesis]]:
        """Advance every stream that has its next window by one chunk, in one encoder call.

        A stream still waiting for input stays as it is. Returns, for each
        stream that finished in this step (input ended, last chunk encoded), one
        :class:`Hypothesis` per method; those streams leave the batch.
        """
        with torch.inference_mode():
            self._admit()
            ready = [i for i, s in enumerate(self._rows) if s.ready(self.windows)]
            if ready:
                self._advance(ready)
            return self._finish()

    def _live(self, key: str) -> _Stream:
        if key not in self._streams:
            raise KeyError(f"no live stream {key!r}")
        return self._streams[key]

    def _admit(self) -> None:
        """Give the streams added since the last step their rows, at their start."""
        if self._joining:
            self._state = StreamState.cat([self._state, self.model.encoder.init_state(len(self._joining))])
            self._rows += self._joining
            self._joining = []

    def _rows_index(self, rows: list[int]) -> Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self._device)

    def _advance(self, ready: list[int]) -> None:
        everyone = len(ready) == len(self._rows)
        state = self._state if everyone else self._state.select(self._rows_index(ready))
        streams = [self._rows[i] for i in ready]
        windows = [s.feats[:self.windows.window] for s in streams]
        lens = torch.tensor([x.shape[0] for x in windows], device=self._device)
        out, new_state = self.model.encoder.forward_chunk(pad_sequence(windows, batch_first=True), lens, state,
                                                          self.windows.required_cache_size)
        log_probs = self.model.ctc.log_softmax(out)
        for stream, n, lp, o in zip(streams, (new_state.lengths - state.lengths).tolist(), log_probs, out):
            stream.consume(lp[:n], o[:n], self.windows.stride)
        if everyone:
            self._state = new_state
            return
        waiting = sorted(set(range(len(self._rows))) - set(ready))
        self._state = StreamState.cat([self._state.select(self._rows_index(waiting)), new_state])
        self._rows = [self._rows[i] for i in waiting] + streams

    def _finish(self) -> dict[str, dict[str, Hypothesis]]:
        """Results of the streams with no chunk left; they leave the batch."""
        done = [s for s in self._rows if s.exhausted(self.windows)]
        if not done:
            return {}
        keep = [i for i, s in enumerate(self._rows) if not s.exhausted(self.windows)]
        self._state = self._state.select(self._rows_index(keep))
        self._rows = [self._rows[i] for i in keep]
        for stream in done:
            del self._streams[stream.key]
        return self._results(done)

    def _results(self, done: list[_Stream]) -> dict[str, dict[str, Hypothesis]]:
        """Every method's hypothesis for the finished streams, the decoders run once for all of them."""
        per_method: dict[str, list[Hypothesis]] = {}
        if "ctc_greedy_search" in self.methods:
            per_method["ctc_greedy_search"] = [Hypothesis(collapse(s.path, BLANK_ID), s.path_score) for s in done]
        nbest = [s.beam.nbest() for s in done if s.beam is not None]
        if "ctc_prefix_beam_search" in self.methods:
            per_method["ctc_prefix_beam_search"] = [Hypothesis(list(nb[0][0]), nb[0][1]) for nb in nbest]
        if _DECODER_METHODS & set(self.methods):
            memory, mask = self._memory(done)
            model = self.model
            if "attention_rescoring" in self.methods:
                hyps = attention_rescoring(model.decoder, memory, mask, nbest, model.sos, model.eos,
                                           self.ctc_weight, self.reverse_weight)
                per_method["attention_rescoring"] = [Hypothesis(t, s) for t, s in zip(*hyps)]
            if "attention" in self.methods:
                hyps = attention_beam_search(model.decoder, memory, mask, model.sos, model.eos, self.beam_size)
                per_method["attention"] = [Hypothesis(t, s) for t, s in zip(*hyps)]
        return {s.key: {m: per_method[m][i] for m in self.methods} for i, s in enumerate(done)}

    def _memory(self, done: list[_Stream]) -> tuple[Tensor, Tensor]:
        """The finished streams' whole encoder outputs, padded: ``[N, T, d]`` and mask ``[N, 1, T]``."""
        d = self.model.encoder.output_size
        empty = self.model.encoder.after_norm.weight.new_zeros(0, d)
        outs = [torch.cat(s.memory) if s.memory else empty for s in done]
        lengths = torch.tensor([o.shape[0] for o in outs], device=self._device)
        memory = pad_sequence(outs, batch_first=True)
        mask = torch.arange(memory.shape[1], device=self._device)[None, :] < lengths[:, None]
        return memory, mask.unsqueeze(1)
