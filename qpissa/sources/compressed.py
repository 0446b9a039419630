"""compressed-tensors checkpoints (llm-compressor; ``quant_method: compressed-tensors``).

``pack-quantized`` (w4a16): ``X.weight_packed`` int32 (m, n/8), code of input 8k+j in bits 4j..4j+3,
stored offset by 8 (unsigned); ``X.weight_scale`` (m, G) (group / channel) or (1,) (tensor); asymmetric:
``X.weight_zero_point`` int32 packed the same way along the output dim; ``X.weight_shape`` int64 [m, n];
act-order: ``X.weight_g_idx`` (n,). Decoded: W[o, i] = (q[o, i] − z[o, g(i)]) · s[o, g(i)] (q, z signed).
``float-quantized`` (fp8): ``X.weight`` float8 + ``X.weight_scale`` per tensor, channel, group or block,
W = fp32(q) · scale. Both match the library's own ``decompress`` (checked in tests/test_sources.py).
"""
from __future__ import annotations

import functools

import torch

from qpissa.errors import UserError
from qpissa.formats import TensorInfo, load_tensor
from qpissa.sources.base import SourceFormat, logical, need, unpack_int4
from qpissa.sources.fp8 import FP8_DTYPES, block_dequantize


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, *rest: torch.Tensor, group_size: int,
                      has_zero: bool, has_g_idx: bool) -> torch.Tensor:
    """fp32 (m, n) from a pack-quantized 4-bit weight (``rest``: zero point and/or g_idx as flagged)."""
    w = unpack_int4(packed, dim=-1).float().sub_(8)  # (m, n) signed codes
    m, n = w.shape
    rest = list(rest)
    zero = unpack_int4(rest.pop(0), dim=0)[:m].float() - 8 if has_zero else None  # (m, G)
    groups = rest.pop(0).long() if has_g_idx else torch.arange(n, device=w.device) // group_size  # (n,)
    s = scale.float().reshape(m, -1) if scale.numel() > 1 else scale.float().reshape(1, 1).expand(m, 1)
    if zero is not None:
        w.sub_(zero[:, groups] if zero.shape[1] > 1 else zero)  # exact: small integers
    return w.mul_(s[:, groups] if s.shape[1] > 1 else s)  # one fp32 product a weight


def _weight_args(qcfg: dict) -> dict:
    groups = [g.get("weights") or {} for g in (qcfg.get("config_groups") or {}).values()]
    args = [a for a in groups if a]
    if len({str(sorted(a.items())) for a in args}) > 1:
        raise UserError("compressed-tensors checkpoint with several weight schemes: not read; use a single-scheme release")
    return args[0] if args else {}


def read(infos: list[TensorInfo], qcfg: dict, dtype: str) -> tuple[list[TensorInfo], SourceFormat]:
    """Logical tensors of a compressed-tensors checkpoint and its description."""
    sparsity = qcfg.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise UserError(f"compressed-tensors sparsity format {sparsity.get('format')!r}: not read; use a dense release")
    args = _weight_args(qcfg)
    fmt = str(qcfg.get("format") or "")
    bits, strategy = int(args.get("num_bits", 4)), args.get("strategy", "group")
    group = int(args.get("group_size") or 0)
    block = args.get("block_structure")
    by_name = {i.name: i for i in infos}
    out, used, kinds = [], set(), set()
    for info in infos:
        if info.name in used:
            continue
        if info.name.endswith(".weight_packed"):
            if bits != 4:
                raise UserError(f"compressed-tensors pack-quantized {bits}-bit weights: only 4-bit is read")
            base = info.name.removesuffix("_packed")
            scale = need(by_name, base + "_scale", "compressed-tensors")
            shape = tuple(int(d) for d in load_tensor(need(by_name, base + "_shape", "compressed-tensors")).tolist())
            extra = [by_name[k] for k in (base + "_zero_point", base + "_g_idx") if k in by_name]
            gsize = group or shape[1] // max(1, scale.shape[-1])
            decode = functools.partial(dequantize_packed, group_size=gsize, has_zero=base + "_zero_point" in by_name,
                                       has_g_idx=base + "_g_idx" in by_name)
            used.update([scale.name, base + "_shape"] + [e.name for e in extra])
            kinds.add("pack-quantized")
            out.append(logical(base, [info, scale, *extra], shape, dtype, decode))
        elif info.dtype in FP8_DTYPES and info.name + "_scale" in by_name:
            scale = by_name[info.name + "_scale"]
            m, n = info.shape[-2:]
            if strategy == "block" and block:
                grid = (int(block[0]), int(block[1]))
            elif len(scale.shape) >= 2 and scale.shape[-1] > 1:
                grid = (1, group or -(-n // scale.shape[-1]))
            elif len(scale.shape) >= 2:
                grid = (1, n)  # channel
            else:
                grid = None  # tensor
            used.update([scale.name, info.name.removesuffix("weight") + "input_scale"])
            kinds.add("float-quantized")
            out.append(logical(info.name, [info, scale], info.shape, dtype,
                               functools.partial(block_dequantize, block=grid)))
        else:
            out.append(info)
    out = [i for i in out if i.name not in used]
    size = list(block) if strategy == "block" and block else (group or None)
    detail = f"{'/'.join(sorted(kinds)) or fmt}, {bits}-bit {args.get('type', 'int')}, {strategy}" + \
        (f" {size}" if size else "")
    quantized = sum(1 for i in out if i.packed is not None)
    return out, SourceFormat("compressed-tensors", detail, float(bits), size, quantized)
