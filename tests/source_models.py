"""Tiny checkpoints in the published formats (FP8, MXFP4, bitsandbytes, GPTQ, AWQ, compressed-tensors).

Each is written the way its format's own tool writes it: bitsandbytes through transformers' ``from_pretrained``
+ ``save_pretrained``; compressed-tensors through the library's own compressors; FP8 and MXFP4 as the
published files lay them out (quantized here, decoded in the tests by transformers' own loaders); GPTQ and
AWQ packed from the formats' specs (no CPU library packs them: gptqmodel and autoawq are sdists needing CUDA
builds), with the integer codes kept so the expected weights come from the codes, not from our decoder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from helpers import copy_tokenizer

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(dest: Path, seed: int = 0, tokenizer: Path | None = None) -> Path:
    """A 2-layer bf16 Llama (hidden 64, MLP 128); with ``tokenizer`` its files and vocabulary size."""
    import transformers

    vocab = transformers.AutoTokenizer.from_pretrained(tokenizer).vocab_size if tokenizer else 256
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():  # trained-like scale: ~N(0, 0.05²)
            if p.ndim == 2:
                p.normal_(0, 0.05)
    model.to(torch.bfloat16).save_pretrained(dest)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, dest)
    return dest


def _tensors(src: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _write(src: Path, dest: Path, tensors: dict[str, torch.Tensor], qcfg: dict) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            shutil.copy(p, dest / p.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"), {"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qcfg
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEAR


def to_fp8(src: Path, dest: Path, block: tuple[int, int] = (32, 32), dtype: torch.dtype = torch.float8_e4m3fn) -> Path:
    """Block-FP8 as DeepSeek-V3 ships it: q = fp8(W / s), ``weight_scale_inv`` = s = amax(block) / fp8 max."""
    out = {}
    fmax = torch.finfo(dtype).max
    for name, w in _tensors(src).items():
        if not _is_linear(name):
            out[name] = w
            continue
        m, n = w.shape
        g = w.float().reshape(m // block[0], block[0], n // block[1], block[1])
        s = g.abs().amax(dim=(1, 3)).clamp(min=1e-12) / fmax  # (m/bm, n/bn)
        out[name] = (g / s[:, None, :, None]).reshape(m, n).to(dtype)
        out[name + "_scale_inv"] = s
    return _write(src, dest, out, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                   "weight_block_size": list(block), "fmt": "e4m3" if dtype == torch.float8_e4m3fn else "e5m2"})


def to_bnb(src: Path, dest: Path, **kwargs) -> Path:
    """bitsandbytes 4-bit or 8-bit, quantized and saved by transformers (``kwargs``: BitsAndBytesConfig's)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(**kwargs), device_map="cpu")
    model.save_pretrained(dest)
    copy_tokenizer(src, dest)
    return dest


def _pack(codes: torch.Tensor, dim: int, order=tuple(range(8))) -> torch.Tensor:
    """Eight 4-bit codes a little-endian int32 word along ``dim``: logical code k of a word in nibble order.index(k)."""
    c = codes.movedim(dim, -1).to(torch.int64)
    c = c.reshape(*c.shape[:-1], -1, 8)  # (..., words, 8)
    word = torch.zeros(c.shape[:-1], dtype=torch.int64)
    for k in range(8):
        word |= c[..., k] << (4 * order.index(k))
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.movedim(-1, dim).contiguous()


def _int4(w: torch.Tensor, groups: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """Asymmetric 4-bit codes of w (m, n) per input group: codes (m, n), zeros (m, G) in 1..15 (GPTQ v1 stores
    zero − 1), scales (m, G) fp16."""
    m, _ = w.shape
    lo = torch.full((m, count), float("inf")).scatter_reduce(1, groups.expand(m, -1), w, "amin")
    hi = torch.full((m, count), float("-inf")).scatter_reduce(1, groups.expand(m, -1), w, "amax")
    scale = ((hi - lo) / 15).clamp(min=1e-6).half()
    zero = torch.round(-lo / scale.float()).clamp(1, 15).to(torch.int32)
    codes = torch.round(w / scale.float()[:, groups] + zero[:, groups]).clamp(0, 15).to(torch.int32)
    return codes, zero, scale


def to_gptq_awq(src: Path, dest: Path, method: str, group: int = 32, act_order: bool = False) -> tuple[Path, dict]:
    """GPTQ (v1 zeros: stored − 1; act-order: a permuted g_idx) or AWQ GEMM; returns the expected fp32 weights
    W = (q − z) · s computed from the integer codes."""
    out, expected = {}, {}
    gen = torch.Generator().manual_seed(1)
    for name, w in _tensors(src).items():
        if not _is_linear(name):
            out[name] = w
            continue
        base = name.removesuffix(".weight")
        m, n = w.shape
        groups = torch.arange(n) // group
        if act_order:
            groups = groups[torch.randperm(n, generator=gen)]  # desc_act: columns quantized out of order
        codes, zero, scale = _int4(w.float(), groups, n // group)
        expected[name] = (codes - zero[:, groups]).float() * scale.float()[:, groups]
        if method == "gptq":
            out[base + ".qweight"] = _pack(codes.T, dim=0)  # (n/8, m)
            out[base + ".qzeros"] = _pack((zero - 1).T & 0xF, dim=1)  # (G, m/8), zero − 1
            out[base + ".g_idx"] = groups.to(torch.int32)
        else:
            order = (0, 2, 4, 6, 1, 3, 5, 7)
            out[base + ".qweight"] = _pack(codes.T, dim=1, order=order)  # (n, m/8)
            out[base + ".qzeros"] = _pack(zero.T, dim=1, order=order)  # (G, m/8)
        out[base + ".scales"] = scale.T.contiguous()  # (G, m)
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": False,
            "checkpoint_format": "gptq"} if method == "gptq" else \
        {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
    return _write(src, dest, out, qcfg), expected


def to_compressed(src: Path, dest: Path, kind: str) -> Path:
    """compressed-tensors through the library: ``w4a16`` (pack-quantized, asymmetric groups of 32) or ``fp8``
    (float-quantized, one scale a channel)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    if kind == "w4a16":
        args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
        fmt = "pack-quantized"
    else:
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
        fmt = "float-quantized"
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = BaseCompressor.load_from_registry(fmt)
    out = {}
    for name, w in _tensors(src).items():
        if not _is_linear(name):
            out[name] = w
            continue
        base = name.removesuffix("weight")
        g = w.float().reshape(w.shape[0], -1, 32) if kind == "w4a16" else w.float().reshape(w.shape[0], 1, -1)
        scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
        state = {"weight": w, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zero}
        for key, value in compressor.compress(state, scheme).items():
            out[base + key] = value
    qcfg = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(mode="json"),
                                          "input_activations": None, "format": fmt}},
            "ignore": ["lm_head"]}
    return _write(src, dest, out, qcfg)


def compressed_reference(dest: Path, kind: str) -> dict[str, torch.Tensor]:
    """The library's own ``decompress`` of every quantized module of ``dest``."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    qcfg = json.loads((dest / "config.json").read_text())["quantization_config"]
    group = qcfg["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**group["weights"]))
    compressor = BaseCompressor.load_from_registry(group["format"])
    tensors = _tensors(dest)
    out = {}
    marker = ".weight_packed" if kind == "w4a16" else ".weight_scale"
    for key in tensors:
        if key.endswith(marker):
            base = key.removesuffix(marker) + "."
            local = {k.removeprefix(base): v for k, v in tensors.items() if k.startswith(base) and
                     k.removeprefix(base).startswith("weight")}
            out[base + "weight"] = compressor.decompress(local, scheme)["weight"]
    return out


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., rows, n) → blocks (..., rows, n/32, 16) uint8 (low nibble: even element) and e8m0 scales (..., rows,
    n/32): per 32-block, 2^e with e = ⌊log2 amax⌋ − 2 (e2m1's largest value is 1.5·2²), codes the nearest e2m1."""
    g = w.float().reshape(*w.shape[:-1], -1, 32)
    amax = g.abs().amax(-1).clamp(min=2.0**-100)
    e = torch.floor(torch.log2(amax)) - 2  # (..., rows, G)
    x = g / torch.exp2(e)[..., None]  # |x| < 8
    idx = (x.abs()[..., None] - E2M1).abs().argmin(-1)  # nearest magnitude
    codes = (idx | ((x < 0).long() << 3)).to(torch.uint8)  # sign bit 3
    pairs = codes.reshape(*codes.shape[:-1], 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous(), (e + 127).to(torch.uint8)


def gpt_oss(dest: Path, tokenizer: Path | None = None, seed: int = 0) -> Path:
    """A 2-layer bf16 gpt-oss (4 experts with biases, a sliding and a full attention layer)."""
    import transformers

    vocab = transformers.AutoTokenizer.from_pretrained(tokenizer).vocab_size if tokenizer else 256
    cfg = transformers.GptOssConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                                    sliding_window=8, max_position_embeddings=256, tie_word_embeddings=False)
    cfg.architectures = ["GptOssForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.05)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(dest)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, dest)
    return dest


def to_mxfp4(src: Path, dest: Path) -> Path:
    """gpt-oss as OpenAI publishes it: experts ``*_blocks`` / ``*_scales`` (the stored (E, out, in) orientation),
    everything else bf16 and listed in ``modules_to_not_convert``."""
    out = {}
    for name, w in _tensors(src).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4_quantize(w.transpose(1, 2))  # (E, in, out) → stored (E, out, in/32, 16)
            out[name + "_blocks"], out[name + "_scales"] = blocks, scales
        else:
            out[name] = w
    return _write(src, dest, out, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
