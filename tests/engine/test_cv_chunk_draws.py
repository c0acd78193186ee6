"""A CV batch's dynamic-chunk draw depends on the batch alone, not on where in the CV pass it comes.

Ranks read their CV shards in their own order, so a draw from one stream seeded once per pass gave the same
weights a CV loss that changed with the world size (18.4317 on 8 ranks, 18.4242 on one). ``Trainer.evaluate``
seeds the forked RNG from each batch's keys; here a stand-in engine returns a random number as every loss,
so the CV loss is a function of the draws alone.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from moe_asr.data.batch import Batch
from moe_asr.engine.loop import Trainer
from moe_asr.model.u2pp import LOSS_KEYS


class _DrawingEngine:
    def eval(self) -> None: ...

    def train(self) -> None: ...

    def __call__(self, feats, feats_lengths, targets, target_lengths) -> dict[str, torch.Tensor]:
        draw = torch.randint(1, 1000, (1,)).float()[0]  # what the dynamic-chunk mask draws
        return {k: draw for k in LOSS_KEYS}


class _Loader(list):
    skipped: dict = {}


def _batch(keys: list[str]) -> Batch:
    n = len(keys)
    return Batch(keys, torch.zeros(n, 10, 4), torch.full((n,), 10), torch.ones(n, 2, dtype=torch.long),
                 torch.full((n,), 2))


def _cv_loss(batches: list[Batch], seed: int = 7) -> float:
    trainer = SimpleNamespace(
        engine=_DrawingEngine(), info=SimpleNamespace(device=torch.device("cpu")), dtype=torch.float32,
        cfg=SimpleNamespace(parallel=SimpleNamespace(ep_size=1), train=SimpleNamespace(seed=seed),
                            model=SimpleNamespace(input_dim=4)),
        cv_loader=_Loader(batches), train_loader=_Loader(), state=SimpleNamespace(step=0, epoch=0),
        logger=SimpleNamespace(epoch_data=lambda *args: None))
    return Trainer.evaluate(trainer)["loss"]


def test_the_same_cv_batches_in_another_order_give_the_same_cv_loss():
    batches = [_batch([f"u{i}_{j}" for j in range(i + 1)]) for i in range(6)]  # the loss weights batch sizes
    forward, backward = _cv_loss(batches), _cv_loss(batches[::-1])
    assert forward == backward
    assert _cv_loss(batches, seed=8) != forward  # the run's seed still decides the draws
    state = torch.random.get_rng_state()
    _cv_loss(batches)
    assert torch.equal(torch.random.get_rng_state(), state), "CV must not move the training RNG"
