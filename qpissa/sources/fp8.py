"""Block-wise FP8 (DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8; ``quant_method: fp8``).

Stored: ``X.weight`` float8 (e4m3 or e5m2), (..., m, n), and ``X.weight_scale_inv`` float32, one per
``weight_block_size`` [bm, bn] block: (..., ⌈m/bm⌉, ⌈n/bn⌉) (a scalar without ``weight_block_size``).
Decoded: W[i, j] = fp32(q[i, j]) · scale_inv[i // bm, j // bn], one fp32 product per weight, as
transformers' ``Fp8Dequantize`` computes it (the same bits). ``input_scale`` / ``activation_scale`` (static
activation quantization) only serve the FP8 matmul and are dropped.
"""
from __future__ import annotations

import functools
import math

import torch

from qpissa.errors import UserError
from qpissa.formats import TensorInfo
from qpissa.sources.base import SourceFormat, logical, need

FP8_DTYPES = {"F8_E4M3": "e4m3", "F8_E5M2": "e5m2"}
ACTIVATION_SCALES = (".input_scale", ".activation_scale")


def block_dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """fp32 q·scale with one scale per [bm, bn] block of the last two dims (``block`` None: one scale)."""
    w = q.float()  # (..., m, n)
    s = scale.float()
    if block is None or s.numel() == 1:
        return w * s.reshape(())
    *lead, m, n = w.shape
    bm, bn = block
    if m % bm == 0 and n % bn == 0:  # in place, scales broadcast over a blocked view: no m×n scale tensor
        w.view(*lead, m // bm, bm, n // bn, bn).mul_(s.view(*lead, m // bm, 1, n // bn, 1))
        return w
    s = s.repeat_interleave(bm, dim=-2)[..., :m, :].repeat_interleave(bn, dim=-1)[..., :n]  # (..., m, n)
    return w * s


def scale_grid(weight: TensorInfo, scale: TensorInfo, block: tuple[int, int] | None, fmt: str) -> None:
    """A one-line error unless ``scale``'s shape is the ⌈m/bm⌉ × ⌈n/bn⌉ grid ``block`` implies."""
    if block is None:
        if math.prod(scale.shape) != 1:
            raise UserError(f"{fmt}: {scale.name} has shape {list(scale.shape)} but the config gives no block size")
        return
    *lead, m, n = weight.shape
    want = (*lead, -(-m // block[0]), -(-n // block[1]))
    if tuple(scale.shape) != want:
        raise UserError(f"{fmt}: {scale.name} has shape {list(scale.shape)}, expected {list(want)} for blocks "
                        f"{list(block)} of {weight.name} {list(weight.shape)}; the checkpoint does not match its config")


def read(infos: list[TensorInfo], qcfg: dict, dtype: str) -> tuple[list[TensorInfo], SourceFormat]:
    """Logical tensors of an FP8 checkpoint and its description."""
    block_size = qcfg.get("weight_block_size")
    block = (int(block_size[0]), int(block_size[1])) if block_size else None
    by_name = {i.name: i for i in infos}
    out, used, kinds = [], set(), set()
    for info in infos:
        if info.name in used or info.name.endswith(("_scale_inv",) + ACTIVATION_SCALES):
            continue
        if info.dtype in FP8_DTYPES:
            scale = need(by_name, info.name + "_scale_inv", "fp8")
            scale_grid(info, scale, block, "fp8")
            kinds.add(FP8_DTYPES[info.dtype])
            used.add(scale.name)
            out.append(logical(info.name, [info, scale], info.shape, dtype,
                               functools.partial(block_dequantize, block=block)))
        else:
            out.append(info)
    blocks = f"{block[0]}×{block[1]} blocks" if block else "one scale a tensor"
    detail = f"{'/'.join(sorted(kinds)) or 'e4m3'}, {blocks}"
    return out, SourceFormat("fp8", detail, 8.0, list(block) if block else None, len(used))
