"""MXFP4 (gpt-oss experts; ``quant_method: mxfp4``, OCP Microscaling v1.0).

Stored: ``X_blocks`` uint8 (E, rows, G, 16): two e2m1 codes a byte (low nibble first), 32 codes a block;
``X_scales`` uint8 (E, rows, G): the block's e8m0 exponent, biased by 127. Decoded: value = e2m1[code] ·
2^(scale − 127) in fp32, then (E, rows, G·32) → (E, G·32, rows): the layout of the bf16 release (``gate_up_proj``
[E, H, 2I], ``down_proj`` [E, I, H]), as transformers' ``convert_moe_packed_tensors`` returns it (the same
values: each is an e2m1 value times a power of two, exact in fp32 and bf16). Everything else — attention,
routers, embeddings, the expert biases (``modules_to_not_convert``) — is stored plain and read as it is.
"""
from __future__ import annotations

import torch

from qpissa.errors import UserError
from qpissa.formats import TensorInfo
from qpissa.sources.base import SourceFormat, logical, need

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 (E, G·32, rows) from blocks (E, rows, G, 16) uint8 and scales (E, rows, G) uint8."""
    lut = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.uint8)
    *lead, groups, width = b.shape
    out = torch.empty(*lead, groups, width, 2, dtype=torch.float32, device=b.device)  # (E, rows, G, 16, 2)
    out[..., 0] = lut[(b & 0x0F).int()]  # low nibble: the even element
    out[..., 1] = lut[(b >> 4).int()]
    torch.ldexp(out, (scales.to(torch.int32) - 127)[..., None, None], out=out)  # · 2^(e − 127), in place
    return out.reshape(*lead, groups * width * 2).transpose(-1, -2).contiguous()  # (E, G·32, rows)


def read(infos: list[TensorInfo], qcfg: dict, dtype: str) -> tuple[list[TensorInfo], SourceFormat]:
    """Logical tensors of an MXFP4 checkpoint and its description."""
    by_name = {i.name: i for i in infos}
    out, used = [], set()
    for info in infos:
        if info.name in used or info.name.endswith("_scales"):
            continue
        if not info.name.endswith("_blocks"):
            out.append(info)
            continue
        base = info.name.removesuffix("_blocks")
        scales = need(by_name, base + "_scales", "mxfp4")
        if len(info.shape) != 4 or info.shape[-1] != BLOCK // 2 or tuple(scales.shape) != info.shape[:-1]:
            raise UserError(f"mxfp4: {info.name} {list(info.shape)} / {scales.name} {list(scales.shape)} are not "
                            "(experts, rows, groups, 16) / (experts, rows, groups) as gpt-oss stores them")
        used.add(scales.name)
        experts, rows, groups, _ = info.shape
        out.append(logical(base, [info, scales], (experts, groups * BLOCK, rows), dtype, dequantize))
    skip = qcfg.get("modules_to_not_convert") or []
    return out, SourceFormat("mxfp4", f"e2m1 codes, e8m0 scale per {BLOCK}", 4.25, BLOCK, len(used),
                             {"modules_to_not_convert": list(skip)})
