import torch

from moe_asr.model.masks import make_pad_mask, sample_dynamic_chunk, subsequent_chunk_mask


def test_pad_mask():
    assert make_pad_mask(torch.tensor([3, 1]), 4).tolist() == [[False, False, False, True],
                                                              [False, True, True, True]]


def test_chunk_mask_by_hand():
    m = subsequent_chunk_mask(5, 2).int().tolist()
    assert m == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    left1 = subsequent_chunk_mask(6, 2, num_left_chunks=1).int().tolist()
    assert left1[4] == [0, 0, 1, 1, 1, 1] and left1[1] == [1, 1, 0, 0, 0, 0]
    assert subsequent_chunk_mask(4, 2, num_left_chunks=0).int().tolist()[3] == [0, 0, 1, 1]


def test_dynamic_chunk_rule_matches_wenet():
    """Replay the same RNG draws through the written-out rule."""
    for max_len in (2, 10, 57, 300):
        for seed in range(30):
            torch.manual_seed(seed)
            chunk, left = sample_dynamic_chunk(max_len, use_dynamic_left_chunk=True)
            torch.manual_seed(seed)
            c = int(torch.randint(1, max_len, (1,)))
            if c > max_len // 2:
                assert (chunk, left) == (max_len, -1)
            else:
                c = c % 25 + 1
                max_left = (max_len - 1) // c
                expect_left = int(torch.randint(0, max_left, (1,))) if max_left > 0 else 0
                assert (chunk, left) == (c, expect_left)
                assert 1 <= chunk <= 25
    assert sample_dynamic_chunk(1, True) == (1, -1)


def test_dynamic_chunk_maximum_is_a_parameter():
    """``encoder.max_dynamic_chunk`` replaces WeNet's 25 in ``c % max + 1``; the full-context half is unchanged."""
    for seed in range(40):
        torch.manual_seed(seed)
        chunk, left = sample_dynamic_chunk(300, False, max_chunk=8)
        torch.manual_seed(seed)
        c = int(torch.randint(1, 300, (1,)))
        assert (chunk, left) == ((300, -1) if c > 150 else (c % 8 + 1, -1))
