"""config.json → the parameter tensors of a model, without loading weights.

Each architecture family lists its parameters as :class:`ParamGroup` rows (one row per kind of tensor,
with the number of copies), so the memory planner can count bytes exactly: which linears NF4 quantizes,
which PEFT targets wrap, and which tensors stay in the base dtype (embeddings, norms, biases, an untied
``lm_head``).

Supported ``model_type`` values: llama, mistral, qwen2, qwen3 (decoder, RMSNorm, SwiGLU, GQA) and
bert, roberta (encoder, LayerNorm, GELU). Counts were checked against ``sum(p.numel())`` of the real
models (see tests/test_plan.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qpissa.errors import UserError
from qpissa.plan.config_fields import need
from qpissa.hub import CONFIG_FILES, is_hub_id, resolve_model

Family = Literal["llama", "bert"]
Kind = Literal["linear", "embedding", "norm", "bias", "head", "router"]

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MOE_TYPES = ("qwen3_moe", "mixtral", "olmoe")  # every block's MLP is E experts + a router (Qwen3-MoE: unless mlp_only)
MLA_MOE_TYPES = ("deepseek_v3",)  # latent attention, dense first blocks, shared + routed experts (plan.deepseek_shapes)
ENCODER_TYPES = ("bert", "roberta")
SUPPORTED = DECODER_TYPES + MOE_TYPES + MLA_MOE_TYPES + ENCODER_TYPES


@dataclass(frozen=True)
class ParamGroup:
    """``count`` parameter tensors of one kind and shape (e.g. every layer's q_proj weight)."""

    name: str                      # module path with {i} for the layer: "model.layers.{i}.self_attn.q_proj"
    short: str                     # PEFT target name: "q_proj" (the last module name)
    kind: Kind
    shape: tuple[int, ...]         # weight shape: (out, in) for a linear
    count: int = 1
    group: Literal["attn", "mlp", "other"] = "other"
    bias: int = 0                  # bias length of a linear (0: no bias)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def total(self) -> int:
        """Elements over all copies, bias included."""
        return (self.numel + self.bias) * self.count


@dataclass(frozen=True)
class ModelShapes:
    """Sizes read from config.json plus every parameter tensor of the model."""

    model_type: str
    family: Family
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    causal_lm: bool                # has an LM head whose logits (B·L·vocab) enter the loss
    dtype: str                     # torch_dtype of the checkpoint ("bfloat16", "float32", …)
    params: list[ParamGroup] = field(default_factory=list)
    attention_dropout: float = 0.0
    max_positions: int = 0         # max_position_embeddings (0: unknown)

    @property
    def linears(self) -> list[ParamGroup]:
        return [p for p in self.params if p.kind in ("linear", "head")]

    @property
    def n_params(self) -> int:
        return sum(p.total for p in self.params)


def load_config(path: str | Path, revision: str | None = None) -> dict:
    """Read ``config.json`` (a file, a model folder holding one, or a Hub id ``org/name``: its config.json alone is
    fetched at ``revision``) with errors a user can act on."""
    p = Path(path)
    if revision is not None or (not p.exists() and is_hub_id(str(path))):
        p = resolve_model(path, revision, files=CONFIG_FILES)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise UserError(f"{p}: no such config file; pass a config.json or a model folder that holds one")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{p}: not valid JSON ({err}); pass the model's config.json") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{p}: expected a JSON object with hidden_size, num_hidden_layers, …")
    if "text_config" in cfg and "hidden_size" not in cfg:   # multimodal wrappers keep the LM inside
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures", [])}
    cfg["_path"] = str(p)
    return cfg


def shapes_from_config(cfg: dict) -> ModelShapes:
    """Dispatch on ``model_type``; unknown types are a user error naming the supported ones."""
    mt = cfg.get("model_type")
    if mt in DECODER_TYPES:
        return _decoder(cfg)
    if mt in MOE_TYPES:
        from qpissa.plan.moe_shapes import moe_decoder

        return moe_decoder(cfg, _decoder)
    if mt in MLA_MOE_TYPES:
        from qpissa.plan.deepseek_shapes import deepseek_decoder

        return deepseek_decoder(cfg, _decoder)
    if mt in ENCODER_TYPES:
        return _encoder(cfg)
    raise UserError(f"{cfg.get('_path', 'config')}: model_type {mt!r} is not supported by the planner; "
                    f"supported: {', '.join(SUPPORTED)}")


def _decoder(cfg: dict) -> ModelShapes:
    """Llama-style decoder: q,k,v,o + gate,up,down per layer; Qwen2 adds q/k/v biases, Qwen3 q/k norms."""
    mt = cfg["model_type"]
    h, i, n = need(cfg, "hidden_size"), need(cfg, "intermediate_size"), need(cfg, "num_hidden_layers")
    a, v = need(cfg, "num_attention_heads"), need(cfg, "vocab_size")
    kv = cfg.get("num_key_value_heads") or a
    hd = cfg.get("head_dim") or h // a
    qd, kvd = a * hd, kv * hd
    qkv_bias = mt == "qwen2" or bool(cfg.get("attention_bias", False))
    o_bias = bool(cfg.get("attention_bias", False)) and mt != "qwen2"
    mlp_bias = bool(cfg.get("mlp_bias", False))
    tied = bool(cfg.get("tie_word_embeddings", False))
    L = "model.layers.{i}"
    ps = [ParamGroup("model.embed_tokens", "embed_tokens", "embedding", (v, h))]
    ps += [
        ParamGroup(f"{L}.self_attn.q_proj", "q_proj", "linear", (qd, h), n, "attn", qd if qkv_bias else 0),
        ParamGroup(f"{L}.self_attn.k_proj", "k_proj", "linear", (kvd, h), n, "attn", kvd if qkv_bias else 0),
        ParamGroup(f"{L}.self_attn.v_proj", "v_proj", "linear", (kvd, h), n, "attn", kvd if qkv_bias else 0),
        ParamGroup(f"{L}.self_attn.o_proj", "o_proj", "linear", (h, qd), n, "attn", h if o_bias else 0),
        ParamGroup(f"{L}.mlp.gate_proj", "gate_proj", "linear", (i, h), n, "mlp", i if mlp_bias else 0),
        ParamGroup(f"{L}.mlp.up_proj", "up_proj", "linear", (i, h), n, "mlp", i if mlp_bias else 0),
        ParamGroup(f"{L}.mlp.down_proj", "down_proj", "linear", (h, i), n, "mlp", h if mlp_bias else 0),
        ParamGroup(f"{L}.input_layernorm", "input_layernorm", "norm", (h,), n),
        ParamGroup(f"{L}.post_attention_layernorm", "post_attention_layernorm", "norm", (h,), n),
    ]
    if mt == "qwen3":
        ps += [ParamGroup(f"{L}.self_attn.q_norm", "q_norm", "norm", (hd,), n),
               ParamGroup(f"{L}.self_attn.k_norm", "k_norm", "norm", (hd,), n)]
    ps.append(ParamGroup("model.norm", "norm", "norm", (h,)))
    if not tied:
        ps.append(ParamGroup("lm_head", "lm_head", "head", (v, h)))
    return ModelShapes(mt, "llama", h, i, n, a, kv, hd, v, tied, True, _dtype(cfg), ps,
                       float(cfg.get("attention_dropout", 0.0) or 0.0), int(cfg.get("max_position_embeddings") or 0))


def _encoder(cfg: dict) -> ModelShapes:
    """BERT/RoBERTa encoder as ``BertModel`` (with pooler, no task head): post-LayerNorm blocks, biased linears."""
    mt = cfg["model_type"]
    h, i, n = need(cfg, "hidden_size"), need(cfg, "intermediate_size"), need(cfg, "num_hidden_layers")
    a, v = need(cfg, "num_attention_heads"), need(cfg, "vocab_size")
    pos, types = need(cfg, "max_position_embeddings"), cfg.get("type_vocab_size", 2)
    L = "encoder.layer.{i}"
    ps = [
        ParamGroup("embeddings.word_embeddings", "word_embeddings", "embedding", (v, h)),
        ParamGroup("embeddings.position_embeddings", "position_embeddings", "embedding", (pos, h)),
        ParamGroup("embeddings.token_type_embeddings", "token_type_embeddings", "embedding", (types, h)),
        ParamGroup("embeddings.LayerNorm", "LayerNorm", "norm", (2 * h,)),
        ParamGroup(f"{L}.attention.self.query", "query", "linear", (h, h), n, "attn", h),
        ParamGroup(f"{L}.attention.self.key", "key", "linear", (h, h), n, "attn", h),
        ParamGroup(f"{L}.attention.self.value", "value", "linear", (h, h), n, "attn", h),
        ParamGroup(f"{L}.attention.output.dense", "dense", "linear", (h, h), n, "attn", h),
        ParamGroup(f"{L}.attention.output.LayerNorm", "LayerNorm", "norm", (2 * h,), n),
        ParamGroup(f"{L}.intermediate.dense", "dense", "linear", (i, h), n, "mlp", i),
        ParamGroup(f"{L}.output.dense", "dense", "linear", (h, i), n, "mlp", h),
        ParamGroup(f"{L}.output.LayerNorm", "LayerNorm", "norm", (2 * h,), n),
    ]
    ps.append(ParamGroup("pooler.dense", "dense", "linear", (h, h), 1, "other", h))
    return ModelShapes(mt, "bert", h, i, n, a, a, h // a, v, True, False, _dtype(cfg), ps,
                       float(cfg.get("attention_probs_dropout_prob", 0.0) or 0.0), pos)


def _dtype(cfg: dict) -> str:
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
