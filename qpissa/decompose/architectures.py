"""Linear layers of well-known architectures from config.json alone, without importing transformers.

Why: finding the linear layers on a meta-device model means importing transformers and the model's module
(≈2 s in a fresh process, a fifth of decomposing SmolLM2-135M). For the families most users decompose, the
layout is fixed: ``num_hidden_layers`` blocks of known linears, plus known ones outside the blocks (the head,
present even when tied). Each entry here is checked against the meta model in tests/test_architectures.py, so
a transformers release that changes a layout fails the suite instead of changing outputs. Anything not listed,
or a config option that adds layers (cross-attention), or remote code, takes the meta-model path.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Linear module names of one architecture, in the model's ``named_modules()`` order."""

    model_type: str  # config.json's model_type this layout is for
    block: str  # block module prefix, formatted with the block index
    linears: tuple[str, ...]  # linears inside each block, relative to it
    outside: tuple[str, ...]  # linears after the blocks (heads, poolers)

    def modules(self, layers: int) -> list[str]:
        inside = [f"{self.block.format(i)}.{name}" for i in range(layers) for name in self.linears]
        return inside + list(self.outside)


_DECODER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYOUTS: dict[str, Layout] = {
    "LlamaForCausalLM": Layout("llama", "model.layers.{}", _DECODER, ("lm_head",)),
    "MistralForCausalLM": Layout("mistral", "model.layers.{}", _DECODER, ("lm_head",)),
    "Qwen2ForCausalLM": Layout("qwen2", "model.layers.{}", _DECODER, ("lm_head",)),
    "Qwen3ForCausalLM": Layout("qwen3", "model.layers.{}", _DECODER, ("lm_head",)),
    "GemmaForCausalLM": Layout("gemma", "model.layers.{}", _DECODER, ("lm_head",)),
    "Phi3ForCausalLM": Layout("phi3", "model.layers.{}",
                              ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"),
                              ("lm_head",)),
    "BertModel": Layout("bert", "encoder.layer.{}",
                        ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "intermediate.dense", "output.dense"), ("pooler.dense",)),
}
STRUCTURAL_OPTIONS = ("add_cross_attention", "is_decoder", "auto_map")  # any of these set: use the meta model


def known_linear_modules(config: dict) -> tuple[dict[str, bool], str, str | None] | None:
    """({module: is_conv1d}, architecture, PEFT task type) as :func:`qpissa.decompose.targets.linear_modules`
    finds them, for a config.json of a listed architecture; None when the meta model must decide."""
    archs = config.get("architectures") or [None]
    layout = LAYOUTS.get(archs[0]) if isinstance(archs, list) and len(archs) == 1 else None
    layers = config.get("num_hidden_layers")
    if layout is None or config.get("model_type") != layout.model_type or not isinstance(layers, int) or layers < 0:
        return None
    if any(config.get(option) for option in STRUCTURAL_OPTIONS):
        return None
    arch = archs[0]
    return ({m: False for m in layout.modules(layers)}, arch,
            "CAUSAL_LM" if arch.endswith("ForCausalLM") else None)
