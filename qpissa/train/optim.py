"""Optimizer and learning-rate schedule (PiSSA recipe: AdamW, warmup then cosine decay)."""
from __future__ import annotations

import math

import torch

from qpissa.train.config import TrainConfig


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if cfg.optim == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """η_t/η_max for 0-based step t: linear warmup over W steps, then cosine/linear decay to 0 or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1.0 - progress)
