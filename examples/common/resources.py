"""What training a config costs: parameters, GPU memory per GPU and GPU-hours, derived and measured.

    python examples/common/resources.py examples/librispeech/conf/u2pp_conformer_moe.yaml --vocab-size 5002 \\
        --gpus 8 --utt-seconds 12.3 --hours 960 [--ep-size 8] [--mfu 0.3] [--json]

For each config:

* parameters, total and active per token (counted from the built modules, as `moe-asr model-info`);
* model states per GPU, derived for DeepSpeed ZeRO-2 with bf16 weights (ds_configs/zero2_bf16.json) by
  ``moe-asr plan`` (docs/plan.md): bf16 weights of the dense part and of this GPU's experts
  (``num_experts / ep_size`` of each layer), the bf16 gradients of the parameters in its partition,
  and fp32 master weights with Adam's two moments partitioned over the ranks that hold the same
  parameters (all GPUs for the dense part, ``gpus / ep_size`` for the experts), DeepSpeed's padding
  included; its communication buckets come on top (2e8 elements each in that JSON);
* activations per GPU, measured: one training forward on this CPU in bf16 of one utterance of
  ``--utt-seconds`` (random features, ``--tokens-per-second`` targets), counting the bytes of every
  tensor autograd keeps for the backward pass, times the utterances of that length that fit in
  ``data.batching.max_frames_in_batch``. The GPU's kernels keep other temporaries than the CPU's
  expert path, so read it as an estimate of the largest term, not a bound;
* training FLOPs, measured: the same forward's FLOPs (``torch.utils.flop_counter``, experts run
  one by one so every matmul is counted), three times for forward and backward, per second of
  audio, times ``--hours`` of audio and ``train.max_epochs``; GPU-hours at ``--mfu`` of
  ``--peak-tflops`` (H100 SXM dense bf16: 989) are derived from them, and wall hours on ``--gpus``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from moe_asr.model.parameters import count_parameters
from moe_asr.plan import FRAMES_PER_SECOND, Layout, parameters, probe
from moe_asr.plan import model_states as states_of_rank
from moe_asr.run.config import ExperimentConfig, load_config

GIB = 2 ** 30


def model_states(config: ExperimentConfig, gpus: int, ep_size: int) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer states on the most loaded GPU under ZeRO-2 with bf16 weights
    (``moe-asr plan``'s, exact to DeepSpeed's layout)."""
    layout = Layout(gpus_per_node=gpus, ep_size=ep_size, zero_stage=2, dtype="bf16")
    params = parameters(config.model)
    ranks = [states_of_rank(params, layout, rank) for rank in range(gpus)]
    s = max(ranks, key=lambda r: sum(sum(part.values()) for part in r.values()))
    return {"weights_bf16": sum(s["parameters"].values()), "gradients_bf16": sum(s["gradients"].values()),
            "master_and_adam_fp32": sum(s["master_weights"].values()) + sum(s["optimizer_states"].values())}


def measure(config: ExperimentConfig, utt_seconds: float, tokens_per_second: float) -> tuple[int, float]:
    """Bytes kept for backward and forward FLOPs of one utterance, in bf16 on this CPU (``moe-asr plan``'s probe)."""
    p = probe(config.model, int(utt_seconds * FRAMES_PER_SECOND), max(1, int(utt_seconds * tokens_per_second)))
    return p.saved_bytes, p.forward_flops


def estimate(path: str, vocab_size: int, gpus: int, ep_size: int | None, utt_seconds: float,
             tokens_per_second: float, hours: float, mfu: float, peak_tflops: float) -> dict:
    config = load_config(path)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab_size))
    ep = ep_size or config.parallel.ep_size
    params = count_parameters(config.model)
    states = model_states(config, gpus, ep)
    saved, forward_flops = measure(config, utt_seconds, tokens_per_second)
    per_batch = max(1, config.data.batching.max_frames_in_batch // int(utt_seconds * FRAMES_PER_SECOND))
    train_flops = 3 * forward_flops / utt_seconds * hours * 3600 * config.train.max_epochs
    gpu_hours = train_flops / (peak_tflops * 1e12 * mfu) / 3600
    return {"config": path, "total_params": params["total_params"], "active_params": params["active_params"],
            "gpus": gpus, "ep_size": ep, "model_states_gib": {k: v / GIB for k, v in states.items()},
            "activations_gib": saved * per_batch / GIB, "utterances_per_batch": per_batch,
            "memory_gib": (sum(states.values()) + saved * per_batch) / GIB,
            "train_tflop_per_audio_second": 3 * forward_flops / utt_seconds / 1e12,
            "epochs": config.train.max_epochs, "gpu_hours": gpu_hours, "wall_hours": gpu_hours / gpus}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="experiment YAMLs")
    p.add_argument("--vocab-size", type=int, required=True, help="the symbol table's size (for vocab_size: auto)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs training together (default 8)")
    p.add_argument("--ep-size", type=int, help="experts' layout (default: each config's parallel.ep_size)")
    p.add_argument("--utt-seconds", type=float, default=12.3, help="typical utterance (LibriSpeech 12.3, AISHELL 4.5)")
    p.add_argument("--tokens-per-second", type=float, default=4.0, help="targets per second of speech")
    p.add_argument("--hours", type=float, default=960.0, help="hours of training audio an epoch")
    p.add_argument("--mfu", type=float, default=0.3, help="fraction of the peak the training reaches (assumed)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="a GPU's dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--json", action="store_true", help="one JSON object per config")
    args = p.parse_args()
    for path in args.configs:
        r = estimate(path, args.vocab_size, args.gpus, args.ep_size, args.utt_seconds, args.tokens_per_second,
                     args.hours, args.mfu, args.peak_tflops)
        if args.json:
            print(json.dumps(r))
            continue
        states = ", ".join(f"{k} {v:.2f}" for k, v in r["model_states_gib"].items())
        print(f"{path}: {r['total_params'] / 1e6:.1f}M parameters, {r['active_params'] / 1e6:.1f}M active; "
              f"{r['gpus']} GPUs, ep_size {r['ep_size']}\n"
              f"  per GPU: model states {states} GiB (derived); activations {r['activations_gib']:.1f} GiB for "
              f"{r['utterances_per_batch']} utterances a batch (measured on CPU); about {r['memory_gib']:.1f} GiB\n"
              f"  training: {r['train_tflop_per_audio_second']:.3f} TFLOP a second of audio (measured), "
              f"{r['epochs']} epochs: {r['gpu_hours']:.0f} GPU-hours at {args.mfu:.0%} of {args.peak_tflops:.0f} "
              f"TFLOP/s, {r['wall_hours']:.0f} h on {r['gpus']} (derived)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
