"""Streaming == full context: chunk-by-chunk with caches gives the chunk-masked forward's output."""
from dataclasses import replace

import pytest
import torch

from moe_asr.model.encoder import ConformerEncoder, StreamState
from moe_asr.schema import ConfigError

from tests.helpers import tiny_config


def _encoder(input_layer: str = "conv2d", norm: str = "layer_norm", **encoder_kw) -> ConformerEncoder:
    cfg = tiny_config(input_layer=input_layer, cnn_module_norm=norm)
    return ConformerEncoder(replace(cfg.encoder, **encoder_kw), cfg.input_dim, cfg.moe).eval()


@pytest.mark.parametrize("chunk,left", [(1, -1), (4, -1), (4, 1), (3, 0), (8, 2), (16, -1)])
def test_batched_streaming_equals_chunk_masked_forward(chunk, left):
    enc = _encoder()
    lens = torch.tensor([203, 151, 64, 9])  # batch > 1 with padding, one shorter than a window
    xs = torch.randn(4, 203, 20)
    with torch.no_grad():
        full, mask = enc(xs, lens, chunk, left)
        stream, stream_mask = enc.forward_chunk_by_chunk(xs, lens, chunk, left)
    assert stream.shape == full.shape
    assert torch.equal(stream_mask, mask)
    valid = mask.squeeze(1)
    torch.testing.assert_close(stream[valid], full[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [5, 8])
@pytest.mark.parametrize("causal_pad", ["glu_output", "input"])
@pytest.mark.parametrize("rel_pos_shift", [True, False])
@pytest.mark.parametrize("chunk,left", [(1, -1), (4, 1), (8, 2)])
def test_streaming_equals_chunk_masked_forward_for_every_option(rel_pos_shift, causal_pad, kernel, chunk, left):
    """Both attention variants x both causal paddings, odd and even kernels, a padded batch."""
    enc = _encoder(rel_pos_shift=rel_pos_shift, causal_pad=causal_pad, cnn_module_kernel=kernel)
    lens = torch.tensor([171, 120, 9])
    xs = torch.randn(3, 171, 20)
    with torch.no_grad():
        full, mask = enc(xs, lens, chunk, left)
        stream, stream_mask = enc.forward_chunk_by_chunk(xs, lens, chunk, left)
        alone, _ = enc(xs[1:2, :120], lens[1:2], chunk, left)
    assert torch.equal(stream_mask, mask)
    valid = mask.squeeze(1)
    torch.testing.assert_close(stream[valid], full[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[1, :alone.shape[1]], alone[0], rtol=1e-5, atol=1e-5)


def test_wenet_options_change_the_function():
    """The options are not vacuous: same weights, different attention or padding, different output."""
    xs, lens = torch.randn(1, 80, 20), torch.tensor([80])
    base = _encoder()
    with torch.no_grad():
        ref, _ = base(xs, lens, 4, -1)
        for option in ({"rel_pos_shift": False}, {"causal_pad": "input"}):
            other = _encoder(**option)
            other.load_state_dict(base.state_dict())
            out, _ = other(xs, lens, 4, -1)
            assert (out - ref).abs().max() > 1e-3, option


def test_even_kernel_needs_causal_convolution():
    with pytest.raises(ConfigError, match="cnn_module_kernel"):
        replace(tiny_config().encoder, causal=False, cnn_module_kernel=8)
    with pytest.raises(ConfigError, match="causal_pad"):
        replace(tiny_config().encoder, causal=False, causal_pad="input")


@pytest.mark.parametrize("input_layer", ["conv2d6", "conv2d8"])
def test_streaming_other_subsampling_rates_and_batch_norm(input_layer):
    enc = _encoder(input_layer, "batch_norm")
    lens = torch.tensor([160, 97])
    xs = torch.randn(2, 160, 20)
    with torch.no_grad():
        full, mask = enc(xs, lens, 4, 2)
        stream, _ = enc.forward_chunk_by_chunk(xs, lens, 4, 2)
    valid = mask.squeeze(1)
    torch.testing.assert_close(stream[valid], full[valid], rtol=1e-5, atol=1e-5)


def test_batched_output_equals_each_utterance_alone():
    """Padding must not leak: a padded utterance's frames equal its unpadded forward."""
    enc = _encoder()
    lens = torch.tensor([120, 70])
    xs = torch.randn(2, 120, 20)
    with torch.no_grad():
        batch, mask = enc(xs, lens, 4, -1)
        alone, _ = enc(xs[1:, :70], lens[1:], 4, -1)
        stream_alone, _ = enc.forward_chunk_by_chunk(xs[1:, :70], lens[1:], 4, -1)
    n = int(mask[1].sum())
    torch.testing.assert_close(batch[1, :n], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stream_alone[0], alone[0], rtol=1e-5, atol=1e-5)


def test_chunk_mask_changes_output():
    """The equivalence above is not vacuous: limited context really differs from full context."""
    enc = _encoder()
    xs, lens = torch.randn(1, 120, 20), torch.tensor([120])
    with torch.no_grad():
        full, _ = enc(xs, lens, -1)
        chunked, _ = enc(xs, lens, 4, 1)
    assert (full - chunked).abs().max() > 1e-3


def test_causal_encoder_does_not_look_ahead_past_its_chunk():
    enc = _encoder()
    xs = torch.randn(1, 120, 20)
    lens = torch.tensor([120])
    changed = xs.clone()
    changed[:, 80:] += 5.0  # perturb input frames from 80 on
    with torch.no_grad():
        a, _ = enc(xs, lens, 4, -1)
        b, _ = enc(changed, lens, 4, -1)
    # Encoder frame t sees input frames up to 4 * (t // 4 * 4 + 3) + 6 through its chunk.
    first_affected = next(t for t in range(a.shape[1]) if 4 * ((t // 4) * 4 + 3) + 6 >= 80)
    torch.testing.assert_close(a[:, :first_affected], b[:, :first_affected])
    assert (a[:, first_affected:] - b[:, first_affected:]).abs().max() > 1e-3


def _stream_together(enc: ConformerEncoder, utts: list[torch.Tensor], joins: list[int], chunk: int,
                     left: int) -> list[torch.Tensor]:
    """Advance utterances as one batch of streams: utterance i joins at step ``joins[i]``, sits out
    every step where ``(step + i) % 3 == 0`` (waiting for input), and leaves after its last chunk."""
    w = enc.stream_windows(chunk, left)
    state, rows = enc.init_state(0), []  # rows: the utterance of each state row
    starts, outs = [0] * len(utts), [[] for _ in utts]
    step = 0
    while step <= max(joins) or rows:
        joining = [i for i, j in enumerate(joins) if j == step]
        state, rows = StreamState.cat([state, enc.init_state(len(joining))]), rows + joining
        ready = [r for r, i in enumerate(rows) if (step + i) % 3 != 0]
        waiting = [r for r in range(len(rows)) if r not in ready]
        if ready:
            windows = [utts[rows[r]][starts[rows[r]]:starts[rows[r]] + w.window] for r in ready]
            lens = torch.tensor([x.shape[0] for x in windows])
            sub = state.select(torch.tensor(ready))
            ys, new = enc.forward_chunk(torch.nn.utils.rnn.pad_sequence(windows, batch_first=True), lens, sub,
                                        w.required_cache_size)
            for k, r in enumerate(ready):
                outs[rows[r]].append(ys[k, :int(new.lengths[k] - sub.lengths[k])])
                starts[rows[r]] += w.stride
            state = StreamState.cat([state.select(torch.tensor(waiting, dtype=torch.long)), new])
            rows = [rows[r] for r in waiting] + [rows[r] for r in ready]
        keep = [r for r, i in enumerate(rows) if utts[i].shape[0] - starts[i] >= w.context]
        state, rows = state.select(torch.tensor(keep, dtype=torch.long)), [rows[r] for r in keep]
        step += 1
    return [torch.cat(o) if o else torch.zeros(0, enc.output_size) for o in outs]


@pytest.mark.parametrize("num_experts", [4, 1])
@pytest.mark.parametrize("rel_pos_shift,causal_pad", [(True, "glu_output"), (False, "input"),
                                                      (True, "input"), (False, "glu_output")])
@pytest.mark.parametrize("left", [-1, 1])
def test_streams_at_different_positions_in_one_batch_equal_each_alone(num_experts, rel_pos_shift, causal_pad, left):
    """Streams that join at different chunks, wait, and leave at their ends, advanced together, give each
    utterance's own streaming output and its chunk-masked forward: offsets, left-padded attention caches,
    convolution caches and the left-chunk limit stay per stream."""
    cfg = tiny_config(num_experts=num_experts, top_k=min(2, num_experts))
    enc = ConformerEncoder(replace(cfg.encoder, rel_pos_shift=rel_pos_shift, causal_pad=causal_pad),
                           cfg.input_dim, cfg.moe).eval()
    lengths, joins, chunk = [90, 37, 5, 61, 118], [0, 0, 2, 3, 5], 4
    utts = [torch.randn(n, 20) for n in lengths]
    with torch.no_grad():
        together = _stream_together(enc, utts, joins, chunk, left)
        for x, out in zip(utts, together):
            full, mask = enc(x[None], torch.tensor([x.shape[0]]), chunk, left)
            alone, _ = enc.forward_chunk_by_chunk(x[None], torch.tensor([x.shape[0]]), chunk, left)
            n = int(mask.sum())
            assert out.shape == (alone.shape[1], enc.output_size) and out.shape[0] == n
            torch.testing.assert_close(out, alone[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out, full[0, :n], rtol=1e-5, atol=1e-5)


def test_state_select_drops_history_no_kept_stream_uses():
    enc = _encoder()
    xs, lens = torch.randn(1, 40, 20), torch.tensor([40])
    with torch.no_grad():
        _, old = enc.forward_chunk(xs, lens, enc.init_state(1))
    both = StreamState.cat([old, enc.init_state(1)])
    assert both.cache_mask.shape == (2, old.cache_mask.shape[1]) and not both.cache_mask[1].any()
    newcomer = both.select(torch.tensor([1]))
    assert newcomer.cache_mask.shape == (1, 0) and all(c.shape[2] == 0 for c in newcomer.att_cache)
