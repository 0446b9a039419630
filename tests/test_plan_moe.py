"""The planner on MoE configs (fixtures: the public config.json values of each model): parameters against the
model transformers builds (meta device), every expert's NF4 bytes, routed activations, what fits where."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qpissa.plan.memory import PlanConfig, adapter_params, decompose_targets, nf4_bytes, plan
from qpissa.plan.model_shapes import shapes_from_config

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
MOE = ("qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b", "qwen3-235b-a22b")


def meta_model(cfg: dict):
    import transformers

    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    with torch.device("meta"):
        return getattr(transformers, cfg["architectures"][0])(config)


@pytest.mark.parametrize("name", MOE)
def test_counts_match_the_transformers_model(name):
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    s = shapes_from_config(dict(cfg))
    model = meta_model(cfg)
    params = dict(model.named_parameters())
    assert s.n_params == sum(p.numel() for p in params.values())
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    targets = decompose_targets(s, "all")
    assert sum(p.numel * p.count for p in targets) == experts + sum(
        p.numel() for n, p in params.items() if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")))
    # PEFT target_parameters: lora_A (r·E, in) + lora_B (out, r·E) per fused parameter, i.e. r·(in+out) per expert
    r, e = 8, model.config.num_local_experts if cfg["model_type"] == "mixtral" else model.config.num_experts
    layer = model.model.layers[0].mlp.experts
    peft_expert = sum(r * e * (w.shape[1] + w.shape[2]) for w in (layer.gate_up_proj, layer.down_proj))
    by_hand = sum(r * (p.shape[0] + p.shape[1]) * p.count for p in targets if ".experts." in p.name)
    assert by_hand == peft_expert * cfg["num_hidden_layers"]
    assert adapter_params(targets, r) > by_hand
    assert s.intermediate == cfg["num_experts_per_tok"] * cfg.get("moe_intermediate_size", cfg["intermediate_size"])


def test_qwen3_30b_a3b_fits_by_gpu():
    """Experts are ≈95% of Qwen3-30B-A3B; 4-bit they take ≈15 GB; r=16 QPiSSA trains on 48 GB, not on 24."""
    cfg = json.loads((CONFIGS / "qwen3-30b-a3b.json").read_text())
    s = shapes_from_config(dict(cfg))
    experts = [p for p in s.params if ".experts." in p.name]
    expert_weights = sum(p.numel * p.count for p in experts)
    assert 0.94 < expert_weights / s.n_params < 0.96
    packed = sum(nf4_bytes(p.numel)["packed"] * p.count for p in experts)
    assert packed == expert_weights // 2 and 14e9 < packed < 16e9
    fits = {gb: plan(s, PlanConfig(rank=16, grad_checkpointing=True, gpu_memory=gb * 10**9)).fits
            for gb in (24, 48, 80, 141)}
    assert fits == {24: False, 48: True, 80: True, 141: True}, fits


def test_bfloat16_experts_count_two_bytes_each():
    """plan --experts-dtype bfloat16 (decompose's plain residual): the experts leave the NF4 rows and weigh 2 bytes
    each; the NF4 rows lose exactly their bytes; Qwen3-30B-A3B then needs the 80 GB card."""
    cfg = json.loads((CONFIGS / "qwen3-30b-a3b.json").read_text())
    s = shapes_from_config(dict(cfg))
    experts = [p for p in s.params if ".experts." in p.name]
    nf4, dense = (plan(s, PlanConfig(rank=16, grad_checkpointing=True, experts_dtype=d)) for d in ("nf4", "bfloat16"))
    part = lambda p, name: next(c.bytes for c in p.components if c.name == name)  # noqa: E731
    expert_nf4 = sum(sum(nf4_bytes(p.numel).values()) * p.count for p in experts)
    assert (part(nf4, "nf4 weights") + part(nf4, "nf4 absmax+maps")
            - part(dense, "nf4 weights") - part(dense, "nf4 absmax+maps")) == expert_nf4
    assert part(dense, "unquantized weights") - part(nf4, "unquantized weights") == 2 * sum(p.numel * p.count
                                                                                            for p in experts)
    fits = {gb: plan(s, PlanConfig(rank=16, grad_checkpointing=True, experts_dtype="bfloat16",
                                   gpu_memory=gb * 10**9)).fits for gb in (48, 80)}
    assert fits == {48: False, 80: True}, fits
