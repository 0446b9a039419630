"""Tiny mixture-of-experts checkpoints built from transformers configs (Qwen3-MoE, Mixtral, OLMoE), bf16, with a
decaying singular spectrum in every matrix (σ_k ∝ 1/k, as trained weights have; plain noise has a flat one)."""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("qwen3_moe", "mixtral", "olmoe")
EXPERTS, HIDDEN, INTER = 4, 64, 64


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


def build(family: str, dest: Path, layers: int = 2, seed: int = 0, tokenizer: Path | None = None) -> Path:
    """Save a tiny ``family`` MoE with save_pretrained (transformers 5 writes one tensor per expert); with
    ``tokenizer`` (a model dir), its tokenizer files are copied and the vocabulary sized to it (train, eval)."""
    import shutil

    import transformers

    vocab = 96
    if tokenizer is not None:
        vocab = transformers.AutoTokenizer.from_pretrained(tokenizer).vocab_size
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False)
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=INTER, intermediate_size=INTER, num_experts=EXPERTS,
                                          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], **common)
        cls = transformers.Qwen3MoeForCausalLM
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=INTER, num_local_experts=EXPERTS, num_experts_per_tok=2,
                                         **common)
        cls = transformers.MixtralForCausalLM
    else:
        cfg = transformers.OlmoeConfig(intermediate_size=INTER, num_experts=EXPERTS, num_experts_per_tok=2,
                                       pad_token_id=0, eos_token_id=1, bos_token_id=None, **common)
        cls = transformers.OlmoeForCausalLM
    cfg.architectures = [cls.__name__]
    torch.manual_seed(seed)
    model = cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in name and "lm_head" not in name and not name.endswith("gate.weight"):
                p.copy_(decaying(tuple(p.shape), gen))
    model.to(torch.bfloat16).save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if tokenizer is not None and (tokenizer / name).exists():
            shutil.copy(tokenizer / name, dest / name)
    return dest
