import torch

from moe_asr.model.attention import RelPositionMultiHeadedAttention, rel_shift
from moe_asr.model.positional import RelPositionalEncoding


def test_rel_shift_against_loop():
    for q, k in [(1, 1), (1, 6), (3, 3), (4, 9)]:
        x = torch.randn(2, 3, q, k + q - 1)
        ref = torch.empty(2, 3, q, k)
        for i in range(q):
            for j in range(k):
                ref[..., i, j] = x[..., i, q - 1 - i + j]
        assert torch.equal(rel_shift(x, k), ref)


def test_attention_depends_on_relative_position_only():
    """Shifting a window of frames in time leaves its self-attention output unchanged."""
    torch.manual_seed(0)
    att = RelPositionMultiHeadedAttention(4, 16, 0.0).eval()
    pos = RelPositionalEncoding(16, 0.0)
    frames = torch.randn(1, 10, 16)
    _, pe = pos(frames[:, 4:], cache_len=4)
    mask = torch.ones(1, 6, 10, dtype=torch.bool)
    mask[..., :4] = False  # the first 4 keys are invisible: window = frames 4..9
    out_late, _ = att(frames[:, 4:], mask[:, :, 4:].new_ones(1, 6, 6), pos(frames[:, 4:])[1])
    # Same 6 frames, now with 4 masked earlier keys in a K/V cache: output must not change.
    _, cache = att(frames[:, :4], None, pos(frames[:, :4])[1])
    out_cached, _ = att(frames[:, 4:], mask, pe, cache)
    torch.testing.assert_close(out_cached, out_late, rtol=1e-5, atol=1e-6)
