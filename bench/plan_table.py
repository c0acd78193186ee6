"""Which layouts of a config fit a GPU's memory at what batch, and what each costs in all-to-all and FLOPs.

For every GPU count (8 per node), ZeRO stage (1, 2) and ``ep_size`` (1 and each divisor of the experts up
to the GPUs of one node), ``moe-asr plan``'s numbers in bf16 with ds_configs/zero{1,2}_bf16.json's buckets:
the most loaded GPU's model states and buckets, the activations per 1000 frames, the largest batch (in
1000s of frames) whose total stays within ``--memory-gb`` less ``--reserve-gib``, and at that batch the
all-to-all bytes and FLOPs of a step. DeepSpeed's own ZeRO-2 estimator
(``estimate_zero2_model_states_mem_needs``, no offload) sits beside ours on ZeRO 2 rows: it counts every
parameter as partitioned over all GPUs, knows no experts, and has no ZeRO-1 counterpart. One probe forward
per config (``--utt-seconds``) serves every row.

    python -m bench.plan_table conf/paper_dense_225m.yaml conf/paper_moe_1b.yaml --gpus 8 16 64
"""
from __future__ import annotations

import argparse
import sys

from moe_asr.plan import FRAMES_PER_SECOND, Layout, PlanError, plan, probe
from moe_asr.train import load_experiment

GIB = 2 ** 30


def rows(path: str, gpus: list[int], capacity: float, utt_seconds: float, tokens_per_second: float) -> list[str]:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    config = load_experiment(path, [])
    experts = config.model.moe.num_experts
    measured = probe(config.model, round(utt_seconds * FRAMES_PER_SECOND), max(1, round(utt_seconds * tokens_per_second)))
    per_frame = measured.saved_bytes / measured.frames
    out = []
    for world in gpus:
        for ep in [e for e in range(1, min(8, world) + 1) if experts % e == 0 and world % e == 0]:
            for stage in (1, 2):
                layout = Layout(gpus_per_node=8, nodes=world // 8, ep_size=ep, zero_stage=stage, dtype="bf16",
                                frames_per_batch=1000, overlap_comm=stage == 2)
                try:
                    base = plan(config, layout, measured=measured)
                except PlanError:
                    continue
                fixed = base["model_states_bytes"] + base["buckets_bytes"]
                frames = int((capacity - fixed) / per_frame) // 1000 * 1000
                at = plan(config, Layout(**{**layout.__dict__, "frames_per_batch": max(frames, 1000)}),
                          measured=measured)
                ds = ""
                if stage == 2:
                    _, gpu = estimate_zero2_model_states_mem_needs(base["config"]["total_params"], 8, world // 8,
                                                                   cpu_offload=False)
                    ds = f"{gpu / GIB:.2f}"
                fits = f"{frames // 1000}k" if frames > 0 else "does not fit"
                a2a = f"{at['all_to_all']['step_bytes'] / GIB:.2f}" if frames > 0 else "-"
                flops = f"{at['flops_per_step'] / 1e12:.0f}" if frames > 0 else "-"
                out.append(f"| {path.rsplit('/', 1)[-1]} | {world} | {ep} | {stage} | "
                           f"{base['model_states_bytes'] / GIB:.2f} | {ds or '-'} | {base['buckets_bytes'] / GIB:.2f} | "
                           f"{per_frame * 1000 / GIB:.2f} | {fits} | {a2a} | {flops} |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64], help="multiples of 8 (8 GPUs a node)")
    p.add_argument("--memory-gb", type=float, default=80.0, help="a GPU's memory in 10^9 bytes (H100/A100: 80)")
    p.add_argument("--reserve-gib", type=float, default=5.0,
                   help="kept back for the CUDA context, NCCL, the allocator's fragmentation and temporaries")
    p.add_argument("--utt-seconds", type=float, default=12.3)
    p.add_argument("--tokens-per-second", type=float, default=4.0)
    args = p.parse_args()
    if any(g % 8 for g in args.gpus):
        p.error("--gpus: multiples of 8 only (8 GPUs a node)")
    capacity = args.memory_gb * 1e9 - args.reserve_gib * GIB
    print("| config | GPUs | ep | ZeRO | model states GiB | DeepSpeed ZeRO-2 estimate GiB | buckets GiB | "
          "activations GiB / 1k frames | largest batch (frames) | all-to-all GiB / step | TFLOP / step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in args.configs:
        for row in rows(path, args.gpus, capacity, args.utt_seconds, args.tokens_per_second):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
