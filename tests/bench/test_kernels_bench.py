"""bench.kernels' grouped_mm peer computes the layer it is timed against."""
import torch

from bench.kernels import Case, build


def test_grouped_mm_peer_equals_the_loop_layer_on_the_same_weights():
    case = Case(experts=4, tokens=40, routing="skewed", backward=False, d=8, ffn=16)
    peer, x = build(case, "grouped_mm", "cpu", torch.float32)
    loop, x_loop = build(case, "loop", "cpu", torch.float32)
    assert torch.equal(x, x_loop)
    with torch.inference_mode():
        counts = torch.bincount(peer.router(x)[0].experts.flatten(), minlength=4)
        torch.testing.assert_close(peer.eval()(x), loop.eval()(x))
    assert (counts == 0).any() or counts.max() > 2 * counts.min()  # uneven groups, not only equal ones
