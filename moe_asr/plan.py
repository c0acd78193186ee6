"""What a training layout costs per GPU, before a GPU-hour is spent (``moe-asr plan``).

Model states are derived, byte for byte, the way DeepSpeed 0.19.8's ZeRO 1/2 optimizer
(``runtime/zero/stage_1_and_2.py``) lays them out for our parameter groups
(``moe_asr.engine.optim.param_groups``: weight matrices decayed, the rest not, each split into a
non-expert group and expert groups of at most ``MAX_EXPERT_GROUP`` elements):

* every group is flattened into one buffer in the training dtype, padded to a multiple of
  ``2 x`` the ranks it is partitioned over; non-expert groups are partitioned over all ranks,
  expert groups (this rank's ``num_experts / ep_size`` experts of each layer) over the ranks that
  hold the same experts (``world / ep_size``); every rank keeps the whole buffer;
* the rank's partition (buffer / ranks) gets an fp32 master copy and Adam's two fp32 moments;
* the reduced gradients kept for the step are those of every parameter that overlaps the rank's
  partition, whole (``grads_in_partition``), in the training dtype;
* the backward's reduction buckets: ``reduce_bucket_size`` elements in the training dtype, two of
  them with ``overlap_comm``;
* ZeRO stage 0 (fp32 only, ``Stage0AdamW``): every parameter, its gradient and two moments, unpadded.

Activations and FLOPs are measured, not derived: one training forward of a probe utterance on this
CPU in the layout's dtype, counting the bytes of every tensor autograd keeps for the backward (the
weights a matmul keeps are model states, left out) and the FLOPs (``torch.utils.flop_counter``, the
experts run one by one, so each counts the rows it gets), scaled to the batch's frames. The same
probe counts the rows each MoE layer routes, from which the all-to-all bytes follow.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_asr.model.config import ModelConfig
from moe_asr.model.u2pp import build_model
from moe_asr.moe.layer import MoEFeedForward
from moe_asr.run.config import ExperimentConfig, decayed, precision, zero_stage

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIGNMENT = 2                 # DeepSpeed's nccl_start_alignment_factor: a group pads to 2 x its ranks elements
MAX_EXPERT_GROUP = 178956971  # deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer
FRAMES_PER_SECOND = 100       # 10 ms frame shift
PARTS = ("parameters", "gradients", "master_weights", "optimizer_states")


class PlanError(ValueError):
    """A layout that cannot train the config (the message names the option)."""


@dataclass(frozen=True)
class Layout:
    """How a run is laid out over GPUs and what one GPU's batch holds."""

    gpus_per_node: int = 8
    nodes: int = 1
    ep_size: int = 1
    zero_stage: int = 2
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    frames_per_batch: int = 12000
    reduce_bucket_size: int = 200_000_000  # elements, as in ds_configs/zero{1,2}_bf16.json
    overlap_comm: bool = True

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @classmethod
    def from_deepspeed(cls, ds_config: dict, **layout) -> "Layout":
        """A layout whose ZeRO stage, dtype and buckets are a DeepSpeed config's (its defaults where unset)."""
        zero = ds_config.get("zero_optimization", {})
        return cls(zero_stage=zero_stage(ds_config), dtype=precision(ds_config),
                   reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)),
                   overlap_comm=bool(zero.get("overlap_comm", False)), **layout)

    def check(self, num_experts: int) -> None:
        if self.gpus_per_node < 1 or self.nodes < 1:
            raise PlanError(f"--gpus-per-node and --nodes must be >= 1, got {self.gpus_per_node} and {self.nodes}")
        if self.zero_stage not in (0, 1, 2):
            raise PlanError(f"--zero-stage {self.zero_stage}: DeepSpeed MoE layers train at ZeRO 0, 1 or 2")
        if self.zero_stage == 0 and self.dtype != "fp32":
            raise PlanError(f"--zero-stage 0 trains in fp32 only (the engine refuses {self.dtype} there)")
        if self.ep_size < 1 or self.world % self.ep_size or num_experts % self.ep_size:
            raise PlanError(f"--ep-size {self.ep_size} must divide the {self.world} GPUs and the "
                            f"{num_experts} experts")
        if self.frames_per_batch < 1:
            raise PlanError(f"--frames-per-batch must be >= 1, got {self.frames_per_batch}")


@dataclass(frozen=True)
class Param:
    """A model parameter as the optimizer groups it: its elements, expert or not, weight-decayed or not."""

    numel: int
    expert: bool
    decay: bool


@dataclass(frozen=True)
class Group:
    """One ZeRO parameter group on one rank: its parameters' elements (in order) and its partitioning."""

    numels: tuple[int, ...]
    ranks: int       # the ranks it is partitioned over
    position: int    # this rank's partition
    expert: bool

    @property
    def padded(self) -> int:
        align = ALIGNMENT * self.ranks
        return math.ceil(sum(self.numels) / align) * align

    @property
    def partition(self) -> int:
        return self.padded // self.ranks

    @property
    def padding(self) -> int:
        """Padding elements inside this rank's partition (the tail of the buffer falls in the last ones).

        A checkpoint keeps the fp32 master partition without them, Adam's moments with them."""
        left, total = self.partition * self.position, sum(self.numels)
        return min(self.partition, max(0, left + self.partition - total))

    @property
    def gradient_elements(self) -> int:
        """Elements of the parameters that overlap this rank's partition (DeepSpeed's get_partition_info)."""
        start, end = self.partition * self.position, self.partition * (self.position + 1)
        kept, offset = 0, 0
        for n in self.numels:
            if start <= offset < end or offset < start < offset + n:
                kept += n
            offset += n
        return kept


def parameters(model: ModelConfig) -> list[Param]:
    """The model's trainable parameters in the optimizer's order (built on the meta device: no memory)."""
    with torch.device("meta"):
        net = build_model(model, load_cmvn=False)
    experts = {id(p) for m in net.modules() if isinstance(m, MoEFeedForward) and m.num_experts > 1
               for p in m.experts.parameters()}
    return [Param(p.numel(), id(p) in experts, decayed(p.ndim - (id(p) in experts)))
            for p in net.parameters() if p.requires_grad]


def optimizer_groups(params: list[Param], layout: Layout, rank: int) -> list[Group]:
    """The ZeRO groups of ``rank``: non-expert decay / no-decay, then the expert ones in chunks."""
    ep = layout.ep_size
    groups = [Group(tuple(p.numel for p in params if not p.expert and p.decay == d), layout.world, rank, False)
              for d in (True, False)]
    for d in (True, False):
        chunks: list[list[int]] = [[]]
        for p in params:
            if p.expert and p.decay == d:
                local = p.numel // ep  # the stacked experts of a layer are split over the ep group
                if sum(chunks[-1]) + local > MAX_EXPERT_GROUP:
                    chunks.append([])
                chunks[-1].append(local)
        groups += [Group(tuple(c), layout.world // ep, rank // ep, True) for c in chunks]
    return [g for g in groups if g.numels]


def model_states(params: list[Param], layout: Layout, rank: int) -> dict[str, dict[str, int]]:
    """Bytes ``rank`` holds of each part (``PARTS``), expert and non-expert apart."""
    out = {part: {"expert": 0, "dense": 0} for part in PARTS}
    size = DTYPES[layout.dtype].itemsize
    for g in optimizer_groups(params, layout, rank):
        kind = "expert" if g.expert else "dense"
        if layout.zero_stage == 0:  # Stage0AdamW over every (local) parameter, all fp32
            n = sum(g.numels)
            parts = {"parameters": 4 * n, "gradients": 4 * n, "master_weights": 0, "optimizer_states": 8 * n}
        else:
            parts = {"parameters": size * g.padded, "gradients": size * g.gradient_elements,
                     "master_weights": 4 * g.partition, "optimizer_states": 8 * g.partition}
        for part, b in parts.items():
            out[part][kind] += b
    return out


def bucket_bytes(layout: Layout) -> int:
    """The backward's gradient-reduction buckets (ZeRO 1/2 with contiguous gradients)."""
    if layout.zero_stage == 0:
        return 0
    return layout.reduce_bucket_size * DTYPES[layout.dtype].itemsize * (2 if layout.overlap_comm else 1)


@dataclass
class Probe:
    """One training forward of one utterance: bytes kept for backward, FLOPs, rows routed per MoE layer."""

    frames: int
    tokens: int
    saved_bytes: int
    forward_flops: int
    moe_rows: dict[str, int]   # layer name -> rows it routed
    d_model: int


def probe(model: ModelConfig, frames: int, tokens: int, dtype: torch.dtype = torch.bfloat16) -> Probe:
    """Run one training forward of random features on this CPU and measure it (see the module doc)."""
    cfg = dataclasses.replace(model, cmvn=None, moe=dataclasses.replace(model.moe, impl="loop"))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        net = build_model(cfg).train()
    finally:
        torch.set_default_dtype(default)
    feats = torch.randn(1, frames, cfg.input_dim, dtype=dtype)
    targets = torch.randint(3, cfg.vocab_size - 1, (1, tokens))
    weights = {t.untyped_storage().data_ptr() for t in (*net.parameters(), *net.buffers())}
    kept: dict[int, int] = {}
    rows: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # the weights a matmul keeps are model states, counted apart
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: rows.__setitem__(name, args[0].shape[:-1].numel()))
             for name, m in net.named_modules() if isinstance(m, MoEFeedForward) and m.num_experts > 1]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as flops:
            out = net(feats, torch.tensor([frames]), targets, torch.tensor([tokens]))
            assert out["loss"].requires_grad
    finally:
        for h in hooks:
            h.remove()
    return Probe(frames, tokens, sum(kept.values()), flops.get_total_flops(), rows, cfg.encoder.output_size)


def all_to_all(p: Probe, scale: float, top_k: int, layout: Layout) -> dict:
    """Bytes one rank sends in each MoE layer's all-to-alls per step, under uniform routing.

    Each of a layer's rows goes to ``top_k`` experts; with every expert equally likely, a fraction
    ``(ep - 1) / ep`` of those copies belongs to another rank. The forward sends them out (dispatch) and
    takes the results back (combine), two all-to-alls of that size; the backward runs both again with
    the gradients. The rows of a layer are the probe's, times the batch's frames over the probe's.
    """
    size = DTYPES[layout.dtype].itemsize
    leaving = (layout.ep_size - 1) / layout.ep_size
    layers = {}
    for name, rows in p.moe_rows.items():
        one = rows * scale * top_k * p.d_model * size * leaving  # one all-to-all of the layer
        layers[name] = {"rows": round(rows * scale), "forward_bytes": round(2 * one), "backward_bytes": round(2 * one)}
    total = sum(v["forward_bytes"] + v["backward_bytes"] for v in layers.values())
    return {"assumption": "uniform routing: (ep_size - 1) / ep_size of each row's top_k copies leave the rank",
            "layers": layers, "step_bytes": total}


def plan(config: ExperimentConfig, layout: Layout, utt_seconds: float = 12.3, tokens_per_second: float = 4.0,
         measured: Probe | None = None) -> dict:
    """Everything ``moe-asr plan`` prints, for the most loaded rank (the one that must fit)."""
    layout.check(config.model.moe.num_experts)
    params = parameters(config.model)
    ranks = [model_states(params, layout, r) for r in range(layout.world)]
    totals = [sum(sum(part.values()) for part in r.values()) for r in ranks]
    rank = max(range(layout.world), key=totals.__getitem__)
    frames = round(utt_seconds * FRAMES_PER_SECOND)
    p = measured or probe(config.model, frames, max(1, round(utt_seconds * tokens_per_second)), DTYPES[layout.dtype])
    scale = layout.frames_per_batch / p.frames  # utterances of the probe's length in a batch
    activations = round(p.saved_bytes * scale)
    buckets = bucket_bytes(layout)
    expert = sum(x.numel for x in params if x.expert)
    return {
        "config": {"total_params": sum(x.numel for x in params), "expert_params": expert,
                   "dense_params": sum(x.numel for x in params) - expert,
                   "num_experts": config.model.moe.num_experts, "top_k": config.model.moe.top_k},
        "layout": {**dataclasses.asdict(layout), "world": layout.world},
        "rank": rank,
        "model_states": ranks[rank],
        "model_states_bytes": totals[rank],
        "buckets_bytes": buckets,
        "activations": {"bytes": activations, "probe_frames": p.frames, "probe_tokens": p.tokens,
                        "probe_bytes": p.saved_bytes, "utterances_per_batch": scale},
        "total_bytes": totals[rank] + buckets + activations,
        "all_to_all": all_to_all(p, scale, config.model.moe.top_k, layout),
        "flops_per_step": round(3 * p.forward_flops * scale),
    }
