"""Batched streaming recognition equals streaming each utterance alone; resumable prefix beam search.

Utterances of different lengths join a ``StreamingRecognizer`` at different
steps, some fed in pieces smaller than a window (so they wait while others
advance), one shorter than a single window; every method's final hypothesis
must be what ``decode(..., streaming=True)`` gives for the utterance alone, and
the partial result after every step what the prefix beam search gives over the
frames encoded so far.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from moe_asr.cli import main
from moe_asr.data.kaldi_text import read_table
from moe_asr.decode.ctc import PrefixBeamSearch, ctc_prefix_beam_search
from moe_asr.decode.options import DecodeOptions
from moe_asr.decode.search import METHODS, decode
from moe_asr.decode.streaming import StreamingRecognizer
from moe_asr.model.u2pp import U2PPModel, build_model
from tests.helpers import tiny_config
from tests.tools.test_recognize import model_file, shards, wavs  # noqa: F401  (fixtures: a small model, FSDD audio)

BEAM = 4
LENGTHS = [93, 40, 5, 66, 121, 28]  # input frames; 5 is under one window (no encoder frame at all)
JOINS = [0, 0, 1, 2, 2, 4]          # the step at which each utterance joins
PIECES = {3: 9, 4: 23}              # utterances fed this many frames per step instead of at once


def _model(num_experts: int, rel_pos_shift: bool, causal_pad: str) -> U2PPModel:
    torch.manual_seed(0)
    cfg = tiny_config(num_experts=num_experts, top_k=min(2, num_experts))
    cfg = replace(cfg, encoder=replace(cfg.encoder, rel_pos_shift=rel_pos_shift, causal_pad=causal_pad))
    model = build_model(cfg).eval()
    with torch.no_grad():  # a random model mostly says nothing; sharper logits give several tokens
        model.ctc.ctc_lo.weight.mul_(6.0)
        for dec in (model.decoder.left_decoder, model.decoder.right_decoder):
            dec.output_layer.weight.mul_(4.0)
            dec.output_layer.bias[model.eos] -= 3.0
    return model


def _utterances() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"utt{i}": torch.randn(n, 20, generator=g) for i, n in enumerate(LENGTHS)}


def _run(rec: StreamingRecognizer, utts: dict[str, torch.Tensor], on_step=None) -> dict:
    """Drive the recognizer on the schedule above until every utterance has finished."""
    fed = dict.fromkeys(utts, 0)
    results: dict = {}
    step = 0
    while len(results) < len(utts):
        for i, (key, feats) in enumerate(utts.items()):
            if i in PIECES and JOINS[i] <= step and fed[key] < feats.shape[0]:
                piece = feats[fed[key]:fed[key] + PIECES[i]]
                fed[key] += piece.shape[0]
                last = fed[key] == feats.shape[0]
                (rec.add if JOINS[i] == step else rec.feed)(key, piece, last)
            elif JOINS[i] == step:
                rec.add(key, feats, last=True)
        finished = rec.step()
        assert not set(finished) & set(results)
        results.update(finished)
        if on_step is not None:
            on_step(step, rec)
        step += 1
        assert step < 100, "the streams do not finish"
    return results


@pytest.mark.parametrize("num_experts,rel_pos_shift,causal_pad,left", [
    (4, True, "glu_output", -1), (1, False, "input", 1), (4, False, "glu_output", 1), (1, True, "input", -1)])
def test_batched_streams_give_each_utterance_its_own_streaming_result(num_experts, rel_pos_shift, causal_pad,
                                                                      left):
    model, utts, chunk = _model(num_experts, rel_pos_shift, causal_pad), _utterances(), 4
    options = DecodeOptions(chunk_size=chunk, num_left_chunks=left, beam_size=BEAM, ctc_weight=0.5,
                            reverse_weight=0.3)
    rec = StreamingRecognizer(model, options, METHODS)
    alone = {key: decode(model, feats[None], torch.tensor([feats.shape[0]]), METHODS,
                         replace(options, streaming=True))
             for key, feats in utts.items()}
    with torch.no_grad():
        posteriors = {key: model.ctc.log_softmax(model.encoder.forward_chunk_by_chunk(
            feats[None], torch.tensor([feats.shape[0]]), chunk, left)[0])[0] for key, feats in utts.items()}

    def check_partials(step: int, rec: StreamingRecognizer) -> None:
        """A stream given its whole input advances one chunk per step from the step it joined."""
        for i, key in enumerate(utts):
            if key in rec.live and i not in PIECES:
                frames = min((step - JOINS[i] + 1) * chunk, posteriors[key].shape[0])
                tokens, score = ctc_prefix_beam_search(posteriors[key][:frames], BEAM)[0]
                partial = rec.partial(key)
                assert partial.tokens == list(tokens) and partial.score == pytest.approx(score, abs=1e-4), key

    results = _run(rec, utts, check_partials)
    assert len(rec) == 0 and rec.live == []
    said = set()
    for key in utts:
        for m in METHODS:
            assert results[key][m].tokens == alone[key][m][0].tokens, (key, m)
            assert results[key][m].score == pytest.approx(alone[key][m][0].score, abs=1e-4), (key, m)
            said.add(tuple(results[key][m].tokens))
    assert len(said) > 3, f"the model should say different things: {said}"


def test_one_method_at_a_time_and_partials_without_the_beam():
    model, utts = _model(4, True, "glu_output"), _utterances()
    both = _run(StreamingRecognizer(model, DecodeOptions(chunk_size=2, beam_size=BEAM), METHODS), utts)
    for m in METHODS:
        alone = _run(StreamingRecognizer(model, DecodeOptions(chunk_size=2, beam_size=BEAM), [m]), utts)
        assert {k: list(v) for k, v in alone.items()} == {k: [m] for k in utts}
        assert {k: v[m] for k, v in alone.items()} == {k: v[m] for k, v in both.items()}, m
    greedy = StreamingRecognizer(model, DecodeOptions(chunk_size=2), ["ctc_greedy_search"])
    greedy.add("a", utts["utt0"], last=True)
    greedy.step()
    assert greedy.partial("a").tokens == decode(model, utts["utt0"][None, :14], torch.tensor([14]),
                                                ["ctc_greedy_search"], DecodeOptions(chunk_size=2, streaming=True)
                                                )["ctc_greedy_search"][0].tokens


def test_stream_errors_are_clear():
    model = _model(1, True, "glu_output")
    rec = StreamingRecognizer(model, DecodeOptions(chunk_size=4))
    rec.add("a", torch.randn(30, 20))
    with pytest.raises(ValueError, match="already live"):
        rec.add("a")
    with pytest.raises(KeyError, match="no live stream 'b'"):
        rec.feed("b", torch.randn(3, 20))
    with pytest.raises(ValueError, match="frames, dim"):
        rec.feed("a", torch.randn(3))
    rec.feed("a", last=True)
    with pytest.raises(ValueError, match="has ended"):
        rec.feed("a", torch.randn(3, 20))
    with pytest.raises(ValueError, match="chunk_size > 0"):
        StreamingRecognizer(model, DecodeOptions(chunk_size=-1))
    with pytest.raises(ValueError, match="unknown decoding method"):
        StreamingRecognizer(model, DecodeOptions(chunk_size=4), ["beam"])
    with pytest.raises(ValueError, match="eval mode"):
        StreamingRecognizer(model.train(), DecodeOptions(chunk_size=4))


@pytest.mark.parametrize("seed", range(4))
def test_resumed_prefix_beam_search_equals_the_whole_utterance_search(seed):
    """Any split of the frames into chunks (empty ones too) gives the same n-best, exactly, and the
    n-best after each chunk is the search over the frames so far."""
    g = torch.Generator().manual_seed(seed)
    log_probs = (torch.randn(40, 7, generator=g) * 3).log_softmax(-1)
    cuts = sorted(torch.randint(0, 41, (6,), generator=g).tolist()) + [40]
    search, start = PrefixBeamSearch(5), 0
    for end in cuts:
        search.advance(log_probs[start:end])
        assert search.nbest() == ctc_prefix_beam_search(log_probs[:end], 5)
        start = end
    nbest = search.nbest()
    assert len(nbest) == 5 and len({tokens for tokens, _ in nbest}) == 5
    assert all(math.isfinite(score) for _, score in nbest)
    with pytest.raises(ValueError, match="beam_size"):
        PrefixBeamSearch(0)


def test_recognize_gives_the_same_text_with_any_number_of_streams(model_file, wavs, tmp_path, capsys):
    """Real FSDD audio through `moe-asr recognize --streaming`: three concurrent streams, utterances
    joining as others end and across feature batches, write what one stream at a time writes."""
    modes = "ctc_greedy_search,ctc_prefix_beam_search,attention_rescoring"
    options = [*(str(p) for p in wavs.values()), "--model", str(model_file), "--beam-size", "4", "--mode", modes,
               "--chunk-size", "8", "--num-left-chunks", "1", "--streaming", "--batch-frames", "300"]
    for streams in ("1", "3"):
        assert main(["recognize", *options, "--streams", streams, "-o", str(tmp_path / streams)]) == 0
    said = set()
    for m in modes.split(","):
        name = f"{m}_chunk8_left1_streaming"
        text = read_table(tmp_path / "3" / name / "text")
        assert text == read_table(tmp_path / "1" / name / "text"), m
        assert sorted(text) == sorted(wavs)
        said |= set(text.values())
    assert len(said) > 2, f"the model should say different things: {said}"
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("1", "3")]
    assert [set(s["modes"]) for s in summaries] == [{f"{m}_chunk8_left1_streaming" for m in modes.split(",")}] * 2
    assert main(["recognize", *options, "--streams", "0", "-o", str(tmp_path / "0")]) == 1
    assert capsys.readouterr().err.strip().endswith("moe-asr recognize: error: --streams must be >= 1, got 0")
