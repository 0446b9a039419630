"""A Hugging Face decoder's config.json → llama.cpp's view of it: architecture, hyper-parameters, tensor names.

Facts (llama.cpp's ``llama-arch``/``llama-model`` loaders and the ``gguf`` package's ``TensorNameMap``):

* ``llama`` and ``mistral`` run as llama.cpp's ``llama``, which applies RoPE to adjacent pairs (x₀,x₁),(x₂,x₃)…
  while transformers rotates the two halves of a head (``rotate_half``). So q_proj/k_proj rows are reordered per
  head: row h·d + 2i + j ← row h·d + j·d/2 + i (j ∈ {0, 1}), with d the head size and the k/v head count for k.
  A LoRA on q/k gets the same reordering on its B (the output side; A is untouched).
* ``qwen2``, ``qwen3`` and ``gemma3`` use llama.cpp's NeoX RoPE (halves, as transformers): no reordering.
* Gemma 3's RMSNorm multiplies by (1 + w); llama.cpp multiplies by w, so every ``*norm.weight`` gets +1.
* Llama-3.1 ``rope_type: llama3`` frequency scaling becomes a ``rope_freqs.weight`` tensor of per-frequency divisors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from qpissa.errors import UserError

# HF model_type → llama.cpp architecture name (the gguf package's MODEL_ARCH_NAMES values)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
                 "qwen3_moe": "qwen3moe", "mixtral": "llama"}
_INTERLEAVED_ROPE = {"llama"}  # llama.cpp archs with GGML's normal (pairwise) RoPE


@dataclass(frozen=True)
class Arch:
    """What the exporter needs to know about one model: its llama.cpp name, layout changes and metadata."""

    name: str  # llama.cpp architecture, e.g. "qwen3"
    config: dict[str, Any]  # the HF config (text part)
    name_map: Any  # gguf.TensorNameMap

    @property
    def head_dim(self) -> int:
        c = self.config
        return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF tensor name of a checkpoint tensor, or None for a tensor llama.cpp does not load."""
        if hf_name == "lm_head.weight" and self.config.get("tie_word_embeddings"):
            return None  # tied: llama.cpp reads token_embd for the output
        return self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def row_permutation(self, gguf_name: str) -> np.ndarray | None:
        """Row order llama.cpp needs for ``gguf_name`` (q/k under pairwise RoPE), or None to keep it."""
        if self.name not in _INTERLEAVED_ROPE or not gguf_name.endswith((".attn_q.weight", ".attn_k.weight",
                                                                         ".attn_q.bias", ".attn_k.bias")):
            return None
        c = self.config
        heads = c["num_attention_heads"] if ".attn_q." in gguf_name else c.get("num_key_value_heads") or \
            c["num_attention_heads"]
        d = self.head_dim
        src = np.arange(heads * d).reshape(heads, 2, d // 2).swapaxes(1, 2).reshape(-1)  # new row k ← old src[k]
        return src

    def value_shift(self, gguf_name: str) -> float:
        """Constant added to a tensor (Gemma 3's (1 + w) norms)."""
        return 1.0 if self.name == "gemma3" and gguf_name.endswith("norm.weight") else 0.0

    def transform(self, gguf_name: str) -> Callable[[np.ndarray], np.ndarray]:
        """The full per-tensor change, as a function of the fp32 array."""
        perm, shift = self.row_permutation(gguf_name), self.value_shift(gguf_name)

        def apply(x: np.ndarray) -> np.ndarray:
            if perm is not None:
                x = x[perm]
            return x + np.float32(shift) if shift else x
        return apply


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def resolve(config: dict[str, Any], source: str) -> Arch:
    """The :class:`Arch` of a config.json, or one line naming the model type and the supported ones."""
    import gguf

    cfg = text_config(config)
    model_type = cfg.get("model_type") or config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"{source}: model_type {model_type!r} has no GGUF mapping; supported: "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    name = ARCHITECTURES[model_type]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name)
    return Arch(name, cfg, gguf.get_tensor_name_map(arch_enum, int(cfg["num_hidden_layers"])))


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in ``rope_parameters`` (per layer type for Gemma 3), 4.x in rope_*."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "full_attention" in params:  # Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}
        params = dict(params["full_attention"])
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def write_hparams(writer: Any, arch: Arch) -> None:
    """Write the architecture's hyper-parameters (``{arch}.*`` keys)."""
    import gguf

    c = arch.config
    writer.add_context_length(int(c.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(c["hidden_size"]))
    writer.add_block_count(int(c["num_hidden_layers"]))
    writer.add_feed_forward_length(int(c["intermediate_size"]))
    if c.get("num_local_experts") or c.get("num_experts"):  # MoE: Mixtral, Qwen3-MoE
        writer.add_expert_count(int(c.get("num_local_experts") or c["num_experts"]))
        writer.add_expert_used_count(int(c["num_experts_per_tok"]))
        if c.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(int(c["moe_intermediate_size"]))
    writer.add_head_count(int(c["num_attention_heads"]))
    writer.add_head_count_kv(int(c.get("num_key_value_heads") or c["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(c["vocab_size"]))
    d = arch.head_dim
    if d != c["hidden_size"] // c["num_attention_heads"] or arch.name in ("qwen3", "gemma3"):
        writer.add_key_length(d)
        writer.add_value_length(d)
    if arch.name == "llama":
        writer.add_rope_dimension_count(d)
    if arch.name == "gemma3":
        if c.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
        if c.get("sliding_window"):
            writer.add_sliding_window(int(c["sliding_window"]))
    rope = rope_parameters(c)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))


def notes(arch: Arch) -> list[str]:
    """What llama.cpp will run differently from transformers for this config (said in the summary)."""
    c = arch.config
    if arch.name == "qwen3moe" and not c.get("norm_topk_prob"):
        return ["norm_topk_prob is false: llama.cpp's qwen3moe always renormalizes the top-k router weights, so "
                "outputs will differ from transformers"]
    if arch.name == "qwen3moe" and (c.get("mlp_only_layers") or int(c.get("decoder_sparse_step", 1)) != 1):
        raise UserError("Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step) has no GGUF mapping here")
    scalar = c.get("query_pre_attn_scalar")
    if arch.name == "gemma3" and scalar not in (None, arch.head_dim) and int(c["num_hidden_layers"]) != 62:
        return [f"query_pre_attn_scalar {scalar} ≠ head_dim {arch.head_dim}: llama.cpp scales attention by "
                "1/√head_dim (its only exception is Gemma 3 27B), so outputs will differ from transformers"]
    return []


def extra_tensors(arch: Arch) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that the checkpoint does not hold (Llama 3.1's ``rope_freqs``), fp32."""
    rope = rope_parameters(arch.config)
    kind = rope["rope_type"]
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise UserError(f"rope_type {kind!r} has no GGUF mapping here; supported: default, linear, yarn, llama3")
    return {"rope_freqs.weight": llama3_rope_factors(rope, arch.head_dim)} if kind == "llama3" else {}


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama 3.1's frequency scaling as llama.cpp's per-frequency divisors (one per rotated pair), fp32."""
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_ctx = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / float(rope["rope_theta"]) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
