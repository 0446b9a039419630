"""What a published checkpoint costs to fetch and to decompose, from its ``quantization_config`` (``plan``).

Download: the tensors the format stores quantized (every linear inside the blocks; MXFP4: the MoE experts
only, as gpt-oss ships) at the format's bytes per weight — codes plus their scales — and everything else
at the config's dtype. A model folder with safetensors files gives the exact size instead (their bytes).

Bytes per stored weight: FP8 1 + 4/(bm·bn) (fp32 scale a block); MXFP4 0.5 + 1/32 (e8m0 a 32-block);
bitsandbytes 4-bit 0.5 + 4/blocksize (fp32 absmax; double quant: 1/blocksize + a 256-block's fp32), int8 1;
GPTQ / AWQ / compressed-tensors w4a16 0.5 + 2/group (fp16 scale) + 0.5/group (4-bit zero).

Decompose peak: decompose decodes one tensor at a time (an MoE stack: one expert) to fp32 before
decomposing it, so the decode adds its temporaries to the largest such tensor; ``DECODE_BYTES_PER_WEIGHT``
is the peak of each decoder above its inputs, measured with ``benchmarks/source_decode_peak.py``.
"""
from __future__ import annotations

from pathlib import Path

from qpissa.plan.model_shapes import ModelShapes

BF16 = {"bfloat16": 2, "float16": 2, "float32": 4}
# `python benchmarks/source_decode_peak.py` (4096×4096, one thread; the fp32 result's 4 bytes included; MXFP4: one
# expert's slice; bitsandbytes: NF4 blocks of 64), rounded up
DECODE_BYTES_PER_WEIGHT = {"fp8": 4.1, "mxfp4": 12.8, "bitsandbytes": 6.1, "gptq": 10.4, "awq": 10.4,
                           "compressed-tensors": 8.4}


def stored_bytes_per_weight(qcfg: dict) -> tuple[str, float]:
    """(label, bytes a stored weight) of a ``quantization_config``."""
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "fp8":
        bm, bn = qcfg.get("weight_block_size") or (0, 0)
        return f"fp8 {bm}×{bn} blocks", 1 + (4 / (bm * bn) if bm else 0)
    if method == "mxfp4":
        return "mxfp4 experts", 0.5 + 1 / 32
    if method == "bitsandbytes":
        if qcfg.get("load_in_8bit"):
            return "bitsandbytes int8", 1.0
        block = 64
        extra = (1 / block + 4 / (block * 256)) if qcfg.get("bnb_4bit_use_double_quant") else 4 / block
        return f"bitsandbytes {qcfg.get('bnb_4bit_quant_type', 'nf4')}", 0.5 + extra
    group = int(qcfg.get("group_size") or qcfg.get("q_group_size") or 128)
    if method == "compressed-tensors":
        groups = [g.get("weights") or {} for g in (qcfg.get("config_groups") or {}).values()]
        args = groups[0] if groups else {}
        group = int(args.get("group_size") or 128)
        if args.get("type") == "float":
            return "compressed-tensors fp8", 1.0
    return f"{method} groups of {group}", 0.5 + 2.5 / group


def source_plan(config: dict, shapes: ModelShapes, model: str | None = None) -> dict | None:
    """Download bytes and decode peak of the source format (None for a plain checkpoint)."""
    qcfg = config.get("quantization_config")
    if not qcfg:
        return None
    method = str(qcfg.get("quant_method", "")).lower()
    label, per_weight = stored_bytes_per_weight(qcfg)
    plain = BF16.get(shapes.dtype, 2)
    stored = [p for p in shapes.params if p.kind == "linear" and p.group != "other"
              and (method != "mxfp4" or ".experts." in p.name)]
    quantized = sum(p.numel * p.count for p in stored)
    download = int(quantized * per_weight + (shapes.n_params - quantized) * plain)
    exact = _files_bytes(model)
    largest = max((p.numel for p in stored), default=0)  # MoE rows are one expert's matrix
    return {"format": label, "quantized_weights": quantized, "download_bytes": exact or download,
            "download_exact": exact is not None,
            "decode_peak_bytes": int(DECODE_BYTES_PER_WEIGHT.get(method, 20.0) * largest), "largest_decoded": largest}


def _files_bytes(model: str | None) -> int | None:
    if model is None or not Path(model).is_dir():
        return None
    files = list(Path(model).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None
