"""Checkpoints as published — bf16, FP8, MXFP4, bitsandbytes, GPTQ, AWQ, compressed-tensors — read as plain tensors.

:func:`open_source` is the one place that looks at ``config.json``'s ``quantization_config``: it picks the
reader of that format (one module each), which turns the stored tensors into those a bf16 checkpoint of the
model would hold (same names and shapes, each dequantized to fp32 when :func:`qpissa.formats.load_tensor`
reads it, one tensor at a time). decompose, plan, merge and train read sources through it and never branch
on formats. A format not listed here is refused in one line (see docs/sources.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qpissa.errors import UserError
from qpissa.formats import TensorInfo, scan_checkpoint
from qpissa.sources import bnb, compressed, fp8, gptq, mxfp4
from qpissa.sources.base import SourceFormat, residual_dtype

FLOATS = ("F64", "F32", "F16", "BF16")
Reader = Callable[[list[TensorInfo], dict, str], "tuple[list[TensorInfo], SourceFormat]"]
READERS: dict[str, Reader] = {"fp8": fp8.read, "mxfp4": mxfp4.read, "bitsandbytes": bnb.read, "gptq": gptq.read,
                              "awq": gptq.read, "compressed-tensors": compressed.read}  # quant_method → reader


@dataclass(frozen=True)
class Source:
    """A checkpoint folder read as plain tensors."""

    path: Path
    format: SourceFormat
    tensors: list[TensorInfo]  # logical: quantized ones carry a Packed decoder
    stored: list[TensorInfo]  # as on disk (for download sizes)

    @property
    def quantized(self) -> bool:
        return self.format.name != "plain"


def quantization_of(model_dir: Path) -> dict | None:
    """``config.json``'s ``quantization_config`` (None when absent or the config is missing)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")


def open_source(model_dir: str | Path) -> Source:
    """The checkpoint at ``model_dir`` through the reader its ``quantization_config`` names."""
    model_dir = Path(model_dir)
    stored = scan_checkpoint(model_dir)
    path = model_dir / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    qcfg = quantization_of(model_dir)
    if not qcfg:
        return Source(model_dir, _plain(stored), stored, stored)
    method = str(qcfg.get("quant_method", "")).lower()
    if method not in READERS:
        raise UserError(f"{path}: quantization {method!r} is not read (known: {', '.join(sorted(READERS))}); "
                        "use a bf16 release or one of those formats")
    tensors, fmt = READERS[method](stored, qcfg, residual_dtype(config))
    left = [t for t in tensors if t.packed is None and t.name.endswith("weight") and t.dtype not in FLOATS]
    if left:  # codes this reader did not recognise: refuse rather than decompose the raw integers
        raise UserError(f"{path}: {method} tensor {left[0].name} is stored as {left[0].dtype} in a layout this reader "
                        "does not decode (see docs/sources.md for the layouts read); use a bf16 release")
    return Source(model_dir, fmt, tensors, stored)


def scan_source(model_dir: str | Path) -> list[TensorInfo]:
    """:func:`qpissa.formats.scan_checkpoint` for a source model: its tensors as a bf16 checkpoint holds them."""
    return open_source(model_dir).tensors


def _plain(stored: list[TensorInfo]) -> SourceFormat:
    kinds = sorted({t.dtype for t in stored if t.dtype in ("BF16", "F16", "F32")})
    return SourceFormat("plain", "/".join(k.lower() for k in kinds), 16.0 if kinds != ["F32"] else 32.0)
