"""launch/train.py on fixed synthetic batches: every optimizer step trains on the same global batch of
``GLOBAL_MICRO`` micro-batches, whatever the world size, and each micro-batch is computed the same way
whichever rank runs it.

Micro-batch ``g = GLOBAL_MICRO * step + j`` of an epoch is a pure function of ``(epoch, g)``. A world of
W ranks with ``train.accum_grad = GLOBAL_MICRO / W`` gives rank r the micro-batches ``j = r*A .. r*A+A-1``
of every step (A = accum_grad): DeepSpeed averages a step's gradients over the micro-batches (1/A each)
and then over the ranks (1/W), so one rank with A = 8 and eight ranks with A = 1 take the same step.
(Random draws in the forward, dropout and dynamic chunks, come from each rank's own RNG stream in
the order it runs its batches: the tests turn both off.) Micro-batches with
``j < SMALL`` hold one short utterance (fewer tokens than ``skewed_router.STARVE_BELOW`` in every MoE
layer), the others two longer ones. CV is ``CV_BATCHES`` fixed batches, rank r reading ``r, r+W, ...``.

The loaders are ``AsrDataLoader``s whose batches come from here: its position, resume state and rank
agreement are the real ones; the shard lists given on the command line are never opened. The expert-
bias script's patches come along with its ``main``: each rank leaves its own routed tokens per step in
the out-dir; so do ``plan_training.py``'s: each rank leaves the bytes of its ZeRO buffers at the first
step (``plan_rank_<r>.json``), for the comparison with ``moe-asr plan``.
"""
import sys
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import moe_asr.data.loader as loader_module  # noqa: E402
from moe_asr.data.batch import Batch  # noqa: E402
from moe_asr.data.config import DataConfig  # noqa: E402
from moe_asr.data.tokenizer import Tokenizer  # noqa: E402
from moe_asr.symbols import IGNORE_ID  # noqa: E402

GLOBAL_MICRO = 8     # micro-batches per optimizer step, over all ranks
SMALL = 4            # the first SMALL of each step are small
EPOCH_STEPS = 2      # optimizer steps per epoch
CV_BATCHES = 8
INPUT_DIM = 80
TOKENS = range(3, 18)  # letters of the test units (blank, unk and the word mark below, <sos/eos> above)


def _batch(key: str, seed: int, frames: list[int], tokens: list[int]) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.zeros(len(frames), max(frames), INPUT_DIM)
    targets = torch.full((len(tokens), max(tokens)), IGNORE_ID, dtype=torch.long)
    for i, (t, u) in enumerate(zip(frames, tokens)):
        feats[i, :t] = torch.randn(t, INPUT_DIM, generator=gen)
        targets[i, :u] = torch.randint(TOKENS.start, TOKENS.stop, (u,), generator=gen)
    return Batch([f"{key}-{i}" for i in range(len(frames))], feats, torch.tensor(frames), targets,
                 torch.tensor(tokens))


def micro_batch(epoch: int, g: int) -> Batch:
    """Training micro-batch ``g`` of ``epoch``."""
    seed = 1000 * epoch + g
    if g % GLOBAL_MICRO < SMALL:  # 40 frames: 9 encoder tokens after 4x subsampling; 3 decoder tokens
        return _batch(f"train{seed}", seed, [40], [2])
    return _batch(f"train{seed}", seed, [100, 88], [8, 7])


def cv_batch(c: int) -> Batch:
    return _batch(f"cv{c}", 10_000 + c, [60 + 8 * c, 50], [4, 3 + c % 3])


class FixedBatches(loader_module.AsrDataLoader):
    """This rank's share of the fixed batches, from the position the loader's state holds."""

    def _ordered(self, state: dict, log_details: bool) -> Iterator[Batch]:
        if self.train:
            per_rank = GLOBAL_MICRO // self.world_size
            mine = [step * GLOBAL_MICRO + self.rank * per_rank + k for step in range(EPOCH_STEPS)
                    for k in range(per_rank)]
            batches = (micro_batch(self.epoch, g) for g in mine[state["batches_delivered"]:])
        else:
            batches = (cv_batch(c) for c in range(self.rank, CV_BATCHES, self.world_size))
        for batch in batches:
            state["batches_delivered"] += 1
            yield batch


def fixed_loader(cfg: DataConfig, split: str = "train", tokenizer: Tokenizer | None = None,
                 rank: int | None = None, world_size: int | None = None) -> FixedBatches:
    """``build_loader``'s stand-in."""
    world = loader_module.rank_and_world(rank, world_size)[1]
    # The base class checks that its shards exist and feed every rank; it never opens them here.
    return FixedBatches([__file__] * world, cfg, tokenizer, train=split == "train", rank=rank,
                        world_size=world_size, sync_ranks=split == "train")


if __name__ == "__main__":  # patched only here: the tests import the constants above
    import tests.engine.plan_training  # noqa: F401  (its patches: each rank dumps its ZeRO buffers' bytes)
    from tests.engine.expert_bias_training import main  # with its patches: each rank dumps its routed tokens

    loader_module.build_loader = fixed_loader
    sys.exit(main())
