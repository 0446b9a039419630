"""Model-level fidelity of an initialization: how close OUT/residual + OUT/adapter starts to the original.

Decoder LMs: mean over held-out tokens of KL(p_original ‖ p_initialized) of the next-token
distributions, KL = Σ_v p(v)·(log p(v) − log q(v)). Encoders: cosine of the mean-pooled last
hidden states (sentence-transformers pooling), averaged over sequences. Both models are loaded
the plain way a user would — ``from_pretrained`` (+ ``PeftModel.from_pretrained`` for the adapter) —
so the figure covers the saved files, not our in-memory tensors. Both are held at once (whole), so
this is for models that fit in memory twice; compute is fp32 (bitsandbytes' CPU bf16 shortcut off).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def _fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Compute in fp32: 4-bit layers dequantize to fp32 and the non-quantized tensors are upcast."""
    from qpissa.quant import compute_in_fp32, keep_4bit_layout_trainable

    keep_4bit_layout_trainable(model)  # also keeps bitsandbytes' CPU eval path off its bf16 inference kernel
    compute_in_fp32(model)
    return model.eval()


def load_pair(model_dir: Path, out_dir: Path, device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module, bool]:
    """(original, initialized = residual + adapter, is_causal_lm), both in eval mode on ``device``."""
    import json

    from transformers import AutoModel, AutoModelForCausalLM

    from qpissa.sources import quantization_of
    from qpissa.adapters import load_peft

    arch = (json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or [""])[0]
    causal = arch.endswith("ForCausalLM")
    auto = AutoModelForCausalLM if causal else AutoModel
    if quantization_of(Path(model_dir)):  # a published FP8/MXFP4/4-bit release: its weights, decoded
        from qpissa.sources.load import load_decoded

        original = _fp32(load_decoded(model_dir, torch.float32, device_map=device))
    else:
        original = _fp32(auto.from_pretrained(str(model_dir), dtype=torch.float32, device_map=device))
    base = _fp32(auto.from_pretrained(str(Path(out_dir) / "residual"), dtype=torch.float32, device_map=device))
    init = load_peft(base, Path(out_dir) / "adapter").eval()
    return original, init, causal


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position from logits (…, V) → (…), in fp32."""
    logp = torch.log_softmax(p_logits.float(), dim=-1)  # (…, V)
    logq = torch.log_softmax(q_logits.float(), dim=-1)  # (…, V)
    return (logp.exp() * (logp - logq)).sum(-1)


def model_fidelity(model_dir: Path, out_dir: Path, sequences: Sequence[torch.Tensor], device: str = "cpu") -> dict:
    """{"kl": mean token KL(original ‖ initialized), "tokens": n} for a causal LM, or
    {"cosine": mean pooled-embedding cosine, "sequences": n} for an encoder; ``sequences``: (1, T) ids each."""
    original, init, causal = load_pair(Path(model_dir), Path(out_dir), device)
    return fidelity(original, init, causal, sequences, device)


def fidelity(original: torch.nn.Module, init: torch.nn.Module, causal: bool, sequences: Sequence[torch.Tensor],
             device: str = "cpu") -> dict:
    """:func:`model_fidelity` on already loaded models."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            ids = ids.to(device)
            if causal:
                kl = token_kl(original(input_ids=ids).logits, init(input_ids=ids).logits)  # (1, T)
                total, count = total + float(kl.sum()), count + kl.numel()
            else:
                a = original(input_ids=ids).last_hidden_state.mean(1)  # (1, d)
                b = init(input_ids=ids).last_hidden_state.mean(1)  # (1, d)
                total, count = total + float(torch.cosine_similarity(a.float(), b.float()).sum()), count + 1
    if not count:
        return {}
    return {"kl": total / count, "tokens": count} if causal else {"cosine": total / count, "sequences": count}
