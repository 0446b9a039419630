"""A deterministic synthetic Llama-3-8B-shaped checkpoint for scale rehearsals without a download.

Shapes are Llama-3-8B's (hidden 4096, intermediate 14336, 32 heads, 8 KV heads of 128, RMSNorm, untied head)
except the vocabulary, 32,000 instead of 128,256 (the embedding and head are not adapter targets; this keeps
the checkpoint at ≈1.4 GB for 2 layers). Sharded bf16 safetensors (one shard per block plus one for the
embedding, final norm and head) with a ``model.safetensors.index.json``; ``config.json`` is a real
``LlamaConfig`` that transformers loads.

Weights are not Gaussian noise: each linear W (m×n) is

    W = U·diag(σ)·Vᵀ + E ⊙ (1 + outlier columns)

with U (m×k), V (n×k) orthonormal (QR of Gaussian sketches, k = 128: no SVD of a big matrix is needed),
σ_i = σ_1·i^(−0.6) decaying singular values with σ_1 = 4× the bulk's edge, E heavy-tailed noise (Gaussian
× log-normal scale, std ≈ 0.02, kurtosis ≫ 3, like trained weights) and ≈0.5% input channels scaled 4–12×
(the outlier features of LLM weights, Dettmers et al. 2022, "LLM.int8()"). Every tensor has its own
generator seeded from ``seed`` and its name, so files are reproducible up to BLAS rounding (MKL's
results can depend on memory alignment: an occasional bf16 ulp differs between runs).

Usage: python benchmarks/synthetic_checkpoint.py OUT [--layers 2] [--seed 0]
"""
from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 32_000
HEAD_DIM = HIDDEN // HEADS
LINEARS = {  # module (in a block) → (out, in), as nn.Linear stores it
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
SPECTRUM_RANK, DECAY, NOISE_STD, OUTLIER_FRACTION = 128, 0.6, 0.02, 0.005


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:12], 16))


def synthetic_linear(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """One m×n weight (bf16): decaying low-rank spectrum + heavy-tailed bulk + outlier input channels."""
    k = min(SPECTRUM_RANK, m, n)
    noise = torch.randn(m, n, generator=gen)  # (m, n)
    noise *= torch.exp(0.5 * torch.randn(m, n, generator=gen))  # Gaussian scale mixture: heavy tails
    noise *= NOISE_STD / math.exp(0.25)  # E[exp(0.5 z)²] = e^0.5 → std ≈ NOISE_STD
    edge = NOISE_STD * (math.sqrt(m) + math.sqrt(n))  # largest singular value of the bulk (Marchenko–Pastur)
    sigma = 4.0 * edge * torch.arange(1, k + 1, dtype=torch.float32) ** -DECAY  # (k,)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]  # (m, k)
    v = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]  # (n, k)
    noise.addmm_(u * sigma, v.T)  # (m, n) += U diag(σ) Vᵀ
    outliers = torch.randperm(n, generator=gen)[: max(1, int(OUTLIER_FRACTION * n))]  # (n_out,)
    noise[:, outliers] *= 4.0 + 8.0 * torch.rand(len(outliers), generator=gen)
    return noise.to(torch.bfloat16)


def _norm_weight(size: int, gen: torch.Generator) -> torch.Tensor:
    return (1.0 + 0.1 * torch.randn(size, generator=gen)).to(torch.bfloat16)


def _shard_plan(layers: int) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    total = layers + 1
    plan = {}
    for i in range(layers):
        names = [(f"model.layers.{i}.{mod}.weight", shape) for mod, shape in LINEARS.items()]
        names += [(f"model.layers.{i}.input_layernorm.weight", (HIDDEN,)),
                  (f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,))]
        plan[f"model-{i + 1:05d}-of-{total:05d}.safetensors"] = names
    plan[f"model-{total:05d}-of-{total:05d}.safetensors"] = [
        ("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("model.norm.weight", (HIDDEN,)),
        ("lm_head.weight", (VOCAB, HIDDEN))]
    return plan


def _make(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = _generator(seed, name)
    if len(shape) == 1:
        return _norm_weight(shape[0], gen)
    if "embed_tokens" in name or "lm_head" in name:
        return (0.02 * torch.randn(*shape, generator=gen)).to(torch.bfloat16)
    return synthetic_linear(*shape, gen)


def llama_config(layers: int) -> dict:
    """Llama-3-8B's config.json with ``layers`` blocks and a 32k vocabulary."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                      num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    return cfg.to_dict()


def write_synthetic_llama(out_dir: str | Path, layers: int = 2, seed: int = 0) -> Path:
    """Write the checkpoint into ``out_dir`` (created; files replaced atomically) and return it.

    Streams one tensor at a time, so peak memory is a few copies of the largest (14336×4096) weight.
    An existing complete checkpoint with the same layers and seed is reused.
    """
    from qpissa.atomic import write_json
    from qpissa.formats import DTYPE_NAMES, write_index, write_safetensors

    out = Path(out_dir)
    stamp = {"layers": layers, "seed": seed, "generator": "qpissa synthetic llama v1"}
    marker = out / "synthetic.json"
    if marker.is_file() and __import__("json").loads(marker.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for shard, names in _shard_plan(layers).items():
        entries = [(name, DTYPE_NAMES[torch.bfloat16], shape, 2 * math.prod(shape)) for name, shape in names]
        shapes = dict(names)
        write_safetensors(out / shard, entries, lambda name: _make(name, shapes[name], seed))
        for name, _, shape, nbytes in entries:
            weight_map[name] = shard
            total += nbytes
    write_index(out, weight_map, total)
    write_json(out / "config.json", llama_config(layers))
    write_json(marker, stamp)
    return out


def write_synthetic_like(out_dir: str | Path, like_dir: str | Path, seed: int = 0) -> Path:
    """A Llama with ``like_dir``'s config.json and tokenizer files but synthetic weights (same recipe) of its shapes.

    For machines where the real weights cannot travel (a GPU box reached with a 64 MiB upload): speed and memory
    depend on shapes only, so SmolLM2's config + tokenizer (3.5 MB) stand in for its 270 MB of weights.
    Written into a temp folder and renamed, reused when complete.
    """
    import shutil
    import tempfile

    from qpissa.formats import DTYPE_NAMES, write_safetensors
    from qpissa.plan.model_shapes import load_config, shapes_from_config

    out, like = Path(out_dir), Path(like_dir)
    if (out / "model.safetensors").is_file():
        return out
    model = shapes_from_config(load_config(like))  # every parameter tensor of the architecture
    if model.family != "llama":
        raise ValueError(f"{like}: write_synthetic_like writes Llama-style decoders, got {model.model_type}")
    shapes = {f"{p.name.format(i=i)}.weight": p.shape  # no biases: none in Llama / SmolLM2
              for p in model.params for i in range(p.count)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for f in like.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".index.json")):
                shutil.copy2(f, tmp / f.name)
        entries = [(name, DTYPE_NAMES[torch.bfloat16], shape, 2 * math.prod(shape)) for name, shape in shapes.items()]
        write_safetensors(tmp / "model.safetensors", entries, lambda name: _make(name, shapes[name], seed))
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = write_synthetic_llama(args.out, args.layers, args.seed)
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    print(f"wrote {path} ({size / 1e9:.2f} GB, {args.layers} layers)")


if __name__ == "__main__":
    main()
