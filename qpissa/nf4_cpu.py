"""Exact CPU NF4 quantizer: bitsandbytes' bytes, in chunks, without its full-size temporaries.

bitsandbytes ≥0.46 quantizes 4-bit on the CPU with its pure-torch "default" kernel: per block of
``blocksize`` weights absmax aᵦ, x̂ = clamp(x·(1/aᵦ), −1, 1), code = ``torch.bucketize(x̂, midpoints)``
(the index of the nearest NF4 value, ties to the lower one), two codes per byte (even index in the high
nibble). It does so on the whole tensor at once: an fp32 copy, x̂, the clamp, int32 codes and packing
temporaries, ≈ 4–6× the fp32 weight; and ``bucketize`` (a binary search per element) is most of its time.

Here the same arithmetic runs on chunks of whole blocks written into preallocated outputs, and the code
is a compare-and-count over the 15 midpoints mₖ: code = 15 − #{k : x̂ ≤ mₖ}, which equals bucketize's
#{k : mₖ < x̂} for every x̂ including exact ties (x̂ = mₖ → lower code) and gives 15 for NaN as bucketize
does. The clamp is dropped: clamping to ±1 never moves a value across a midpoint in (−1, 1). The quant
state is bitsandbytes' own :class:`QuantState` (double quantization through its ``quantize_blockwise``
on the whole absmax vector, as ``bitsandbytes.functional.quantize_4bit`` does), so dequantization,
serialization and loading are unchanged. Byte-identical to
``quantize_4bit(w.float(), blocksize, compress_statistics, quant_type="nf4")`` (tests/test_nf4_cpu.py).
"""
from __future__ import annotations

import torch

# elements per chunk (4 MiB of fp32): big enough that few parallel regions run (on a loaded machine each can wait
# a scheduler slice for its second thread), small enough that the 15 compare passes stay mostly in cache
CHUNK_ELEMENTS = 1 << 20
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes.functional.quantize_4bit accepts
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # read as w.float(), chunk by chunk


def nf4_midpoints(code: torch.Tensor) -> list[float]:
    """The 15 decision boundaries (cₖ + cₖ₊₁)/2 between sorted NF4 values, computed in fp32 as
    bitsandbytes' ``_get_4bit_quantize_bounds`` does (NF4's code is already sorted)."""
    code = code.float()
    return ((code[:-1] + code[1:]) / 2).tolist()


def _codes(scaled: torch.Tensor, bounds: list[float], out: torch.Tensor, mask: torch.Tensor) -> None:
    """out (uint8) = 15 − #{k : scaled ≤ mₖ} = bucketize(scaled, m); ``mask``: a bool buffer like ``scaled``."""
    out.fill_(len(bounds))
    for m in bounds:
        torch.le(scaled, m, out=mask)
        out.sub_(mask.view(torch.uint8))


def _pack(codes: torch.Tensor, out: torch.Tensor, high: torch.Tensor) -> None:
    """out[j] = codes[2j] << 4 | codes[2j+1] (``codes`` even-length uint8; ``high`` a buffer like ``out``)."""
    torch.bitwise_left_shift(codes[0::2], 4, out=high)
    torch.bitwise_or(high, codes[1::2], out=out)


def quantize_nf4_cpu(w: torch.Tensor, blocksize: int = 64, compress_statistics: bool = False):
    """NF4-quantize ``w`` (any shape; fp32, bf16, fp16 or fp64, on the CPU) → (packed (⌈n/2⌉, 1) uint8, QuantState),
    the state recording fp32 as dtype: exactly ``bitsandbytes.functional.quantize_4bit(w.float(), …)``."""
    from bitsandbytes.functional import QuantState, get_4bit_type, quantize_blockwise

    if w.device.type != "cpu":
        raise ValueError(f"quantize_nf4_cpu takes CPU tensors, got {w.device}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"invalid blocksize {blocksize}")
    if w.dtype not in DTYPES:
        raise ValueError(f"NF4 quantizes float tensors, got {w.dtype}")
    code = get_4bit_type("nf4", device=w.device)  # (16,) fp32
    bounds = nf4_midpoints(code)
    flat = w.reshape(-1)  # (n,) a view when w is contiguous
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = full // blocksize
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8)  # (⌈n/2⌉, 1)
    absmax = torch.empty(blocks + (1 if rem else 0), dtype=torch.float32)  # (blocks [+1],)
    per = max(1, CHUNK_ELEMENTS // blocksize)  # blocks per chunk
    size = min(per, max(blocks, 1)) * blocksize
    scaled = torch.empty(size, dtype=torch.float32)  # chunk buffers, reused
    wide = torch.empty(size, dtype=torch.float32) if w.dtype != torch.float32 else None
    codes = torch.empty(size, dtype=torch.uint8)
    mask = torch.empty(size, dtype=torch.bool)
    high = torch.empty(size // 2, dtype=torch.uint8)
    for b0 in range(0, blocks, per):
        k = min(per, blocks - b0)  # blocks in this chunk
        s, e = b0 * blocksize, (b0 + k) * blocksize
        x = flat[s:e] if wide is None else wide[: e - s].copy_(flat[s:e])  # (k·bs,) fp32
        buf = scaled[: e - s]
        torch.abs(x, out=buf)
        torch.amax(buf.view(k, blocksize), dim=1, out=absmax[b0:b0 + k])  # (k,)
        inv = 1.0 / absmax[b0:b0 + k].clamp(min=1e-38)  # (k,) as bitsandbytes: multiply by the reciprocal
        torch.mul(x.view(k, blocksize), inv.view(-1, 1), out=buf.view(k, blocksize))
        _codes(buf, bounds, codes[: e - s], mask[: e - s])
        _pack(codes[: e - s], packed[s // 2:e // 2, 0], high[: (e - s) // 2])
    if rem:  # the last, partial block: absmax clamped before it is stored, and a division (bitsandbytes' order)
        tail = flat[full:].float()  # (rem,)
        am = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        x = torch.clamp(tail / am, -1, 1)
        if rem % 2:  # bitsandbytes pads an odd count with one 0.0 (code 7) before packing
            x = torch.cat([x, x.new_zeros(1)])
        tail_codes = torch.empty(x.numel(), dtype=torch.uint8)
        _codes(x, bounds, tail_codes, torch.empty(x.numel(), dtype=torch.bool))
        _pack(tail_codes, packed[full // 2:, 0], torch.empty(x.numel() // 2, dtype=torch.uint8))
    if compress_statistics:
        offset = absmax.mean()
        qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
        state = QuantState(absmax=qabsmax, shape=w.shape, dtype=torch.float32, blocksize=blocksize, code=code,
                           quant_type="nf4", offset=offset, state2=state2)
    else:
        state = QuantState(absmax=absmax, shape=w.shape, dtype=torch.float32, blocksize=blocksize, code=code,
                           quant_type="nf4")
    return packed, state
