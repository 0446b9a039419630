"""Reading HF checkpoints tensor by tensor, and writing safetensors shards (adapter dirs: :mod:`qpissa.adapters`).

The safetensors writer streams: it writes the header from shapes alone, then each tensor's
bytes one at a time, so assembling a shard never holds more than one tensor in memory.
Format: 8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}},
then the concatenated little-endian tensor bytes (https://github.com/huggingface/safetensors).
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open

from qpissa.atomic import atomic_path, write_json
from qpissa.errors import UserError

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor lives, known without reading its data."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16"
    packed: "Packed | None" = field(default=None, compare=False)  # a quantized source's tensor: how to decode it


@dataclass(frozen=True)
class Packed:
    """A tensor stored quantized (FP8 + scales, MXFP4 blocks, GPTQ words, …): ``decode(*parts)`` → fp32.

    The readers in :mod:`qpissa.sources` build these; :func:`load_tensor` runs them, so the code that reads a
    checkpoint never branches on the format it was published in.
    """

    parts: tuple[TensorInfo, ...]  # the stored tensors, read raw and passed to decode in this order
    decode: Callable[..., torch.Tensor]


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a HF checkpoint dir, in index order (or sorted)."""
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise UserError(f"{index}: not a valid safetensors index ({err}); re-download the checkpoint") from None
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise UserError(f"{index} names missing shard {missing[0]}; re-download the checkpoint")
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no *.safetensors files; convert the checkpoint to safetensors first")
    return files


def scan_checkpoint(model_dir: Path) -> list[TensorInfo]:
    """Names, shapes and dtypes of every tensor, reading only the safetensors headers."""
    infos: list[TensorInfo] = []
    for path in checkpoint_files(model_dir):
        header = read_header(path)
        for name, entry in header.items():
            if name != "__metadata__":
                infos.append(TensorInfo(name, path, tuple(entry["shape"]), entry["dtype"]))
    return infos


def read_header(path: Path) -> dict:
    """Parse and validate a safetensors header; a truncated or corrupt file is a UserError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError("header length exceeds the file size")
            header = json.loads(fh.read(n))
        end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"data ends at byte {8 + n + end} but the file has {size}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: corrupt or truncated safetensors file ({err}); re-download it") from None
    return header


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """Read exactly one tensor from its shard (a quantized source's tensor: its parts, dequantized to fp32)."""
    if info.packed is not None:
        return info.packed.decode(*(load_tensor(p) for p in info.packed.parts))
    try:
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(info.name)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{info.file}: cannot read tensor {info.name} ({err}); re-download the checkpoint") from None


def load_index(info: TensorInfo, index: int) -> torch.Tensor:
    """``tensor[index]`` along the first dim (one expert of a fused stack), reading only that slice; a packed
    tensor decodes the same slice of each of its parts (MXFP4 blocks/scales, FP8 weight/scales share dim 0)."""
    if info.packed is not None:
        return info.packed.decode(*(load_index(p, index)[None] for p in info.packed.parts))[0]
    try:
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_slice(info.name)[index]
    except (SafetensorError, OSError) as err:
        raise UserError(f"{info.file}: cannot read tensor {info.name} ({err}); re-download the checkpoint") from None


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """The tensor's little-endian bytes without a copy when already contiguous on the CPU (bf16 too, through a
    uint8 view): writing a shard then holds each tensor once, not twice as ``bytes`` would."""
    return memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(
    dest: Path,
    entries: Iterable[tuple[str, str, tuple[int, ...], int]],
    fetch: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    durable: bool = True,
) -> None:
    """Stream a safetensors file: ``entries`` = (name, dtype, shape, nbytes); ``fetch(name)`` gives data.

    Tensors are sorted by name so the file is byte-identical for identical inputs. ``durable=False`` skips
    the fsync (for files a checksum guards, such as decompose's parts).
    """
    entries = sorted(entries)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_path(dest, durable=durable) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, _, _, nbytes in entries:
            data = tensor_buffer(fetch(name))
            if data.nbytes != nbytes:
                raise RuntimeError(f"{name}: expected {nbytes} bytes, got {data.nbytes}")
            fh.write(data)


def entry_of(name: str, t: torch.Tensor) -> tuple[str, str, tuple[int, ...], int]:
    return name, DTYPE_NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size()


def save_tensors(dest: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 durable: bool = True) -> None:
    """Write an in-memory dict of (small) tensors atomically and deterministically."""
    write_safetensors(dest, [entry_of(k, v) for k, v in tensors.items()], tensors.__getitem__, metadata, durable)


def write_index(dest_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    """HF sharded-checkpoint index: {metadata: {total_size}, weight_map: {tensor: shard}}."""
    write_json(dest_dir / INDEX_NAME, {"metadata": {"total_size": total_size},
                                       "weight_map": dict(sorted(weight_map.items()))})


def copy_side_files(src: Path, dest: Path) -> list[str]:
    """Copy config/tokenizer/etc. files (everything top-level that is not weights) unchanged."""
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != INDEX_NAME \
                and not path.name.startswith("."):
            with atomic_path(dest / path.name) as tmp:
                tmp.write_bytes(path.read_bytes())
            copied.append(path.name)
    for folder in referenced_folders(src):  # e.g. sentence-transformers' 1_Pooling/ (named in modules.json)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(src)
            with atomic_path(dest / rel) as tmp:
                tmp.write_bytes(path.read_bytes())
            copied.append(rel.as_posix())
    return copied


def referenced_folders(src: Path) -> list[Path]:
    """Sub-folders of ``src`` that its ``modules.json`` (sentence-transformers) points at and that exist."""
    modules = src / "modules.json"
    if not modules.is_file():
        return []
    try:
        entries = json.loads(modules.read_text())
    except json.JSONDecodeError:
        return []
    found = []
    for entry in entries if isinstance(entries, list) else []:
        rel = entry.get("path") if isinstance(entry, dict) else None
        folder = src / rel if rel else None
        if folder is not None and folder.is_dir() and is_within(folder, src) and folder.resolve() != src.resolve():
            found.append(folder)
    return found


def byte_size(shape: Iterable[int], dtype: str | torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype`` (a safetensors name such as "BF16", or a torch dtype)."""
    return math.prod(shape) * ITEMSIZE[dtype if isinstance(dtype, str) else DTYPE_NAMES[dtype]]


def weight_key(module: str, names: Iterable[str]) -> str | None:
    """The checkpoint key of ``module.weight`` among ``names``, tolerating a base-model prefix on either side
    (e.g. BERT's ``bert.``); None unless exactly one matches."""
    key = f"{module}.weight"
    names = names if isinstance(names, (dict, set, frozenset)) else set(names)
    if key in names:
        return key
    hits = [n for n in names if n.endswith("." + key) or key.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


def is_within(child: Path, parent: Path) -> bool:
    """True when ``child`` equals ``parent`` or lies inside it (after resolving links)."""
    child, parent = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return child == parent or parent in child.parents
