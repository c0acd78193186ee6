"""launch/train.py, plus: right after --init-from applied a training state, what the engine holds goes to
``<out-dir>/applied.pt`` (every parameter's AdamW moments, Adam's step, the LR, DeepSpeed's step counter).

For one rank at ep_size 1, where a parameter's local tensor is the whole one.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_asr import train  # noqa: E402

_apply = train.apply_training_state


def _apply_and_dump(engine, model, zero_stage, ts, weights):
    _apply(engine, model, zero_stage, ts, weights)
    moments, steps = {}, set()
    if zero_stage == 0:
        for group in engine.optimizer.param_groups:
            for p, name in zip(group["params"], group["param_names"]):
                state = engine.optimizer.state[p]
                moments[name] = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
                steps.add(float(state["step"]))
    else:
        from deepspeed.utils import safe_get_full_optimizer_state

        for name, p in model.named_parameters():
            moments[name] = {k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}
        steps = {float(s["step"]) for s in engine.optimizer.optimizer.state.values()}
    out_dir = Path(train.build_parser().parse_known_args()[0].out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # training creates it only once the start is settled
    torch.save({"moments": moments, "adam_steps": sorted(steps), "lr": engine.get_lr(),
                "global_steps": engine.global_steps}, out_dir / "applied.pt")


train.apply_training_state = _apply_and_dump

if __name__ == "__main__":
    sys.exit(train.main())
