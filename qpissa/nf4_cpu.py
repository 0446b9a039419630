"""Exact CPU NF4 quantizer: bitsandbytes' bytes, in chunks, without its full-size temporaries.

bitsandbytes ≥0.46 quantizes 4-bit on the CPU with its pure-torch "default" kernel: per block of
``blocksize`` weights absmax aᵦ, x̂ = clamp(x·(1/aᵦ), −1, 1), code = ``torch.bucketize(x̂, midpoints)``
(the index of the nearest NF4 value, ties to the lower one), two codes per byte (even index in the high
nibble). It does so on the whole tensor at once: an fp32 copy, x̂, the clamp, int32 codes and packing
temporaries, ≈ 4–6× the fp32 weight; and ``bucketize`` (a binary search per element) is most of its time.

Here the same arithmetic runs on chunks of whole blocks written into preallocated outputs. The code is
bucketize's #{k : mₖ < x̂} over the 15 midpoints mₖ (exact ties x̂ = mₖ → the lower code), found by a table
lookup on 64 uniform bins plus one compare (:func:`_codes_lut`); a chunk holding NaN/Inf uses a
compare-and-count, code = 15 − #{k : x̂ ≤ mₖ}, which gives bucketize's 15 for NaN. The clamp is dropped:
clamping to ±1 never moves a value across a midpoint in (−1, 1).

Without double quantization nothing here imports bitsandbytes (its import compiles kernels with
torch.compile: ≈1 s of a fresh process): the state is :class:`NF4State`, bitsandbytes' ``QuantState`` fields
and its ``as_dict(packed=True)`` serialization, and :func:`dequantize_nf4_cpu` is its CPU kernel's
``code[q]·absmax``. With double quantization the state is bitsandbytes' own ``QuantState`` (its
``quantize_blockwise`` on the whole absmax vector, as ``quantize_4bit`` does). Byte-identical to
``quantize_4bit(w.float(), blocksize, compress_statistics, quant_type="nf4")`` (tests/test_nf4_cpu.py).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

# elements per chunk (4 MiB of fp32): big enough that few parallel regions run (on a loaded machine each can wait
# a scheduler slice for its second thread), small enough that the 15 compare passes stay mostly in cache
CHUNK_ELEMENTS = 1 << 20
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes.functional.quantize_4bit accepts
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # read as w.float(), chunk by chunk
# bitsandbytes' NF4 levels, ``get_4bit_type("nf4")`` as fp32 (sorted; equal to it in tests/test_nf4_cpu.py)
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0)


@dataclass
class NF4State:
    """bitsandbytes' ``QuantState`` of a non-nested NF4 tensor (same attribute names), built without importing it."""

    absmax: torch.Tensor  # (blocks,) fp32
    shape: torch.Size
    code: torch.Tensor  # (16,) fp32 NF4 levels
    blocksize: int
    dtype: torch.dtype = torch.float32
    quant_type: str = "nf4"
    offset: None = None
    state2: None = None
    nested: bool = False

    def as_dict(self, packed: bool = False) -> dict:
        """``QuantState.as_dict``: the tensors plus, packed, the other fields as UTF-8 JSON bytes under
        ``quant_state.bitsandbytes__nf4`` (what transformers reads back)."""
        fields = {"quant_type": self.quant_type, "absmax": self.absmax, "blocksize": self.blocksize,
                  "quant_map": self.code, "dtype": str(self.dtype).strip("torch."), "shape": tuple(self.shape)}
        if not packed:
            return fields
        tensors = {k: v for k, v in fields.items() if isinstance(v, torch.Tensor)}
        rest = json.dumps({k: v for k, v in fields.items() if not isinstance(v, torch.Tensor)}).encode("utf-8")
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(rest), dtype=torch.uint8)
        return tensors

    def to_bitsandbytes(self):
        """The same state as a ``bitsandbytes.functional.QuantState``."""
        from bitsandbytes.functional import QuantState

        return QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
                          quant_type=self.quant_type, dtype=self.dtype)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """(16,) fp32 NF4 levels on ``device``."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dequantize_nf4_cpu(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                       shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 ``code[q]·absmax[block]`` for packed NF4 bytes (high nibble first) holding ``prod(shape)`` weights
    from a block boundary on: bitsandbytes' CPU kernel's arithmetic (one fp32 product per weight, so the same
    bits), in flat order also where blocks straddle rows. ``absmax``: fp32, one per block of these weights."""
    n = 1
    for d in shape:
        n *= d
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], 1)  # (256, 2): byte → (high, low) level
    flat = pairs.view(torch.int64).view(256).index_select(0, packed.reshape(-1).int())  # (⌈n/2⌉,) two fp32 each
    flat = flat.view(torch.float32)[:n]  # (n,)
    full = n - n % blocksize
    flat[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].view(-1, 1))
    if full < n:
        flat[full:].mul_(absmax[full // blocksize])
    return flat.view(shape)


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


LUT_BINS = 64  # uniform bins of [−1, 1] for the table lookup: each holds at most one midpoint, far from its edges


@functools.cache
def _lookup_tables(bounds: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, inner) over :data:`LUT_BINS` + 1 bins of width 2/LUT_BINS from −1 (the last bin holds x̂ = 1):
    base[g] (uint8) = #{k : mₖ < bin g's lower edge}, inner[g] (fp32) = the midpoint inside bin g, or +inf.

    code(x̂) = base[g] + [x̂ > inner[g]] with g = ⌊x̂·B/2 + B/2⌋ equals #{k : mₖ < x̂}. Rounding can put an x̂
    within a few ulps of an edge into the neighbouring bin; the sum is the same there as long as no midpoint is
    that close to an edge, which is checked here (every midpoint ≥ 1e-4 from its bin's edges)."""
    half = LUT_BINS / 2
    base = torch.zeros(LUT_BINS + 1, dtype=torch.uint8)
    inner = torch.full((LUT_BINS + 1,), float("inf"), dtype=torch.float32)
    for g in range(LUT_BINS + 1):
        lo, hi = g / half - 1, (g + 1) / half - 1
        base[g] = sum(1 for m in bounds if m < lo)
        inside = [m for m in bounds if lo <= m < hi]
        if len(inside) > 1 or any(min(m - lo, hi - m) < 1e-4 for m in inside):
            raise AssertionError(f"LUT_BINS={LUT_BINS}: bin {g} does not separate the NF4 midpoints")
        if inside:
            inner[g] = inside[0]
    return base, inner


def _codes_lut(scaled: torch.Tensor, bounds: list[float], out: torch.Tensor, index: torch.Tensor,
               work: torch.Tensor, mask: torch.Tensor) -> None:
    """out (uint8) = bucketize(scaled, m) for finite ``scaled`` in [−1, 1] (up to rounding), by table lookup:
    6 passes instead of 30 (≈3× faster). ``index`` int32, ``work`` fp32 and ``mask`` bool buffers like ``scaled``."""
    base, inner = _lookup_tables(tuple(bounds))
    half = LUT_BINS / 2
    torch.mul(scaled, half, out=work).add_(half)
    index.copy_(work)  # truncation: ⌊·⌋ for these non-negative values
    torch.index_select(base, 0, index, out=out)
    torch.index_select(inner, 0, index, out=work)
    torch.gt(scaled, work, out=mask)
    out.add_(mask.view(torch.uint8))


def _pack(codes: torch.Tensor, out: torch.Tensor, high: torch.Tensor) -> None:
    """out[j] = codes[2j] << 4 | codes[2j+1] (``codes`` even-length uint8; ``high`` a buffer like ``out``)."""
    torch.bitwise_left_shift(codes[0::2], 4, out=high)
    torch.bitwise_or(high, codes[1::2], out=out)


def quantize_nf4_cpu(w: torch.Tensor, blocksize: int = 64, compress_statistics: bool = False):
    """NF4-quantize ``w`` (any shape; fp32, bf16, fp16 or fp64, on the CPU) → (packed (⌈n/2⌉, 1) uint8, state),
    the state recording fp32 as dtype: exactly ``bitsandbytes.functional.quantize_4bit(w.float(), …)``."""
    if w.device.type != "cpu":
        raise ValueError(f"quantize_nf4_cpu takes CPU tensors, got {w.device}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"invalid blocksize {blocksize}")
    if w.dtype not in DTYPES:
        raise ValueError(f"NF4 quantizes float tensors, got {w.dtype}")
    code = nf4_code()  # (16,) fp32
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
    index, work = torch.empty(size, dtype=torch.int32), torch.empty(size, dtype=torch.float32)
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
        if torch.isfinite(absmax[b0:b0 + k]).all():  # every x̂ finite and within [−1, 1] up to rounding
            _codes_lut(buf, bounds, codes[: e - s], index[: e - s], work[: e - s], mask[: e - s])
        else:  # NaN/Inf in the chunk: the compare-and-count, which gives bucketize's 15 for NaN
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
        from bitsandbytes.functional import QuantState, quantize_blockwise

        offset = absmax.mean()
        qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
        state = QuantState(absmax=qabsmax, shape=w.shape, dtype=torch.float32, blocksize=blocksize, code=code,
                           quant_type="nf4", offset=offset, state2=state2)
    else:
        state = NF4State(absmax=absmax, shape=w.shape, code=code, blocksize=blocksize)
    return packed, state
