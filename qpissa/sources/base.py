"""What every source-format reader shares: the description it returns and how it names logical tensors.

A reader turns the stored tensors of a quantized checkpoint (safetensors headers only) into the tensors a
bf16 checkpoint of the same model would have: same names, same shapes, ``dtype`` the residual's (the config's
``torch_dtype``), each with a :class:`qpissa.formats.Packed` that dequantizes it to fp32 when read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from qpissa.errors import UserError
from qpissa.formats import Packed, TensorInfo

FLOAT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class SourceFormat:
    """The published format a checkpoint came in, as the report and manifest record it."""

    name: str  # "bf16" (plain), "fp8", "mxfp4", "bnb-nf4", "bnb-fp4", "bnb-int8", "gptq", "awq", "compressed-tensors"
    detail: str = ""  # e.g. "e4m3, 128×128 blocks"
    bits: float = 16.0  # bits a stored weight (codes, without their scales)
    block: list[int] | int | None = None  # block / group size
    quantized: int = 0  # tensors stored quantized
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def four_bit(self) -> bool:
        return self.bits <= 4.5

    def record(self) -> dict[str, Any]:
        """The manifest / report entry."""
        return {"format": self.name, "detail": self.detail, "bits": self.bits, "block": self.block,
                "quantized_tensors": self.quantized, **self.extra}


def residual_dtype(config: dict) -> str:
    """Safetensors dtype name the dequantized tensors are written back in: the config's float dtype, else BF16."""
    name = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("torch_dtype")
    return FLOAT_DTYPES.get(str(name), "BF16")


def logical(name: str, parts: list[TensorInfo], shape: tuple[int, ...], dtype: str,
            decode: Callable[..., torch.Tensor]) -> TensorInfo:
    """The tensor ``name`` as a plain checkpoint holds it, read from ``parts`` (the first one's shard)."""
    return TensorInfo(name, parts[0].file, tuple(int(d) for d in shape), dtype, Packed(tuple(parts), decode))


def need(by_name: dict[str, TensorInfo], key: str, fmt: str) -> TensorInfo:
    """The companion tensor ``key`` of a quantized weight, or a one-line error naming it."""
    if key not in by_name:
        raise UserError(f"{fmt} checkpoint: tensor {key} is missing (its quantized weight is there); "
                        "re-download the checkpoint")
    return by_name[key]


def unpack_int4(words: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Eight 4-bit codes per int32 word along ``dim`` (code ``order[j]`` in bits 4j..4j+3) → uint8 codes, that
    dimension 8× longer: GPTQ packs in order 0..7, AWQ in 0,2,4,6,1,3,5,7. Works on the word's little-endian
    bytes (nibble 2k: low half of byte k), so the temporaries are one byte a code."""
    by = words.contiguous().view(torch.uint8).view(*words.shape, 4)  # (..., 4) little-endian bytes
    codes = torch.stack([by & 0xF, by >> 4], dim=-1).view(*words.shape, 8)  # (..., 8): nibble j of each word
    if order != tuple(range(8)):
        codes = codes[..., [order.index(k) for k in range(8)]]  # logical code k sits in nibble order.index(k)
    dim %= words.dim()
    codes = codes.movedim(-1, dim + 1)  # the 8 codes of a word right after the packed dimension
    shape = list(words.shape)
    shape[dim] *= 8
    return codes.reshape(shape)
