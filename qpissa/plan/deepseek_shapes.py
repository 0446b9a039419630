"""DeepSeek-V3 / R1 / Kimi-K2 (``deepseek_v3``) for the planner: MLA attention, shared + routed experts.

Rows as transformers 5 builds ``DeepseekV3ForCausalLM`` (checked on the meta device in tests/test_plan_moe.py):
attention is multi-head latent attention, q_a_proj (q_lora_rank×H) → q_a_layernorm → q_b_proj
(heads·(nope+rope)×q_lora_rank), kv_a_proj_with_mqa ((kv_lora_rank+rope)×H) → kv_a_layernorm → kv_b_proj
(heads·(nope+v)×kv_lora_rank), o_proj (H×heads·v); the first ``first_k_dense_replace`` blocks keep a dense MLP of
``intermediate_size``, the others hold E = ``n_routed_experts`` routed experts (gate_up 2I×H, down H×I,
I = ``moe_intermediate_size``), ``n_shared_experts``·I-wide shared experts (ordinary linear targets) and a router
(E×H, not a target; its score-correction bias is a buffer). The multi-token-prediction layer of the released
checkpoint is not part of the transformers model and is not counted. Activations use the Llama formula with
head_dim = nope + rope (q, k) and k·I + shared width as the MLP's intermediate.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from qpissa.plan.config_fields import need


def deepseek_decoder(cfg: dict, dense: Callable[[dict], Any]) -> Any:
    """:class:`~qpissa.plan.model_shapes.ModelShapes` of a ``deepseek_v3`` config (see the module docstring)."""
    n, h, heads = need(cfg, "num_hidden_layers"), need(cfg, "hidden_size"), need(cfg, "num_attention_heads")
    experts, top_k, inter = need(cfg, "n_routed_experts"), need(cfg, "num_experts_per_tok"), \
        need(cfg, "moe_intermediate_size")
    shared = int(cfg.get("n_shared_experts") or 0) * inter
    nope, rope, v = need(cfg, "qk_nope_head_dim"), need(cfg, "qk_rope_head_dim"), need(cfg, "v_head_dim")
    kv_rank, q_rank = need(cfg, "kv_lora_rank"), cfg.get("q_lora_rank")
    dense_layers = min(n, int(cfg.get("first_k_dense_replace") or 0))
    freq = int(cfg.get("moe_layer_freq") or 1)
    sparse = sum(1 for i in range(dense_layers, n) if i % freq == 0)
    dense_layers = n - sparse
    base = dense({**cfg, "model_type": "llama", "num_key_value_heads": heads, "head_dim": nope + rope})
    proto = next(p for p in base.params if p.kind == "linear")
    norm = next(p for p in base.params if p.kind == "norm")
    L = "model.layers.{i}"

    def row(like, name, kind, shape, count, group="other"):
        return dataclasses.replace(like, name=f"{L}.{name}", short=name.rsplit(".", 1)[-1], kind=kind, shape=shape,
                                   count=count, group=group, bias=0)

    attn = [row(proto, "self_attn.kv_a_proj_with_mqa", "linear", (kv_rank + rope, h), n, "attn"),
            row(norm, "self_attn.kv_a_layernorm", "norm", (kv_rank,), n),
            row(proto, "self_attn.kv_b_proj", "linear", (heads * (nope + v), kv_rank), n, "attn"),
            row(proto, "self_attn.o_proj", "linear", (h, heads * v), n, "attn")]
    if q_rank:
        attn = [row(proto, "self_attn.q_a_proj", "linear", (q_rank, h), n, "attn"),
                row(norm, "self_attn.q_a_layernorm", "norm", (q_rank,), n),
                row(proto, "self_attn.q_b_proj", "linear", (heads * (nope + rope), q_rank), n, "attn"), *attn]
    else:
        attn = [row(proto, "self_attn.q_proj", "linear", (heads * (nope + rope), h), n, "attn"), *attn]
    params = [p for p in base.params if p.group not in ("attn", "mlp")]
    params += attn
    if dense_layers:
        params += [dataclasses.replace(p, count=dense_layers) for p in base.params if p.group == "mlp"]
    k = sparse * experts
    params += [row(proto, "mlp.experts.{e}.gate_up_proj", "linear", (2 * inter, h), k, "mlp"),
               row(proto, "mlp.experts.{e}.down_proj", "linear", (h, inter), k, "mlp"),
               row(norm, "mlp.gate", "router", (experts, h), sparse)]
    if shared:
        params += [row(proto, "mlp.shared_experts.gate_proj", "linear", (shared, h), sparse, "mlp"),
                   row(proto, "mlp.shared_experts.up_proj", "linear", (shared, h), sparse, "mlp"),
                   row(proto, "mlp.shared_experts.down_proj", "linear", (h, shared), sparse, "mlp")]
    return dataclasses.replace(base, model_type="deepseek_v3", intermediate=top_k * inter + shared, params=params)
