"""``--expert-rank``: MoE experts take their own adapter rank, or none (0: NF4 experts as QLoRA leaves them).

An adapter of rank r on every routed expert is most of an MoE's trainable state (Qwen3-30B-A3B at r=16: 604M of
642M parameters are expert factors). Experts decomposed at rank r_e keep the adapter scale s of the other targets
(α_e = s·r_e, or s·√r_e with rsLoRA), written as PEFT's ``rank_pattern``/``alpha_pattern`` under the fused
parameters' names (``model.layers.0.mlp.experts.gate_up_proj``: the key PEFT matches for ``target_parameters``);
rank 0 quantizes each expert to NF4 with no adapter (the residual is NF4(W), exactly QLoRA's base) and the adapter
holds no expert factors and no ``target_parameters``.
"""
from __future__ import annotations

import dataclasses

from qpissa.decompose.config import DecomposeConfig
from qpissa.decompose.methods import adapter_scale


def expert_rank(cfg: DecomposeConfig) -> int:
    """The experts' adapter rank: ``--expert-rank``, else ``--rank``."""
    return cfg.rank if cfg.expert_rank is None else cfg.expert_rank


def expert_rank_config(cfg: DecomposeConfig) -> DecomposeConfig:
    """The config an expert is decomposed with: its rank and the α that keeps the other targets' scale s; rank 0
    → QLoRA's NF4(W) (the rank-1 factors it draws are not written)."""
    rank = expert_rank(cfg)
    if rank == cfg.rank:
        return cfg
    if rank == 0:
        return dataclasses.replace(cfg, method="qlora", rank=1, alpha=None, expert_rank=None)
    return dataclasses.replace(cfg, rank=rank, alpha=expert_alpha(cfg), expert_rank=None)


def expert_alpha(cfg: DecomposeConfig) -> float:
    """α_e with α_e/r_e (α_e/√r_e with rsLoRA) equal to the other targets' s."""
    from qpissa.decompose.allocation import scale_alpha

    return scale_alpha(expert_rank(cfg), adapter_scale(cfg.rank, cfg.alpha, cfg.rslora), cfg.rslora)


def adapter_patterns(cfg: DecomposeConfig, modules: list[str]) -> dict[str, dict]:
    """PEFT ``rank_pattern``/``alpha_pattern`` entries for the fused expert parameters ``modules`` (empty when
    r_e = r)."""
    rank = expert_rank(cfg)
    if rank in (0, cfg.rank) or not modules:
        return {}
    alpha = expert_alpha(cfg)
    return {"rank_pattern": {m: rank for m in modules}, "alpha_pattern": {m: alpha for m in modules}}
