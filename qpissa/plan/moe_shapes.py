"""Mixture-of-experts decoders for the planner: Qwen3-MoE, Mixtral, OLMoE.

Each block's dense MLP becomes E experts (gate_up: 2I×H, one target as decompose and PEFT's fused parameter see it;
down: H×I, I = ``moe_intermediate_size`` for Qwen3-MoE,
``intermediate_size`` otherwise) and a router (E×H, kept in the base dtype: not a target). Every expert is a
linear that decompose targets and NF4-quantizes (rows with ``count`` = layers·E), so bytes count all experts;
activations count the routed ones: a token passes through k = ``num_experts_per_tok`` experts, so the MLP's
saved intermediate width is k·I (``ModelShapes.intermediate``). Qwen3-MoE layers listed in ``mlp_only_layers``
or off ``decoder_sparse_step`` keep a dense MLP of ``intermediate_size``. OLMoE normalizes q and k over the
whole projection (q_norm: heads·head_dim, k_norm: kv_heads·head_dim).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from qpissa.plan.config_fields import need


def moe_decoder(cfg: dict, dense: Callable[[dict], Any]) -> Any:
    """The dense decoder's :class:`~qpissa.plan.model_shapes.ModelShapes` with the MLP rows replaced by experts +
    router (see the module docstring); ``dense`` builds the dense decoder (new rows are copies of its rows, so
    this module needs no import of model_shapes, which dispatches here)."""
    mt = cfg["model_type"]
    experts = need(cfg, "num_local_experts" if mt == "mixtral" else "num_experts")
    top_k = need(cfg, "num_experts_per_tok")
    inter = need(cfg, "moe_intermediate_size") if mt == "qwen3_moe" else need(cfg, "intermediate_size")
    n, h = need(cfg, "num_hidden_layers"), need(cfg, "hidden_size")
    sparse = [i for i in range(n) if _is_sparse(cfg, i)]
    base = dense({**cfg, "model_type": "qwen3" if mt == "qwen3_moe" else "llama"})
    dense_layers = n - len(sparse)
    params = []
    mlp_row = next(p for p in base.params if p.group == "mlp")
    norm_row = next(p for p in base.params if p.kind == "norm")
    row = lambda proto, *a: dataclasses.replace(proto, **dict(zip(("name", "short", "kind", "shape", "count", "group"), a)))  # noqa: E731
    for p in base.params:
        if p.group == "mlp":
            if dense_layers:
                params.append(dataclasses.replace(p, count=dense_layers))
            continue
        if mt == "olmoe" and p.short in ("q_norm", "k_norm"):
            continue
        params.append(p)
    L, m, k = "model.layers.{i}", len(sparse), len(sparse) * experts
    params += [row(mlp_row, f"{L}.mlp.experts.{{e}}.gate_up_proj", "gate_up_proj", "linear", (2 * inter, h), k, "mlp"),
               row(mlp_row, f"{L}.mlp.experts.{{e}}.down_proj", "down_proj", "linear", (h, inter), k, "mlp"),
               row(norm_row, f"{L}.mlp.gate", "gate", "router", (experts, h), m, "other")]
    params = [dataclasses.replace(p, bias=0) if ".experts." in p.name else p for p in params]
    if mt == "olmoe":
        params += [row(norm_row, f"{L}.self_attn.q_norm", "q_norm", "norm", (base.heads * base.head_dim,), n),
                   row(norm_row, f"{L}.self_attn.k_norm", "k_norm", "norm", (base.kv_heads * base.head_dim,), n)]
    return dataclasses.replace(base, model_type=mt, intermediate=top_k * inter, params=params)


def _is_sparse(cfg: dict, layer: int) -> bool:
    """Qwen3-MoE's rule for which layers hold experts; Mixtral and OLMoE: every layer."""
    if cfg["model_type"] != "qwen3_moe":
        return True
    step = cfg.get("decoder_sparse_step", 1) or 1
    return layer not in (cfg.get("mlp_only_layers") or []) and (layer + 1) % step == 0
