"""plan for MoE adapters' budget: --expert-rank, which rank/optimizer fits, experts per FSDP rank, DeepSeek-V3."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qpissa.plan.expert_budget import expert_options, first_fit
from qpissa.plan.fsdp_memory import experts_per_rank
from qpissa.plan.memory import PlanConfig, plan
from qpissa.plan.model_shapes import load_config, shapes_from_config

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def shapes(name: str):
    return shapes_from_config(load_config(CONFIGS / f"{name}.json"))


def test_expert_rank_counts_expert_factors_at_their_own_rank():
    """Qwen3-30B-A3B r=16, by hand from its config: attention r·(in+out) = 16·(6144 + 2·2560 + 6144)·48 layers; each
    expert r_e·(2·768 + 2048 + 2048 + 768), 128 experts × 48 layers."""
    s = shapes("qwen3-30b-a3b")
    attn = 16 * ((4096 + 2048) + 2 * (512 + 2048) + (2048 + 4096)) * 48
    expert = lambda r: r * ((2 * 768 + 2048) + (2048 + 768)) * 128 * 48  # noqa: E731
    for er in (16, 4, 0):
        assert plan(s, PlanConfig(rank=16, expert_rank=er)).trainable == attn + expert(er)
    assert plan(s, PlanConfig(rank=16)).trainable == attn + expert(16) == 642_514_944


def test_which_expert_rank_and_optimizer_fit_24gb():
    s = shapes("qwen3-30b-a3b")
    base = dict(rank=16, grad_checkpointing=True, gpu_memory=24 * 10**9)
    long = expert_options(s, PlanConfig(**base))
    assert [(o["expert_rank"], o["optim"]) for o in long] == [(16, "adamw"), (16, "adamw8bit"), (4, "adamw"),
                                                              (4, "adamw8bit"), (0, "adamw"), (0, "adamw8bit")]
    assert first_fit(long) is None  # L=2048: the 4-bit weights + logits + one block's experts leave no room
    totals = [o["total_bytes"] for o in long]
    assert totals[0] > totals[2] > totals[4] and totals[0] - totals[4] > 10e9  # r=16 experts: > 10 GB of state
    short = expert_options(s, PlanConfig(**base, seq_len=1024))
    assert (first_fit(short)["expert_rank"], first_fit(short)["optim"]) == (0, "adamw")
    assert expert_options(shapes("llama-3-8b"), PlanConfig(**base)) == []


def test_deepseek_v3_rows_are_the_transformers_model():
    import transformers

    cfg = json.loads((CONFIGS / "deepseek-v3.json").read_text())
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg))
    params = dict(model.named_parameters())
    s = shapes("deepseek-v3")
    assert s.n_params == sum(p.numel() for p in params.values()) == 671_026_404_352
    experts = sum(p.numel() for n, p in params.items() if ".mlp.experts." in n)
    assert sum(p.numel * p.count for p in s.params if ".experts." in p.name) == experts
    shared = sum(p.numel() for n, p in params.items() if ".shared_experts." in n)
    assert sum(p.numel * p.count for p in s.params if ".shared_experts." in p.name) == shared


def test_fsdp_counts_experts_per_rank_and_gathers_a_whole_block():
    s = shapes("qwen3-235b-a22b")
    assert experts_per_rank(s, 8) == {"experts_per_block": 128, "blocks_with_experts": 94, "ranks": 8,
                                      "experts_per_rank_per_block": 16, "experts_per_rank": 1504,
                                      "experts_total": 12032}
    d = shapes("deepseek-v3")
    split = experts_per_rank(d, 16)
    assert (split["experts_per_block"], split["blocks_with_experts"], split["experts_per_rank"]) == (256, 58, 928)
    assert experts_per_rank(shapes("llama-3-8b"), 8) is None
    p = plan(s, PlanConfig(rank=16, gpus=8, fsdp=True, grad_checkpointing=True))
    one_block_experts = 128 * (2 * 1536 * 4096 + 4096 * 1536) * (0.5 + 4 / 64)  # packed + fp32 absmax per 64
    assert p.get("fsdp block buffers") > 2 * one_block_experts  # the gathered block holds its experts
    single = plan(s, PlanConfig(rank=16, grad_checkpointing=True))
    assert abs(p.get("nf4 weights") - single.get("nf4 weights") / 8) <= 1  # experts' bytes sharded /8
