"""Every decoding method end to end on a tiny random U2++ model, checked for consistency."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moe_asr.decode.attention import attention_beam_search
from moe_asr.decode.ctc import ctc_prefix_beam_search
from moe_asr.decode.options import DecodeOptions
from moe_asr.decode.search import METHODS, decode
from moe_asr.model.config import DecoderConfig, EncoderConfig, ModelConfig
from moe_asr.moe.config import MoEConfig
from moe_asr.model.u2pp import U2PPModel, build_model
from moe_asr.symbols import BLANK_ID, sos_eos_id
from tests.decode.decode_doubles import exhaustive_best, sequence_score

VOCAB = 6
EOS = sos_eos_id(VOCAB)
TOKENS = [t for t in range(VOCAB) if t != EOS]  # what the attention decoder may emit


def tiny_model(r_num_blocks: int = 1, seed: int = 0) -> U2PPModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB, input_dim=80,
        encoder=EncoderConfig(output_size=16, attention_heads=2, linear_units=32, num_blocks=2,
                              cnn_module_kernel=3),
        decoder=DecoderConfig(attention_heads=2, linear_units=32, num_blocks=2, r_num_blocks=r_num_blocks),
        moe=MoEConfig(num_experts=2, top_k=1),
        reverse_weight=0.3 if r_num_blocks else 0.0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        # A random decoder mostly says eos at once; sharper logits with a damped eos give
        # hypotheses of several tokens, so the searches have something to get wrong.
        for dec in (model.decoder.left_decoder, model.decoder.right_decoder):
            if dec is not None:
                dec.output_layer.weight.mul_(4.0)
                dec.output_layer.bias[EOS] -= 3.0
        model.ctc.ctc_lo.weight.mul_(4.0)
    return model


def feats_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(lengths), max(lengths), 80, generator=g), torch.tensor(lengths)


@pytest.fixture(scope="module")
def model() -> U2PPModel:
    return tiny_model()


@pytest.mark.parametrize("chunk_size,num_left_chunks", [(-1, -1), (2, 1)])
def test_every_method_runs_and_streaming_matches_the_masked_forward(model, chunk_size, num_left_chunks):
    feats, lengths = feats_batch([40, 29, 17])
    options = DecodeOptions(beam_size=4, chunk_size=chunk_size, num_left_chunks=num_left_chunks)
    out = decode(model, feats, lengths, METHODS, options)
    enc_lengths = model.encode(feats, lengths)[1].squeeze(1).sum(1).tolist()
    for name, hyps in out.items():
        assert len(hyps) == 3, name
        for hyp, n in zip(hyps, enc_lengths):
            assert len(hyp.tokens) <= n and hyp.score <= 0.0, name
            # CTC-based hypotheses never hold a blank; the attention decoder never emits eos.
            assert all(0 <= t < VOCAB for t in hyp.tokens), name
            assert (EOS if name == "attention" else BLANK_ID) not in hyp.tokens, name
    if chunk_size > 0:
        streamed = decode(model, feats, lengths, METHODS, replace(options, streaming=True))
        for name in METHODS:
            assert [h.tokens for h in streamed[name]] == [h.tokens for h in out[name]], name
            assert [h.score for h in streamed[name]] == pytest.approx(
                [h.score for h in out[name]], abs=1e-4), name


def test_rescoring_choice_and_score_recomputed_independently(model):
    feats, lengths = feats_batch([36, 21], seed=1)
    ctc_weight, reverse_weight, beam = 0.5, 0.3, 5
    options = DecodeOptions(beam_size=beam, ctc_weight=ctc_weight, reverse_weight=reverse_weight)
    out = decode(model, feats, lengths, ["attention_rescoring"], options)["attention_rescoring"]
    with torch.no_grad():
        memory, mask = model.encode(feats, lengths)
        logp = model.ctc.log_softmax(memory)
        right = model.decoder.right_decoder
        for b in range(2):
            n = int(mask[b].sum())
            mem, m = memory[b:b + 1, :n], mask[b:b + 1, :, :n]
            nbest = ctc_prefix_beam_search(logp[b, :n], beam)
            assert len(nbest) > 1
            combined = {}
            for tokens, ctc in nbest:
                # L2R step by step through the incremental path, one hypothesis, no padding.
                l2r = sequence_score(model.decoder, mem, m, tokens, EOS, EOS)
                # R2L teacher-forced on the reversed tokens alone.
                rev = list(tokens[::-1])
                r_logp = right(mem, m, torch.tensor([[EOS] + rev]), torch.tensor([len(rev) + 1]))
                r_logp = r_logp.log_softmax(-1)[0]
                r2l = sum(float(r_logp[j, t]) for j, t in enumerate(rev + [EOS]))
                combined[tokens] = (1 - reverse_weight) * l2r + reverse_weight * r2l + ctc_weight * ctc
            best = max(combined, key=combined.get)
            assert out[b].tokens == list(best)
            assert out[b].score == pytest.approx(combined[best], abs=1e-4)


def test_attention_beam_search_equals_exhaustive_search_on_the_real_decoder():
    # Seed 4: the best sequence of up to 3 tokens is not empty and greedy search misses it,
    # so the comparison below has something to catch.
    model = tiny_model(seed=4)
    feats, lengths = feats_batch([30, 22], seed=2)
    max_len = 3
    beam = sum(len(TOKENS) ** n for n in range(max_len + 1))  # every prefix stays alive
    with torch.no_grad():
        memory, mask = model.encode(feats, lengths)
        hyps, scores = attention_beam_search(model.decoder, memory, mask, EOS, EOS, beam, max_len=max_len)
        greedy_hyps, _ = attention_beam_search(model.decoder, memory, mask, EOS, EOS, 1, max_len=max_len)
        for b in range(2):
            n = int(mask[b].sum())
            best, best_score = exhaustive_best(model.decoder, memory[b:b + 1, :n], mask[b:b + 1, :, :n],
                                               TOKENS, max_len, EOS, EOS)
            assert best and greedy_hyps[b] != best, "the check is weak on this model"
            assert hyps[b] == best
            assert scores[b] == pytest.approx(best_score, abs=1e-4)


def test_batched_attention_beam_search_equals_each_utterance_alone(model):
    feats, lengths = feats_batch([44, 13, 30], seed=3)
    with torch.no_grad():
        memory, mask = model.encode(feats, lengths)
        hyps, scores = attention_beam_search(model.decoder, memory, mask, EOS, EOS, beam_size=3)
        for b in range(3):
            n = int(mask[b].sum())
            alone, alone_scores = attention_beam_search(
                model.decoder, memory[b:b + 1, :n], mask[b:b + 1, :, :n], EOS, EOS, beam_size=3)
            assert hyps[b] == alone[0]
            assert scores[b] == pytest.approx(alone_scores[0], abs=1e-4)


def test_model_without_r2l_decoder_decodes_with_default_weights():
    model = tiny_model(r_num_blocks=0, seed=1)
    feats, lengths = feats_batch([25, 18], seed=4)
    default = decode(model, feats, lengths, ["attention_rescoring"], DecodeOptions(beam_size=3))
    explicit = decode(model, feats, lengths, ["attention_rescoring"], DecodeOptions(beam_size=3, reverse_weight=0.0))
    assert default == explicit


def test_an_utterance_without_encoder_frames_decodes_to_nothing(model):
    # 3 feature frames are fewer than the subsampling needs for one output frame.
    feats, lengths = feats_batch([30, 3], seed=5)
    out = decode(model, feats, lengths, METHODS, DecodeOptions(beam_size=3))
    for name, hyps in out.items():
        assert hyps[1].tokens == [], name
        assert torch.isfinite(torch.tensor([h.score for h in hyps])).all(), name
