"""Which expert adapter rank and optimizer make an MoE fit: ``qpissa plan``'s line for MoE models.

An adapter of rank r on every routed expert is most of an MoE's trainable state (Qwen3-30B-A3B, r=16: 629M of 642M
trainable parameters sit on experts), and with AdamW each costs fp32 weight + gradient + 2 moments = 16 bytes.
This tries the experts at r, r/4 and 0 (``--expert-rank``; 0 = NF4 experts with no adapter, as QLoRA leaves them)
with ``adamw`` and ``adamw8bit``, the other targets at r, and reports each total and the cheapest change that fits.
"""
from __future__ import annotations

from dataclasses import replace

from qpissa.plan.memory import PlanConfig, plan
from qpissa.plan.model_shapes import ModelShapes

OPTIMS = ("adamw", "adamw8bit")


def has_experts(s: ModelShapes) -> bool:
    return any(".experts." in p.name for p in s.params)


def expert_options(s: ModelShapes, cfg: PlanConfig) -> list[dict]:
    """Total bytes and fit for each (expert rank, optimizer), most adapter first; empty for a dense model."""
    if not has_experts(s) or cfg.method == "full":
        return []
    given = cfg.rank if cfg.expert_rank is None else cfg.expert_rank
    ranks = sorted({given, max(1, cfg.rank // 4), 0}, reverse=True)
    out = []
    for rank in ranks:
        for optim in OPTIMS:
            if cfg.fsdp and optim != "adamw":
                continue  # train --fsdp takes adamw only
            p = plan(s, replace(cfg, expert_rank=rank, optim=optim))
            out.append({"expert_rank": rank, "optim": optim, "total_bytes": p.total, "fits": p.fits,
                        "trainable_params": p.trainable})
    return out


def first_fit(options: list[dict]) -> dict | None:
    """The option that keeps the most expert adapter (then prefers AdamW) among those that fit."""
    return next((o for o in options if o["fits"]), None)


def summary(options: list[dict], gpu_memory: int) -> str:
    """One line: the options' totals and which one fits ``gpu_memory``."""
    if not options:
        return ""
    cells = ", ".join(f"--expert-rank {o['expert_rank']} --optim {o['optim']}: {o['total_bytes'] / 1e9:.1f} GB"
                      for o in options)
    best = first_fit(options)
    verdict = (f"fits {gpu_memory / 1e9:.0f} GB with --expert-rank {best['expert_rank']} --optim {best['optim']}"
               if best else f"no expert rank/optimizer fits {gpu_memory / 1e9:.0f} GB at these settings "
                            "(lower --seq-len or --batch-size, add --grad-checkpointing or GPUs)")
    return f"MoE experts' adapter budget: {verdict} ({cells})"
