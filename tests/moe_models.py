"""Tiny mixture-of-experts checkpoints built from transformers' own config classes, bf16, with a decaying singular
spectrum in every matrix (σ_k ∝ 1/k, as trained weights have; plain noise has a flat one).

:data:`FAMILIES` are the three the MoE path was built on; :data:`ALL_FAMILIES` every ``*ForCausalLM`` family of
transformers 5 with routed experts that the per-family matrix runs (tests/test_moe_families.py). Sizes are set by
attribute name on the family's default config (only the attributes it has), so one table serves every family:
2 layers, hidden 64, 4 experts, top-2, one shared expert and a dense first layer where the family has them; every
linear's output a multiple of 32 (bitsandbytes' CPU 4-bit kernel needs it)."""
from __future__ import annotations

from pathlib import Path

import torch
from helpers import copy_tokenizer

FAMILIES = ("qwen3_moe", "mixtral", "olmoe")
ALL_FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "qwen2_moe", "qwen3_next", "llama4_text",
                "gpt_oss", "granitemoe", "phimoe", "ernie4_5_moe", "dots1", "hunyuan_v1_moe", "minimax",
                # more transformers 5 families with routed experts, read by the same roles without code of their own
                "deepseek_v2", "glm4_moe_lite", "minimax_m2", "granitemoeshared", "flex_olmo", "afmoe", "cohere2_moe",
                "exaone_moe", "mellum", "solar_open", "aria_text", "beam", "flint", "granitemoe_swa", "kolibri1",
                "mimo_v2_flash", "minimax_m3_vl_text", "jetmoe", "hy_v3", "minicpm5_moe", "nemotron_h",
                "kimi_linear", "qwen3_5_moe_text", "longcat_flash", "jamba", "granitemoehybrid", "zaya", "inkling_text", "axk1", "sarvam_mla")
ALL_FAMILIES += ("bailing_hybrid", "dots3_note_text", "gemma4_text", "kolibri1_1", "laguna", "lfm2_moe", "qwen4_exp_text")
REFUSED = {  # family → why decompose refuses it in one line, writing nothing (tests/test_moe_families.py)
    "dbrx": "experts are held as .*experts.mlp.w1 \\[256, 64\\], not as one \\[experts, out, in\\] parameter",
    # rank-1 retrieval experts: rows of two embedding tables, picked by a product-key top-k
    "doge": "experts are held as embedding tables .*mlp.down_embed.weight \\[4, 64\\]",
}
# DeepSeek-V4, Hunyuan-V4 and the sparse-attention (indexer) families; Inkling-2 (interleaved gate/up on disk)
ALL_FAMILIES += ("deepseek_v4", "hy_v4", "deepseek_v32", "glm_moe_dsa", "axk2", "inkling2_text", "inkling2_loop_text")
# linears transformers builds at load from another tensor (a fused q/k/v split, a transposed kernel): kept as built
BUILT_AT_LOAD = {"lara_mini": "linear_attn.in_proj", "param2moe": "query_key_value", "sarvam_moe": "query_key_value",
                 "ergo": "feed_forward.shared_up_proj"}
ALL_FAMILIES += tuple(BUILT_AT_LOAD)
EXPERTS, HIDDEN, INTER = 4, 64, 64
SMALL = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=64, tie_word_embeddings=False, intermediate_size=INTER,
             intermediate_size_mlp=INTER, moe_intermediate_size=INTER, shared_expert_intermediate_size=INTER,
             num_experts=EXPERTS, num_local_experts=EXPERTS, n_routed_experts=EXPERTS, moe_num_experts=EXPERTS,
             num_experts_per_tok=2, moe_k=2, moe_topk=2, n_shared_experts=1, moe_num_shared_experts=1,
             num_shared_expert=1, first_k_dense_replace=1, moe_layer_start_index=1, n_group=1, topk_group=1,
             kv_lora_rank=48, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
             decoder_sparse_step=1, mlp_only_layers=[], interleave_moe_layer_step=1, linear_num_key_heads=2,
             linear_num_value_heads=16, linear_key_head_dim=16, linear_value_head_dim=16,
             pad_token_id=0, eos_token_id=1, bos_token_id=None)


MLA = {"num_key_value_heads": 4, "qk_rope_head_dim": 32, "head_dim": 32, "kv_lora_rank": 64}  # as many k/v heads as q
# DeepSeek sparse attention: qk_head_dim is derived at init (set it again), the indexer's heads a multiple of 32
DSA = MLA | {"qk_head_dim": 48, "index_n_heads": 32, "index_head_dim": 64}
INKLING2 = {"num_attention_heads": 32, "num_key_value_heads": 8,  # sink/conv projections: one row per head
            "swa_num_attention_heads": 32, "swa_num_key_value_heads": 8, "swa_head_dim": 16,
            "n_layers_per_attn_res_block": 1}
PER_FAMILY = {"deepseek_v3": MLA, "deepseek_v2": MLA, "glm4_moe_lite": MLA, "axk1": MLA, "sarvam_mla": MLA,
              "zaya": {"num_experts_per_tok": 1, "num_key_value_heads": 4},  # ZAYA routes top-1
              "kimi_linear": MLA | {"num_experts_per_token": 2, "num_expert_group": 1, "topk_group": 1},
              "qwen3_5_moe_text": {"linear_num_value_heads": 32},  # in_proj_a/b: one row per value head, 32 rows
              "longcat_flash": MLA | {"num_layers": 2, "ffn_hidden_size": INTER, "expert_ffn_hidden_size": INTER,
                                "zero_expert_num": 2, "qk_head_dim": 48},
              "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0, "expert_layer_period": 2,
                        "expert_layer_offset": 1, "mamba_dt_rank": 64, "use_mamba_kernels": False},
              "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"], "mamba_n_heads": 16,
                                   "mamba_d_head": 8, "mamba_d_state": 8, "mamba_chunk_size": 16,
                                   "shared_intermediate_size": INTER},
              "dbrx": {"d_model": HIDDEN, "n_heads": 4, "n_layers": 2, "max_seq_len": 64,
                       "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0},
                       "ffn_config": {"hidden_size": HIDDEN, "ffn_hidden_size": INTER, "moe_num_experts": EXPERTS,
                                      "moe_top_k": 2}},
              "nemotron_h": {"layers_block_type": ["linear_attention", "full_attention", "moe"], "mamba_num_heads": 16,
                             "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 1, "chunk_size": 16,
                             "moe_shared_expert_intermediate_size": INTER},
              "deepseek_v4": {"head_dim": 32, "o_groups": 2, "o_lora_rank": 64, "index_n_heads": 32,
                              "index_head_dim": 64},
              "hy_v4": DSA, "deepseek_v32": DSA, "glm_moe_dsa": DSA, "axk2": DSA | {"gated_norm_rank": 64},
              "inkling2_text": INKLING2,
              "inkling2_loop_text": INKLING2 | {"loop_layer_index_start": 1, "loop_layer_index_end": 2,
                                               "loop_num_passes": 2, "loop_gate_rank": 64},  # layer 1 looped twice
              "bailing_hybrid": MLA | {"expert_swiglu_limit_list": [0, 0], "share_expert_swiglu_limit_list": [0, 0],
                                 "num_experts_per_token": 2, "num_expert_group": 1, "model_max_length": 64,
                                 "linear_num_heads": 32, "linear_head_dim": 8, "qk_head_dim": 48,
                                 "num_attention_heads": 32, "num_key_value_heads": 32},  # g_proj: one row per head
              "dots3_note_text": {"num_attention_heads": 32, "num_key_value_heads": 32, "q_lora_rank": 64,
                                  "kv_lora_rank": 64, "qk_rope_head_dim": 32, "qk_nope_head_dim": 16, "v_head_dim": 16,
                                  "head_dim": 64, "index_n_heads": 32, "index_head_dim": 32, "sliding_window": 4,
                                  "shared_experts_intermediate_size": INTER,
                                  "rope_parameters": {t: {"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5}
                                                      for t in ("indexed_attention", "sliding_attention")},
                                  # the sliding layer has heads of its own size, as in the released model
                                  "per_layer_config": {1: {"kv_lora_rank": 128, "qk_nope_head_dim": 32}}},
              "gemma4_text": {"enable_moe_block": True, "top_k_experts": 2, "hidden_size_per_layer_input": 0,
                              "per_layer_config": {1: {"head_dim": 32}}},  # the full-attention layer's wider heads
              "kolibri1_1": {"index_layers": [1], "kv_source_layers": [0, 1], "index_num_heads": 2,
                             "mlp_only_layers": [0], "mlp_only_intermediate_size": INTER},  # sliding, then indexed
              "laguna": {"layer_types": ["sliding_attention", "full_attention"],  # g_proj: one row per head
                         "num_attention_heads_per_layer": [32, 64]},
              "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},  # no default kinds
              "qwen4_exp_text": {"linear_num_value_heads": 32, "hc_lowrank": 64, "indexer_n_heads": 3,
                                 "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16,
                                 "indexer_compress_ratio": 4},
              "doge": {"is_moe": True},  # dense by default; its MoE layer (CDMoE) is what decompose refuses
              "ergo": {"first_dense_intermediate_size": INTER},  # its dense first layer (32768 wide by default)
              }


def decaying(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A matrix (or a stack of them) U·diag(σ)·Vᵀ with σ_k = 0.5/k, plus a little noise."""
    *batch, m, n = shape
    out = []
    for _ in range(max(1, int(torch.tensor(batch).prod()) if batch else 1)):
        u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen))
        v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen))
        s = 0.5 / torch.arange(1, min(m, n) + 1, dtype=torch.float32)
        out.append(u @ torch.diag(s) @ v.T + 0.002 * torch.randn(m, n, generator=gen))
    return torch.stack(out).reshape(shape) if batch else out[0]


def config(family: str, layers: int = 2, vocab: int = 96):
    """The family's default transformers config with :data:`SMALL` sizes (and ``layers`` blocks) applied."""
    from transformers import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[family]()
    if getattr(cfg, "is_heterogeneous", False):  # per-layer overrides name layers of the full-size model
        cfg.per_layer_config = None
    present = cfg.to_dict()
    per_layer = PER_FAMILY.get(family, {}).get("per_layer_config")  # the tiny model's own, applied last
    for key, value in (SMALL | PER_FAMILY.get(family, {}) | {"num_hidden_layers": layers, "vocab_size": vocab,
                                                          "unpadded_vocab_size": vocab}).items():
        sub = getattr(cfg, key, None)
        if isinstance(value, dict) and hasattr(sub, "to_dict"):  # a nested config (DBRX's attn_config, ffn_config)
            for k, v in value.items():
                setattr(sub, k, v)
        elif key in present:
            setattr(cfg, key, value)
    for key, value in present.items():  # per-layer kinds (layer_types, mlp_layer_types): every kind once if it fits
        if key.endswith("layer_types") and isinstance(value, list) and value and key not in PER_FAMILY.get(family, {}):
            kinds = list(dict.fromkeys(value))
            setattr(cfg, key, (kinds * layers)[:layers])
    if getattr(cfg, "no_rope_layers", None):
        cfg.no_rope_layers = cfg.no_rope_layers[:layers]
    if per_layer:
        cfg.per_layer_config = per_layer
    return cfg


def build(family: str, dest: Path, layers: int = 2, seed: int = 0, tokenizer: Path | None = None) -> Path:
    """Save a tiny ``family`` MoE with save_pretrained (transformers 5 writes its checkpoint layout: per expert or
    fused); with ``tokenizer`` (a model dir), its tokenizer files are copied and the vocabulary sized to it."""
    import transformers

    vocab = 96
    if tokenizer is not None:
        vocab = transformers.AutoTokenizer.from_pretrained(tokenizer).vocab_size
    cfg = config(family, layers, vocab)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    cfg.architectures = [type(model).__name__]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in name and "lm_head" not in name and min(p.shape[-2:]) >= 8:
                p.copy_(decaying(tuple(p.shape), gen))
    model.to(torch.bfloat16).save_pretrained(dest)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, dest)
    return dest
