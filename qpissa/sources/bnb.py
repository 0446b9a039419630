"""bitsandbytes checkpoints (``quant_method: bitsandbytes``): 4-bit NF4 / FP4 and LLM.int8().

4-bit, stored as transformers serializes ``Linear4bit``: ``X.weight`` packed uint8 (two codes a byte, high
nibble first) + ``X.weight.absmax``, ``X.weight.quant_map`` (the 16 levels: NF4 or bitsandbytes' FP4), with
double quant also ``X.weight.nested_absmax`` / ``nested_quant_map``, and the JSON quant state
``X.weight.quant_state.bitsandbytes__nf4|fp4``. Decoded: W = quant_map[code] · absmax[block] in fp32 (the
nested absmax first undone by bitsandbytes' ``dequantize_blockwise`` + offset), the arithmetic of
bitsandbytes' ``dequantize_4bit`` (:func:`qpissa.quant.dequantize_nf4`). This is the layout of OUT/residual.

8-bit, stored as ``Linear8bitLt``: ``X.weight`` int8 (m, n) + ``X.SCB`` float32 (m,) row absmax. Decoded:
W = q · SCB[row] · (1/127) in fp32, bitsandbytes' ``int8_vectorwise_dequant``.
"""
from __future__ import annotations

import functools
import json

import torch

from qpissa.errors import UserError
from qpissa.formats import TensorInfo, load_tensor
from qpissa.sources.base import SourceFormat, logical, need

STATE = ".quant_state.bitsandbytes__"
COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
INT8_SCALE = 7.874015718698502e-3  # 1/127 as bitsandbytes writes it


def dequantize_4bit(packed: torch.Tensor, *state: torch.Tensor, keys: tuple[str, ...]) -> torch.Tensor:
    """fp32 weight from the packed bytes and the quant-state tensors named by ``keys``."""
    from bitsandbytes.functional import QuantState

    from qpissa.quant import NF4Tensor, dequantize_nf4

    qs = QuantState.from_dict(dict(zip(keys, state)), device=packed.device)
    return dequantize_nf4(NF4Tensor(packed, qs))


def dequantize_int8(q: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """fp32 q · SCB[row] / 127, the product order of bitsandbytes' ``int8_vectorwise_dequant``."""
    return q * scb.float().view(-1, *([1] * (q.dim() - 1))) * INT8_SCALE


def _read_4bit(info: TensorInfo, state: TensorInfo, by_name: dict[str, TensorInfo], dtype: str):
    meta = json.loads(bytes(load_tensor(state).tolist()).decode("utf-8"))
    keys = [k for k in COMPANIONS if f"{info.name}.{k}" in by_name]
    parts = [info] + [by_name[f"{info.name}.{k}"] for k in keys] + [state]
    names = tuple(keys) + (state.name.removeprefix(info.name + "."),)
    decode = functools.partial(dequantize_4bit, keys=names)
    return logical(info.name, parts, tuple(meta["shape"]), dtype, decode), meta, [p.name for p in parts[1:]]


def read(infos: list[TensorInfo], qcfg: dict, dtype: str) -> tuple[list[TensorInfo], SourceFormat]:
    """Logical tensors of a bitsandbytes checkpoint and its description."""
    by_name = {i.name: i for i in infos}
    out, used, metas, int8 = [], set(), [], 0
    for info in infos:
        if info.name in used:
            continue
        state = next((by_name[info.name + STATE + t] for t in ("nf4", "fp4") if info.name + STATE + t in by_name), None)
        if state is not None:
            tensor, meta, companions = _read_4bit(info, state, by_name, dtype)
            out.append(tensor)
            metas.append(meta)
            used.update(companions)
        elif info.dtype == "I8" and info.name.endswith(".weight") and \
                info.name.removesuffix("weight") + "SCB" in by_name:
            scb = need(by_name, info.name.removesuffix("weight") + "SCB", "bitsandbytes 8-bit")
            used.add(scb.name)
            int8 += 1
            out.append(logical(info.name, [info, scb], info.shape, dtype, dequantize_int8))
        elif not info.name.endswith(".weight_format"):
            out.append(info)
    out = [i for i in out if i.name not in used]
    if metas:
        kinds = sorted({m.get("quant_type", "nf4") for m in metas})
        if len(kinds) > 1:
            raise UserError(f"bitsandbytes checkpoint mixes 4-bit types {kinds}; convert it to one")
        sizes = sorted({int(m["blocksize"]) for m in metas})
        nested = any("nested_blocksize" in m for m in metas)
        detail = f"{kinds[0]}, blocks of {'/'.join(map(str, sizes))}" + (", double quant" if nested else "")
        return out, SourceFormat(f"bnb-{kinds[0]}", detail, 4.0, sizes[0], len(metas), {"double_quant": nested})
    return out, SourceFormat("bnb-int8", "int8 codes, one absmax a row", 8.0, None, int8)
