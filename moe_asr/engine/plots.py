"""End-of-training figures: expert load per MoE layer, and the loss curves (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import torch  # noqa: E402

from moe_asr.engine.expert_load import max_mean_ratio, rank_shares  # noqa: E402
from moe_asr.model.u2pp import LOSS_KEYS  # noqa: E402


def expert_load_heatmap(tokens: torch.Tensor, layer_names: list[str], path: Path, ep_size: int = 1) -> None:
    """``tokens [layers, experts]``: routed tokens over the run, shown as each layer's share per expert,
    its max/mean load and, with ``ep_size > 1``, each expert-parallel rank's share of its expert rows."""
    share = tokens.double() / tokens.sum(1, keepdim=True).clamp_min(1)
    labels = [f"{name}  max/mean {r:.2f}" for name, r in zip(layer_names, max_mean_ratio(tokens).tolist())]
    widths = [tokens.shape[1]] + ([1 + ep_size] if ep_size > 1 else [])
    fig, axes = plt.subplots(1, len(widths), figsize=(4.5 + 0.5 * sum(widths), 1.2 + 0.35 * len(layer_names)),
                             squeeze=False, gridspec_kw={"width_ratios": widths})
    ax = axes[0, 0]
    image = ax.imshow(share.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(tokens.shape[1]))
    ax.set_yticks(range(len(layer_names)), labels, fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title("expert load: share of each layer's routed tokens")
    fig.colorbar(image, ax=ax)
    if ep_size > 1:
        ranks = rank_shares(tokens, ep_size)
        ax = axes[0, 1]
        ax.imshow(ranks.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1)
        for layer, row in enumerate(ranks.tolist()):
            for rank, value in enumerate(row):
                ax.text(rank, layer, f"{value:.0%}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(ep_size))
        ax.set_yticks([])
        ax.set_xlabel("expert-parallel rank")
        ax.set_title("share of expert rows", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss and its parts per step, and the CV loss at each evaluation."""
    train = [r for r in records if "loss" in r]
    cv = [r for r in records if "cv_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in LOSS_KEYS:
        ax.plot([r["step"] for r in train], [r[key] for r in train], label=key,
                linewidth=1.6 if key == "loss" else 0.9)
    if cv:
        ax.plot([r["step"] for r in cv], [r["cv_loss"] for r in cv], "o-", color="black", label="cv loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
