"""Triton NF4 dequantization of bitsandbytes' packed layout, bit-exact to ``dequantize_4bit``.

Layout (bitsandbytes ≥ 0.43, verified by experiment against ``quantize_4bit``): the row-major
weight (N, K) is flattened; element ``i`` is the high nibble of byte ``i // 2`` when ``i`` is even
and the low nibble when odd; blocks of ``blocksize`` *consecutive flat elements* share one absmax::

    deq(Q)[i] = code[nibble_i] · absmax[i // blocksize]          (fp32 product, one cast)
    absmax[j] = code2[absmax_u8[j]] · absmax2[j // blocksize2] + offset   (double quant, fp32)

(Dettmers et al. 2023, "QLoRA", §3: NF4 and Double Quantization.) One program decodes
``GROUPS`` whole quantization blocks as a (GROUPS, blocksize/2) tile of packed bytes: one scale
gather per block, two 16-entry code lookups per byte, high/low nibbles interleaved with ``tl.join``
and stored once, coalesced.

Bit-exactness notes: the nested scale is computed with FMA contraction disabled
(``enable_fp_fusion=False``) because bitsandbytes rounds the product and the ``+ offset``
separately; bf16 output is rounded to nearest-even by integer arithmetic (:func:`_to_bf16_bits`)
so the Triton interpreter (whose bf16 cast truncates) and the GPU give the same bits.

Caveat found while testing: bitsandbytes 0.50's *CPU-native* dequantizer mis-indexes blocks when
``blocksize > in_features`` (it is row-local; quantization and the CUDA/default kernels are flat).
We follow the flat layout, which is what ``quantize_4bit`` writes.
"""
from __future__ import annotations

import os

import torch

from qpissa.quant import NF4Weight

try:  # Triton is an optional (test/GPU) dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None


def interpreting() -> bool:
    """True when our kernels run in Triton's CPU interpreter.

    Triton decides this when a kernel is *decorated*, i.e. when this module is first imported:
    ``TRITON_INTERPRET=1`` must be in the environment before ``import qpissa.kernels.*``.
    """
    if triton is None:
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return type(_nf4_dequant_kernel).__name__ == "InterpretedFunction"


def triton_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when Triton kernels can run on ``device``; otherwise a one-line reason."""
    if triton is None:
        return "triton is not installed (pip install triton)"
    dev = torch.device(device) if device is not None else None
    if interpreting():
        if dev is not None and dev.type != "cpu":
            return f"TRITON_INTERPRET=1 runs on CPU tensors only, got device {dev}"
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 set before importing qpissa.kernels runs them on CPU, slowly)"
    if dev is not None and dev.type != "cuda":
        return f"Triton kernels need CUDA tensors, got device {dev}"
    return None


if triton is not None:

    @triton.jit
    def _to_bf16_bits(x):
        """fp32 → bf16 bit pattern (int16), round to nearest even (finite inputs)."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.to(tl.uint16).to(tl.int16, bitcast=True)

    @triton.jit
    def _round_bf16(x):
        """fp32 → nearest-even bf16 value, kept in fp32 (for the interpreter's fp32 dots)."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return rounded.to(tl.float32, bitcast=True)

    @triton.jit
    def _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, mask,
                     NESTED: tl.constexpr, LOG2_BS2: tl.constexpr):
        """fp32 absmax of flat block ``blk``; resolves double quantization."""
        if NESTED:
            a8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            am = tl.load(code2_ptr + a8, mask=mask, other=0.0) * tl.load(absmax2_ptr + (blk >> LOG2_BS2),
                                                                          mask=mask, other=0.0)
            return am + offset
        else:
            return tl.load(absmax_ptr + blk, mask=mask, other=0.0)

    @triton.jit
    def _nf4_dequant_kernel(
        q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, out_ptr, n_elements, n_bytes,
        LOG2_BS: tl.constexpr, LOG2_BS2: tl.constexpr, NESTED: tl.constexpr, OUT_KIND: tl.constexpr,
        GROUPS: tl.constexpr,
    ):
        """One program = GROUPS quantization blocks: a (GROUPS, blocksize/2) tile of packed bytes."""
        HALF: tl.constexpr = 1 << (LOG2_BS - 1)  # bytes per block
        blk = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)  # (G,)
        byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (G, HALF)
        bmask = byte < n_bytes
        packed = tl.load(q_ptr + byte, mask=bmask, other=0).to(tl.int32)  # (G, HALF)
        scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, blk * HALF < n_bytes,
                             NESTED, LOG2_BS2)[:, None]  # (G, 1) one gather per block
        hi = tl.load(code_ptr + (packed >> 4)) * scale  # (G, HALF) fp32, element 2·byte
        lo = tl.load(code_ptr + (packed & 0xF)) * scale  # (G, HALF) fp32, element 2·byte + 1
        if OUT_KIND == 1:  # bf16 bits
            hi_o = _to_bf16_bits(hi)
            lo_o = _to_bf16_bits(lo)
        elif OUT_KIND == 2:  # fp16
            hi_o = hi.to(tl.float16)
            lo_o = lo.to(tl.float16)
        else:
            hi_o = hi
            lo_o = lo
        vals = tl.reshape(tl.join(hi_o, lo_o), (GROUPS, 2 * HALF))  # (G, blocksize) interleaved hi, lo
        elem = blk[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]  # (G, blocksize)
        tl.store(out_ptr + elem, vals, mask=elem < n_elements)


_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def nested_args(w: NF4Weight) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(absmax2, code2, offset, log2(blocksize2)) kernel arguments; dummies when not nested."""
    if w.nested:
        return w.absmax2, w.code2, float(w.offset), int(w.blocksize2).bit_length() - 1
    return w.code, w.code, 0.0, 8


def log2_blocksize(w: NF4Weight) -> int:
    bs = int(w.blocksize)
    if bs < 2 or bs & (bs - 1):
        raise ValueError(f"blocksize must be a power of two ≥ 2, got {bs}")
    return bs.bit_length() - 1


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype | None = None, block_bytes: int | None = None) -> torch.Tensor:
    """deq(Q) as a dense (N, K) tensor of ``dtype`` (default: the dtype bitsandbytes would return).

    Bit-identical to ``bitsandbytes.functional.dequantize_4bit(packed, quant_state)``.
    ``block_bytes``: packed bytes per program, rounded down to a power-of-two number of whole
    quantization blocks (at least one).
    """
    reason = triton_unavailable_reason(w.packed.device)
    if reason is not None:
        raise RuntimeError(f"Triton NF4 dequantize unavailable: {reason}")
    dtype = dtype or w.dtype
    if dtype not in _OUT_KIND:
        raise ValueError(f"output dtype must be fp32/bf16/fp16, got {dtype}")
    n = w.numel
    n_bytes = (n + 1) // 2
    if w.packed.numel() < n_bytes:
        raise ValueError(f"packed tensor has {w.packed.numel()} bytes, shape {w.shape} needs {n_bytes}")
    out = torch.empty(w.shape, dtype=dtype, device=w.packed.device)  # (N, K)
    out_view = out.view(torch.int16) if dtype == torch.bfloat16 else out
    absmax2, code2, offset, log2_bs2 = nested_args(w)
    log2_bs = log2_blocksize(w)
    bb = block_bytes or (128 if interpreting() else 2048)  # packed bytes per program (≥ one block)
    groups = 1 << max(0, (bb // (w.blocksize // 2)).bit_length() - 1)  # power of two ≥ 1
    grid = (triton.cdiv(n_bytes, groups * (w.blocksize // 2)),)
    _nf4_dequant_kernel[grid](
        w.packed, w.absmax, w.code, absmax2, code2, offset, out_view, n, n_bytes,
        LOG2_BS=log2_bs, LOG2_BS2=log2_bs2, NESTED=w.nested, OUT_KIND=_OUT_KIND[dtype],
        GROUPS=groups, num_warps=4, enable_fp_fusion=False,
    )
    return out
