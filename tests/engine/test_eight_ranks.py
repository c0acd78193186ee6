"""Eight CPU ranks at every expert-parallel layout train exactly what one rank trains on the same global batch.

The reference is one process (``ep_size`` 1, ZeRO 1) that accumulates eight micro-batches per step
(``train.accum_grad`` 8). Each layout is eight gloo ranks, one thread each, with ``ep_size`` 8, 4 or 2
(8, 4 or 2 experts' owners in an expert-parallel group, data parallel 1, 2 or 4 inside the world) at
ZeRO 1 and 2, one micro-batch per rank and step. ``eight_rank_training.py`` feeds the same global batch
to both: micro-batch ``j`` of a step goes to rank ``j`` (of eight) or is the reference's ``j``-th, so
both runs compute the same per-micro-batch losses and DeepSpeed averages the same gradients (1/8 each:
over the accumulated micro-batches in the reference, over the ranks in a layout). What a forward draws
at random comes from the RNG stream of the rank that runs it, in the order it runs its batches, so
nothing is drawn: dropout is off and the encoder's attention has a fixed chunk (4 frames) instead of
dynamic chunks (CV losses too would otherwise differ between layouts: each rank draws a CV batch's
chunk from the same seed, in its own batch order). As in the two-rank proof
(``test_expert_parallel_training.py``), AdamW's eps is far above the clipped gradients, so the update is
linear in the gradient and a wrongly reduced expert gradient shows in the weights.

The router (``skewed_router.py``) gives expert 0 every token and, on a rank whose micro-batch is small
(the first four of each step), never chooses the upper half of the experts. So at ``ep_size`` 4 and 2 the
last rank of the first expert-parallel group receives no rows in any MoE layer while the same experts'
copy in the last group receives some: the two members of one expert-data-parallel group hold a
gradient of zeros and a real one, and must still reduce the same buckets (DeepSpeed's ZeRO 1/2 bucket
only gradients that exist). The per-rank routed-token dumps show that this happened.

What is equal, and how closely (fp32): the training and CV losses to a relative 1e-6 and every
consolidated weight (``read_deepspeed_model``) to 1e-6 relative plus 1e-7 absolute. Nothing is
bit-identical, because the order of fp32 sums differs: the reference adds eight micro-batch gradients
in turn, a layout's all-reduce adds the ranks' in gloo's order, and expert rows are summed in another
order after the all-to-all. Measured: losses within 3e-8 relative, weights within 3e-8 absolute
after two steps, and after the resume.

The ep 8 run's checkpoint then continues at ep 2 (ZeRO 2) through ``moe-asr convert ds-to-pt
--with-optimizer`` and ``launch/train.py --init-from``, and its steps 3 and 4 equal the reference's
uninterrupted steps 3 and 4 (losses, CV loss, weights, and the routing, starved rank included).
Carried over: the weights, AdamW's moments and step, the LR schedule position and the step and sample
counters (the file's training state; the moments themselves are checked against the reference's),
and, the world size being the same, each rank's data position and RNG: the stopped run had read all
of epoch 0 without closing it, and the resumed one reads nothing more of it and goes on with epoch 1,
as the reference does (from the epoch's first batch it would train epoch 0 again, with other losses).

Every run's ``metrics.jsonl`` counts no utterance ``dropped: uneven ranks``: the fixed batches give each
rank the same number of micro-batches a step, so the equal-step rule leaves nothing out of the proof.
The same layout runs prove ``moe-asr plan``'s model-state bytes, rank by rank, with
``test_plan_exact.py``'s comparison: each rank dumps its ZeRO buffers at the first step
(``plan_training.py``'s patches) and the epoch's checkpoint holds its optimizer partitions.
"""
from __future__ import annotations

import json

import pytest
import torch

from moe_asr.checkpoint import read_model_state
from moe_asr.cli import main as cli
from moe_asr.data.stats import UNEVEN_RANKS
from moe_asr.plan import Layout
from moe_asr.run.layout import CHECKPOINTS, INDEX, read_deepspeed_model
from moe_asr.train import load_experiment
from tests.engine.conftest import REPO, UNITS, Corpus, read_metrics, run_training, train_cmd
from tests.engine.eight_rank_training import EPOCH_STEPS, GLOBAL_MICRO, SMALL
from tests.engine.test_expert_parallel_training import NO_DROPOUT
from tests.engine.test_plan_exact import assert_ranks_hold_plan

WORLD = 8
STEPS = EPOCH_STEPS     # each layout: one epoch, ending in CV and a checkpoint
RESUMED_STEPS = 2 * STEPS  # the reference, and the ep 8 run continued at ep 2
EXPERTS = 8
LAYOUTS = [(8, 1), (8, 2), (4, 1), (4, 2), (2, 1), (2, 2)]  # (ep_size, ZeRO stage)
PORTS = {layout: 29801 + i for i, layout in enumerate(LAYOUTS)}
RESUME_PORT = 29807
SCRIPT = str(REPO / "tests/engine/eight_rank_training.py")
TIMEOUT = 400  # eight ranks on two cores start in about a minute

# Smaller than SMALL_MODEL: eight ranks share two cores. Every FFN is an 8-expert MoE.
MODEL = {
    "model.vocab_size": len(UNITS), "model.input_dim": 80,
    "model.encoder.output_size": 16, "model.encoder.attention_heads": 2, "model.encoder.linear_units": 16,
    "model.encoder.num_blocks": 1, "model.encoder.cnn_module_kernel": 3,
    "model.decoder.attention_heads": 2, "model.decoder.linear_units": 16, "model.decoder.num_blocks": 1,
    "model.decoder.r_num_blocks": 1, "model.moe.num_experts": EXPERTS, "model.moe.top_k": 2,
    "model.moe.router": "tests.engine.skewed_router:SkewedRouter",
    "model.encoder.use_dynamic_chunk": False, "model.encoder.static_chunk_size": 4,
}
LOSSES = ("loss", "loss_ctc", "loss_l2r", "loss_r2l")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    """The symbol table; the shard lists are never read (the batches come from eight_rank_training.py)."""
    root = tmp_path_factory.mktemp("eight_ranks")
    units = root / "units.txt"
    units.write_text("".join(f"{t} {i}\n" for i, t in enumerate(UNITS)))
    unread = root / "unread.list"
    unread.write_text("")
    return Corpus(unread, unread, units)


def _overrides(corpus: Corpus, nproc: int, ep_size: int, max_steps: int) -> dict:
    return {**MODEL, **NO_DROPOUT, "data.tokenizer.symbol_table": str(corpus.units), "data.num_workers": 0,
            "parallel.ep_size": ep_size, "train.accum_grad": GLOBAL_MICRO // nproc,
            "train.max_steps": max_steps, "train.log_interval": 1,
            "train.warmup_steps": 3, "train.decay": "noam", "train.lr": 0.002, "train.grad_clip": 0.01,
            "train.eps": 1e-3}


def _ds_config(stage: int):
    return REPO / f"ds_configs/zero{stage}_cpu.json"


def _train(corpus: Corpus, out_dir, nproc: int, ep_size: int, stage: int, max_steps: int, port: int,
           extra: tuple[str, ...] = ()) -> None:
    cmd = train_cmd(corpus, out_dir, str(_ds_config(stage)), _overrides(corpus, nproc, ep_size, max_steps), port,
                    nproc=nproc, launcher="python" if nproc == 1 else "torchrun", script=SCRIPT)
    run_training(cmd + list(extra), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One rank, ZeRO 1, eight micro-batches a step, two epochs (CV and a checkpoint after each)."""
    out_dir = tmp_path_factory.mktemp("one_rank")
    _train(corpus, out_dir, 1, 1, 1, RESUMED_STEPS, 0)
    return out_dir


@pytest.fixture(scope="module")
def layout_runs(corpus, tmp_path_factory):
    """``run(ep_size, stage)``: the out-dir of that eight-rank layout's run, trained on first use."""
    done = {}

    def run(ep_size: int, stage: int):
        if (ep_size, stage) not in done:
            out_dir = tmp_path_factory.mktemp(f"ep{ep_size}_zero{stage}")
            _train(corpus, out_dir, WORLD, ep_size, stage, STEPS, PORTS[ep_size, stage])
            done[ep_size, stage] = out_dir
        return done[ep_size, stage]

    return run


def _train_losses(out_dir) -> dict[int, tuple[float, ...]]:
    return {r["step"]: tuple(r[k] for k in LOSSES) for r in read_metrics(out_dir) if "loss" in r}


def _checkpoint(out_dir, step: int) -> dict:
    """The index entry of the checkpoint written after ``step`` (its tag and CV loss)."""
    return next(c for c in json.loads((out_dir / CHECKPOINTS / INDEX).read_text()) if c["step"] == step)


def _assert_nothing_dropped(out_dir) -> None:
    """No utterance was left out by the equal-step rule (``dropped: uneven ranks``), in any step or epoch record:
    the fixed batches give every rank the same number a step, so the proof trains on the whole global batch."""
    records = read_metrics(out_dir)
    counts = [r[key][UNEVEN_RANKS] for r in records for key in ("data_skipped", "data_skipped_epoch") if key in r]
    assert any("data_skipped_epoch" in r for r in records) and counts == [0] * len(counts)


def _assert_same_training(run, reference, steps: range) -> None:
    """Losses of ``steps``, the CV loss and the weights at the last of them: the reference's; nothing dropped."""
    _assert_nothing_dropped(run)
    _assert_nothing_dropped(reference)
    ours, theirs = _train_losses(run), _train_losses(reference)
    assert sorted(ours) == list(steps)
    for step in steps:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-6), step
    ckpts = [_checkpoint(d, steps[-1]) for d in (run, reference)]
    assert ckpts[0]["cv_loss"] == pytest.approx(ckpts[1]["cv_loss"], rel=1e-6)
    a, b = (read_deepspeed_model(d / CHECKPOINTS / c["tag"]) for d, c in zip((run, reference), ckpts))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def _rank_tokens(out_dir, world: int) -> torch.Tensor:
    """Each rank's own routed tokens ``[rank, step, layer, expert]`` (before the ranks' counts are summed)."""
    return torch.stack([torch.load(out_dir / f"choice_bias_rank_{r}.pt")["local_tokens"] for r in range(world)])


def _assert_skewed_and_starved(tokens: torch.Tensor, reference: torch.Tensor, ep_size: int) -> None:
    """The ranks routed what the reference did in the same steps (``[step, layer, expert]``), expert 0 took
    every token, and (1 < ep_size < world) one rank's experts got no rows while the same experts' copy in
    another group got some."""
    torch.testing.assert_close(tokens.sum(0), reference, rtol=0, atol=0)  # same routing, per step and layer
    per_expert = tokens.sum(0)                                                     # [step, layer, expert]
    assert torch.equal(per_expert[..., 0] * 2, per_expert.sum(-1)), "expert 0 must be in every token's top 2"
    per_rank = EXPERTS // ep_size
    assert (per_expert[..., :per_rank].sum(-1) * 2 >= per_expert.sum(-1)).all()  # rank 0's share >= 1/2
    if ep_size == WORLD:
        return
    groups = tokens.view(WORLD // ep_size, ep_size, *tokens.shape[1:]).sum(1)  # rows each group's owners get
    last = slice(EXPERTS - per_rank, EXPERTS)                                   # the last owner's experts
    starved, fed = groups[0, ..., last].sum(-1), groups[-1, ..., last].sum(-1)  # [step, layer]
    assert ep_size <= SMALL <= WORLD - ep_size  # the first group's micro-batches are small, the last's not
    assert (starved == 0).all(), "the first group's last rank must get no rows in any layer"
    assert (fed.amax(-1) > 0).all(), "its expert-data-parallel peer must get rows at every step"


@pytest.mark.slow
@pytest.mark.parametrize("ep_size,stage", LAYOUTS)
def test_eight_ranks_equal_one_rank(layout_runs, reference, ep_size, stage):
    run = layout_runs(ep_size, stage)
    _assert_same_training(run, reference, range(1, STEPS + 1))
    _assert_skewed_and_starved(_rank_tokens(run, WORLD), _rank_tokens(reference, 1)[0, :STEPS], ep_size)


@pytest.mark.slow
def test_ep8_checkpoint_continues_at_ep2(layout_runs, reference, corpus, tmp_path):
    ep8 = layout_runs(8, 1)
    files = {}
    for name, run in (("ep8", ep8), ("reference", reference)):
        files[name] = tmp_path / f"{name}.pt"
        assert cli(["convert", "ds-to-pt", str(run), "--tag", _checkpoint(run, STEPS)["tag"], "--with-optimizer",
                    "-o", str(files[name])]) == 0
    ours, theirs = (read_model_state(files[n]).extra["training_state"] for n in ("ep8", "reference"))
    counters = ("step", "adam_step", "lr_step", "global_samples")
    assert [ours[k] for k in counters] == [theirs[k] for k in counters] == [STEPS, STEPS, STEPS, STEPS * GLOBAL_MICRO]
    assert ours["moments"].keys() == theirs["moments"].keys()
    for key in ("exp_avg", "exp_avg_sq"):  # to 1e-6 of the largest of the kind (a key bias's are rounding noise)
        scale = max(m[key].abs().max().item() for m in theirs["moments"].values())
        for name, moments in ours["moments"].items():
            torch.testing.assert_close(moments[key], theirs["moments"][name][key], rtol=1e-5, atol=1e-6 * scale,
                                       msg=f"{name} {key}")

    resumed = tmp_path / "ep2"
    _train(corpus, resumed, WORLD, 2, 2, RESUMED_STEPS, RESUME_PORT, ("--init-from", str(files["ep8"])))
    _assert_same_training(resumed, reference, range(STEPS + 1, RESUMED_STEPS + 1))
    _assert_skewed_and_starved(_rank_tokens(resumed, WORLD), _rank_tokens(reference, 1)[0, STEPS:], 2)


@pytest.mark.slow
@pytest.mark.parametrize("ep_size,stage", LAYOUTS)
def test_plan_states_equal_what_each_rank_holds(layout_runs, corpus, ep_size, stage):
    """``moe-asr plan``'s model-state bytes for this config and layout: every rank's ZeRO buffers at the first
    step and its optimizer partitions in the epoch's checkpoint (``test_plan_exact.py``'s comparison)."""
    run = layout_runs(ep_size, stage)
    overrides = _overrides(corpus, WORLD, ep_size, STEPS)
    config = load_experiment(str(REPO / "conf/tiny_moe.yaml"), [f"{k}={v}" for k, v in overrides.items()])
    layout = Layout.from_deepspeed(json.loads(_ds_config(stage).read_text()), gpus_per_node=WORLD, ep_size=ep_size)
    assert_ranks_hold_plan(run, _checkpoint(run, STEPS)["tag"], config, layout)
