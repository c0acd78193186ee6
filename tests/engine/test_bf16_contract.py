"""The dtype contract of an expert-parallel MoE layer in bf16, as DeepSpeed's bf16 mode runs it.

DeepSpeed's bf16 mode casts every parameter to bf16 (buffers keep their dtype; no
autocast), so every piece of the layer sees bf16 activations and bf16 weights. The contract:
the router computes its logits, top-k and the softmax over the k in float32
(a few ulps of bf16 would otherwise pick the experts); dispatch, the grouped
experts, both all-to-alls (forward and backward) and the combine stay in
bf16, so the rows that cross ranks are half the bytes of fp32; the layer's
output and every gradient are bf16. Two gloo ranks, ``ep_size`` 2, each
piece wrapped to record the dtypes it takes and gives; the values are
checked against the fp32 layer within bf16's rounding.
"""
from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moe_asr.moe.expert_parallel as expert_parallel
import moe_asr.moe.layer as layer_module
from moe_asr.moe.config import MoEConfig
from moe_asr.moe.layer import MoEFeedForward
from moe_asr.symbols import IGNORE_ID
from tests.engine.test_expert_parallel import whole_and_part

D, F, E, K = 16, 32, 4, 2
BF16, FP32 = torch.bfloat16, torch.float32
# bf16 keeps 8 significant bits (relative rounding 2^-9); through two matmuls and the combine the largest
# error against fp32 measured 4.3e-3 to 5.3e-3 of the output's largest value. A garbled cast (rows
# reinterpreted, weights dropped) is off by the output's whole scale.
TOL = 2e-2


def _record(seen: dict[str, list], phase: list[str], name: str, fn):
    """``fn`` that appends the dtypes of its tensor arguments and result to ``seen["<phase> <name>"]``."""
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        ins = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
        outs = out if isinstance(out, tuple) else (out,)
        seen[f"{phase[0]} {name}"].append((ins, tuple(getattr(o, "dtype", None) for o in outs)))
        return out
    return wrapper


def _worker(rank: int, port: int, counts: tuple[int, int], starve_rank: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        whole, part = whole_and_part(rank, D, F, E, K)
        if starve_rank is not None:  # very negative gate rows: no token picks that rank's experts
            with torch.no_grad():
                for layer in (whole, part):
                    layer.router.gate.weight[starve_rank * 2:(starve_rank + 1) * 2] = -5.0
        for p in part.parameters():         # what DeepSpeed 0.19.8's bf16 mode does: parameters, not buffers
            p.data = p.data.to(BF16)
        assert part.router.choice_bias.dtype == FP32

        seen: dict[str, list] = defaultdict(list)
        phase = ["forward"]
        expert_parallel._all_to_all = _record(seen, phase, "all_to_all", expert_parallel._all_to_all)
        layer_module.permute = _record(seen, phase, "permute", layer_module.permute)
        layer_module.unpermute = _record(seen, phase, "combine", layer_module.unpermute)
        part.experts.grouped = _record(seen, phase, "experts", part.experts.grouped)
        part.router.logits = _record(seen, phase, "router logits", part.router.logits)
        router_forward = part.router.forward

        def routed(x):
            routing, aux = router_forward(x)
            seen["forward routing"].append(((x.dtype,), (routing.weights.dtype, routing.experts.dtype, aux.dtype)))
            return routing, aux
        part.router.forward = routed

        g = torch.Generator().manual_seed(1)
        x_all = torch.randn(sum(counts), D, generator=g)
        if starve_rank is not None:
            x_all = x_all.abs() + 0.1
        mine = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
        x = x_all[mine].to(BF16).requires_grad_()
        y = part(x)
        phase[0] = "backward"
        y.float().square().sum().backward()

        assert seen["forward router logits"] == [((BF16,), (FP32,))]
        assert seen["forward routing"] == [((BF16,), (FP32, torch.int64, FP32))]
        assert seen["forward permute"] == [((BF16,), (BF16,))]
        assert seen["forward experts"] == [((BF16, torch.int64), (BF16,))]
        # the rows to the experts' owners and back, then the gradients of both: bf16 over the wire
        assert seen["forward all_to_all"] == [((BF16,), (BF16,))] * 2
        assert seen["backward all_to_all"] == [((BF16,), (BF16,))] * 2
        assert seen["forward combine"] == [((BF16, FP32), (BF16,))]  # rows and the router's fp32 weights
        assert y.dtype == BF16 and x.grad.dtype == BF16
        grads = {name: p.grad for name, p in part.named_parameters()}
        assert all(g is not None and g.dtype == BF16 for g in grads.values()), \
            {n: None if g is None else g.dtype for n, g in grads.items()}
        if starve_rank == rank:
            assert not part.router.tokens_per_expert[rank * 2:rank * 2 + 2].any()
            assert not any(grads[f"experts.{n}"].any() for n in ("w1", "b1", "w2", "b2"))

        # the values: the fp32 layer on the same (bf16-rounded) inputs and weights, within bf16's rounding
        reference = MoEFeedForward(D, F, MoEConfig(E, K))
        reference.load_state_dict({k: v.to(BF16).float() for k, v in whole.state_dict().items()})
        y_ref = reference(x_all.to(BF16).float())[mine]
        scale = max(float(y_ref.abs().max()), 1e-6) if y_ref.numel() else 1.0
        err = float((y.float() - y_ref).abs().max()) if y.numel() else 0.0
        assert err <= TOL * scale, (err, scale)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("counts,starve_rank,port", [
    ((13, 8), None, 29531),   # uneven token counts
    ((7, 6), 1, 29532),       # rank 1's experts receive no rows: empty bf16 blocks still cross
])
def test_bf16_layer_keeps_its_dtype_contract(counts, starve_rank, port):
    mp.spawn(_worker, args=(port, counts, starve_rank), nprocs=2)


# ---------------------------------------------------------------- under DeepSpeed's bf16 engine

COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single",
               "all_gather_into_tensor")
REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor")


def _engine_worker(rank: int, port: int, ds_json: str, seen: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    from moe_asr.engine.deepspeed_engine import build_engine, deepspeed_config
    from moe_asr.engine.distributed import init_distributed
    from moe_asr.train import load_experiment
    from tests.engine.conftest import REPO, SMALL_MODEL

    info = init_distributed()
    try:
        cfg = load_experiment(str(REPO / "conf" / "tiny_moe.yaml"),
                              [f"{k}={v}" for k, v in SMALL_MODEL.items()] + ["parallel.ep_size=2"])
        tm = build_engine(cfg, deepspeed_config(ds_json, cfg.train), info)
        calls: list[tuple[str, str, torch.dtype, int]] = []
        phase = ["forward"]

        def recorded(name, fn):
            def wrapper(tensor, *args, **kwargs):
                calls.append((phase[0], name, tensor.dtype, tensor.numel()))
                return fn(tensor, *args, **kwargs)
            return wrapper
        for name in COLLECTIVES:  # DeepSpeed's comm and our exchange call these by attribute, at call time
            setattr(dist, name, recorded(name, getattr(dist, name)))

        g = torch.Generator().manual_seed(rank)
        feats = torch.randn(2, 120, 80, generator=g).to(BF16)
        targets = torch.randint(3, 18, (2, 6), generator=g)
        targets[1, 4:] = IGNORE_ID
        out = tm.engine(feats, torch.tensor([120, 90]), targets, torch.tensor([6, 4]))
        phase[0] = "backward"
        tm.engine.backward(out["loss"])
        tm.engine.step()
        dense = sum(p.numel() for n, p in tm.model.named_parameters() if ".experts." not in n)
        if rank == 0:
            seen.update(params=[p.dtype for p in tm.model.parameters()], calls=calls, dense=dense,
                        engine_comm=str(tm.engine.communication_data_type))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("ds_config,port", [("zero1_bf16.json", 29533), ("zero2_bf16.json", 29534)])
def test_bf16_engine_reduces_gradients_in_fp32_and_exchanges_bf16_rows(ds_config, port):
    """DeepSpeed 0.19.8 reduces gradients in ``communication_data_type``, bf16 by default in bf16 mode;
    the shipped bf16 configs ask for fp32, so gradients summed over many ranks round once, not at every
    hop. What crosses the wire, recorded on the real engine's first step (ep_size 2 over 2 ranks)."""
    from moe_asr.engine.deepspeed_engine import deepspeed_config
    from moe_asr.run.config import TrainConfig
    from tests.engine.conftest import REPO

    path = str(REPO / "ds_configs" / ds_config)
    assert deepspeed_config(path, TrainConfig())["communication_data_type"] == "fp32"
    with mp.Manager() as manager:
        seen = manager.dict()
        mp.spawn(_engine_worker, args=(port, path, seen), nprocs=2)
        seen = dict(seen)
    assert set(seen["params"]) == {BF16} and seen["engine_comm"] == "torch.float32"
    rows = {(phase, dtype) for phase, name, dtype, _ in seen["calls"] if name == "all_to_all_single"
            and dtype.is_floating_point}
    assert rows == {("forward", BF16), ("backward", BF16)}, seen["calls"]
    reduced = [(dtype, n) for phase, name, dtype, n in seen["calls"]
               if phase == "backward" and name in REDUCTIONS and dtype.is_floating_point and n > 1]
    assert {dtype for dtype, _ in reduced} == {FP32}, seen["calls"]
    assert sum(n for _, n in reduced) >= seen["dense"], (seen["dense"], reduced)  # the gradients, not scalars
