"""GPTQ and AWQ 4-bit checkpoints (``quant_method: gptq`` / ``awq``), group-wise with zero points.

GPTQ (AutoGPTQ / GPTQModel, ``checkpoint_format`` gptq): ``X.qweight`` int32 (n/8, m), eight codes a word
packed along the input dim (code of input 8k+j in bits 4j..4j+3); ``X.qzeros`` int32 (G, m/8) packed along
the output dim, each stored as zero − 1 (the v1 quirk; ``gptq_v2`` stores the zero itself); ``X.scales``
(G, m) fp16; ``X.g_idx`` int32 (n,): the group of each input column (act-order / ``desc_act`` permutes it;
without it, group = column // group_size). Decoded: W[o, i] = (q[i, o] − z[g(i), o]) · s[g(i), o].

AWQ (AutoAWQ GEMM, ``version: gemm``): ``X.qweight`` int32 (n, m/8) and ``X.qzeros`` int32 (G, m/8) both
packed along the output dim in the nibble order 0,2,4,6,1,3,5,7; ``X.scales`` (G, m) fp16. Decoded:
W[o, i] = (q[i, o] − z[i // g, o]) · s[i // g, o]. Both: the (m, n) weight of ``nn.Linear``, fp32.
"""
from __future__ import annotations

import functools

import torch

from qpissa.errors import UserError
from qpissa.formats import TensorInfo
from qpissa.sources.base import SourceFormat, logical, need, unpack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _dequantize(q: torch.Tensor, z: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """fp32 (m, n) = (q − z[g]) · s[g] from codes q (n, m), zeros z (G, m), scales (G, m), groups (n,)."""
    w = q.T.contiguous().float()  # (m, n)
    w.sub_(z.float()[groups].T)  # exact: small integers
    return w.mul_(scales.float()[groups].T)  # one fp32 product a weight


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *g_idx: torch.Tensor,
                    group_size: int, zero_offset: int) -> torch.Tensor:
    """fp32 (m, n) from GPTQ's packed tensors (``g_idx`` optional; ``zero_offset`` 1 for the v1 format)."""
    q = unpack_int4(qweight, dim=0)  # (n, m)
    z = unpack_int4(qzeros, dim=-1).int() + zero_offset  # (G, m)
    groups = g_idx[0].long() if g_idx else torch.arange(q.shape[0], device=q.device) // group_size  # (n,)
    return _dequantize(q, z, scales, groups)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """fp32 (m, n) from AWQ GEMM's packed tensors."""
    q = unpack_int4(qweight, dim=-1, order=AWQ_ORDER)  # (n, m)
    z = unpack_int4(qzeros, dim=-1, order=AWQ_ORDER)  # (G, m)
    groups = torch.arange(q.shape[0], device=q.device) // group_size  # (n,)
    return _dequantize(q, z, scales, groups)


def read(infos: list[TensorInfo], qcfg: dict, dtype: str) -> tuple[list[TensorInfo], SourceFormat]:
    """Logical tensors of a GPTQ or AWQ checkpoint and its description."""
    method = qcfg.get("quant_method")
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    group = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
    if bits != 4:
        raise UserError(f"{method} checkpoint with {bits}-bit weights: only 4-bit {method} is read; "
                        "use a 4-bit or a bf16 release")
    if method == "awq" and str(qcfg.get("version", "gemm")).lower() != "gemm":
        raise UserError(f"awq version {qcfg.get('version')!r}: only the GEMM packing is read; use a GEMM release")
    if method == "awq" and qcfg.get("zero_point") is False:
        raise UserError("awq checkpoint without zero points: not read; use a zero-point (default) release")
    v2 = str(qcfg.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
    by_name = {i.name: i for i in infos}
    out, used, count, act_order = [], set(), 0, False
    for info in infos:
        if info.name in used:
            continue
        if not info.name.endswith(".qweight"):
            out.append(info)
            continue
        base = info.name.removesuffix(".qweight")
        parts = [info, need(by_name, base + ".qzeros", method), need(by_name, base + ".scales", method)]
        if method == "gptq":
            n, m = info.shape[0] * 8, info.shape[1]
            if base + ".g_idx" in by_name:
                parts.append(by_name[base + ".g_idx"])
            decode = functools.partial(dequantize_gptq, group_size=group if group > 0 else n,
                                       zero_offset=0 if v2 else 1)
        else:
            n, m = info.shape[0], info.shape[1] * 8
            decode = functools.partial(dequantize_awq, group_size=group)
        used.update(p.name for p in parts)
        count += 1
        out.append(logical(base + ".weight", parts, (m, n), dtype, decode))
        act_order = act_order or bool(qcfg.get("desc_act"))
    out = [i for i in out if i.name not in used]
    detail = f"int4 codes, groups of {group}" + (", act-order (g_idx)" if act_order else "") + \
        (", gptq_v2 zeros" if v2 else "")
    return out, SourceFormat(method, detail, 4.0, group, count)
