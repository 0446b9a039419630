"""Merge a residual model and a LoRA/PiSSA adapter into one standalone checkpoint, tensor by tensor.

For every adapted module: W_merged = deq(R) + s·B·A (fp32; s = α/r or α/√r with rsLoRA, per-module
patterns as PEFT applies them; Conv1D layouts get the transpose), where deq(R) is the bitsandbytes
dequantization of an NF4 residual (exactly what ``Linear4bit`` multiplies with) or the plain residual.
All other tensors are copied (floating ones cast to ``dtype``). RESIDUAL may also be a published quantized
checkpoint (FP8, MXFP4, GPTQ, AWQ, compressed-tensors, bitsandbytes FP4/int8) with a LoRA trained on it
(``train --method lora``): its tensors are decoded by :mod:`qpissa.sources` as they are read.

``quantize="nf4"`` re-quantizes the merged weights with bitsandbytes NF4 (each tensor with the block size
and double-quant setting its residual had; 64 / none for a plain residual) into the pre-quantized format
transformers loads. That adds an error the adapter never saw in training; per module we report
‖W_merged − deq(NF4(W_merged))‖_F next to ‖s·B·A‖_F — when the first is comparable to the second, the
re-quantization rounds away much of what fine-tuning changed (QLoRA's caveat; Dettmers et al. 2023).
For a PiSSA adapter s·B·A still holds the principal components; pass the initial adapter (``init_adapter``)
to also report what training changed, ‖s·(B·A − B₀·A₀)‖_F, which is the fair comparison.
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from qpissa.adapters import module_scale, read_adapter
from qpissa.atomic import Output, output_folder, size_of, write_json
from qpissa.choices import check_choices
from qpissa.devices import resolve_device
from qpissa.errors import UserError
from qpissa.hub import REVISION_HELP, resolve_model
from qpissa.formats import (TensorInfo, byte_size, copy_side_files, entry_of, is_within, load_tensor, weight_key,
                            scan_checkpoint, write_index, write_safetensors)
from qpissa.sources import scan_source
from qpissa.sources.bnb import dequantize_4bit
from qpissa.moe import CONFIG_KEY
from qpissa.use.merge_experts import ExpertMerge
from qpissa.quant import NF4Spec, dequantize_nf4, quantization_config, quantize_nf4

MergeDType = Literal["bfloat16", "float16", "float32"]
Quantize = Literal["none", "nf4"]
QS_KEY = ".quant_state.bitsandbytes__nf4"
NF4_COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


@dataclass
class MergeConfig:
    dtype: MergeDType = field(default="bfloat16", metadata={"help": "bfloat16 | float16 | float32"})
    quantize: Quantize = field(default="none", metadata={"help": "none | nf4 (re-quantize merged weights; extra error reported)"})
    shard_size: int = field(default=4 * 2**30, metadata={"help": "bytes per output shard"})
    overwrite: bool = field(default=False, metadata={"help": "replace a model already in --output"})
    init_adapter: str | None = field(default=None, metadata={"help": "initial adapter: also report what training changed"})
    device: str = field(default="cpu", metadata={"help": "where to compute: auto | cpu | cuda (auto: cuda when available)"})
    revision: str | None = field(default=None, metadata={"help": REVISION_HELP + " (RESIDUAL)"})

    def __post_init__(self) -> None:
        check_choices(self)


def read_nf4(weight: TensorInfo, by_name: dict[str, TensorInfo], device: str = "cpu") -> torch.Tensor:
    """Dequantize one serialized bitsandbytes NF4 weight (packed bytes + companions) to fp32 (m×n) on ``device``."""
    keys = tuple(s for s in NF4_COMPANIONS if f"{weight.name}.{s}" in by_name)
    return dequantize_4bit(load_tensor(weight).to(device), *(load_tensor(by_name[f"{weight.name}.{s}"]) for s in keys),
                           keys=keys)  # (m, n)


def _nf4_spec_of(weight: TensorInfo, by_name: dict[str, TensorInfo]) -> NF4Spec:
    from bitsandbytes.functional import unpack_tensor_to_dict

    meta = unpack_tensor_to_dict(load_tensor(by_name[weight.name + QS_KEY]))
    return NF4Spec(blocksize=int(meta["blocksize"]), double_quant=f"{weight.name}.nested_absmax" in by_name)


def _weight_key(module: str, by_name: dict[str, TensorInfo], renamed: Callable[[], dict[str, str]]) -> str:
    """Checkpoint key of ``module.weight`` (see :func:`qpissa.formats.weight_key`), else of the tensor transformers
    renames to it (Hunyuan-V3's ``shared_experts`` on disk), or one line saying why not."""
    key = weight_key(module, by_name)
    if key is None:
        key = renamed().get(weight_key(module, renamed()) or "")
    if key is None:
        raise UserError(f"adapter module {module}: no unique weight {module}.weight in the residual checkpoint; "
                        "is ADAPTER for this RESIDUAL?")
    return key


@functools.lru_cache(maxsize=1)
def _cached_names(residual: Path, names: tuple[str, ...]) -> dict[str, str]:
    from qpissa.decompose.roles import checkpoint_map

    return {new: old for old, (new, expert, _) in checkpoint_map(residual, list(names)).items()
            if expert is None and new != old}


def _model_names(residual: Path, by_name: dict[str, TensorInfo]) -> dict[str, str]:
    """Model name → checkpoint name of the tensors the family's conversion mapping renames (read once a merge)."""
    try:
        return _cached_names(residual, tuple(by_name))
    except (UserError, ImportError, ValueError, KeyError, AttributeError):  # no model class for it: no renaming known
        return {}


def merge(residual_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
          cfg: MergeConfig = MergeConfig(), progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``out_dir``: a plain HF model = residual + adapter (see module docstring); returns the report.
    A failure (a full disk, Ctrl-C) removes what it wrote there: a half model is never left behind."""
    with output_folder(out_dir) as guard:
        return _merge(residual_dir, adapter_dir, out_dir, cfg, progress, guard)


def _merge(residual_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, cfg: MergeConfig,
           progress: Callable[[str], None] | None, guard: Output) -> dict[str, Any]:
    residual, out = resolve_model(residual_dir, cfg.revision), Path(out_dir)  # a folder, or a Hub id org/name
    for src in (residual, Path(adapter_dir)):
        if is_within(out, src) or is_within(src, out):
            raise UserError(f"--output {out} overlaps input {src}; choose a new directory")
    if (out / "config.json").exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds a model; pass --overwrite or choose a new directory")
    if not (residual / "config.json").exists():
        raise UserError(f"{residual}: no config.json; RESIDUAL must be a HF model dir (e.g. OUT/residual)")
    device = resolve_device(cfg.device)
    adapter = read_adapter(adapter_dir)
    config = json.loads((residual / "config.json").read_text())
    qcfg = config.get("quantization_config") or {}
    nf4_residual = bool(qcfg.get("load_in_4bit") and qcfg.get("bnb_4bit_quant_type") == "nf4")
    nf4_experts = (config.get(CONFIG_KEY) or {}).get("file")  # experts: ExpertMerge writes them
    infos = [i for i in (scan_checkpoint(residual) if not qcfg or nf4_residual else scan_source(residual))  # others: decoded
             if i.file.name != nf4_experts]
    by_name = {i.name: i for i in infos}
    experts = ExpertMerge(adapter, residual, config, by_name)  # takes the MoE expert factors out of ``adapter``
    if adapter.extra:
        raise UserError(f"{adapter.path}: extra tensors {sorted(adapter.extra)[:2]} (modules_to_save?) "
                        "cannot be merged; only LoRA factors are supported")
    init = read_adapter(cfg.init_adapter).factors if cfg.init_adapter else {}
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    deltas = {_weight_key(m, by_name, functools.partial(_model_names, residual, by_name)): m for m in adapter.factors}
    dtype = getattr(torch, cfg.dtype)
    companion = {f"{n}.{s}" for n in by_name if n + QS_KEY in by_name for s in NF4_COMPANIONS}
    quantized_in = {n for n in by_name if n + QS_KEY in by_name}
    requant = set(deltas) if cfg.quantize == "nf4" else set()  # untouched NF4 tensors are copied byte for byte

    stats: list[dict[str, Any]] = []
    out_tensors: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()

    def produce(name: str) -> dict[str, torch.Tensor]:
        if name in experts:  # an MoE expert matrix (qpissa.use.merge_experts)
            return {name: experts.produce(name, device).to(dtype).cpu()}
        info = by_name[name]
        if cfg.quantize == "nf4" and name in quantized_in and name not in deltas:  # untouched NF4: copy its bytes
            keys = [name] + [k for k in (f"{name}.{s}" for s in NF4_COMPANIONS) if k in by_name]
            return {k: load_tensor(by_name[k]) for k in keys}
        if name in quantized_in:
            w = read_nf4(info, by_name, device)  # (m, n) fp32
        else:
            w = load_tensor(info)
        if name in deltas or name in requant:
            w = w.to(device)
        if name in deltas:
            module = deltas[name]
            a, b = (f.to(device) for f in adapter.factors[module])  # (r, n), (m, r)
            delta = module_scale(adapter.config, module) * (b.float() @ a.float())  # (m, n)
            if fan_in_fan_out:
                delta = delta.T  # Conv1D stores (n, m)
            if delta.shape != w.shape:
                raise UserError(f"{module}: adapter delta {tuple(delta.shape)} vs residual weight {tuple(w.shape)}; "
                                "is ADAPTER for this RESIDUAL?")
            w = w.float() + delta
            row = {"module": module, "adapter_fro": float(delta.norm())}
            if module in init:
                a0, b0 = (f.to(device) for f in init[module])  # (r, n), (m, r)
                d0 = module_scale(adapter.config, module) * (b0.float() @ a0.float())  # (m, n)
                row["finetune_delta_fro"] = float((delta - (d0.T if fan_in_fan_out else d0)).norm())
        else:
            row = None
        if name in requant:
            spec = _nf4_spec_of(info, by_name) if name in quantized_in else NF4Spec()
            q = quantize_nf4(w, spec)
            err = w.float() - dequantize_nf4(q)  # (m, n)
            stats.append({**(row or {"module": name.removesuffix(".weight"), "adapter_fro": 0.0}),
                          "weight_fro": float(w.float().norm()), "requant_error_fro": float(err.norm())})
            return q.serialized(name)
        if row is not None:
            stats.append({**row, "weight_fro": float(w.norm())})
        return {name: (w.to(dtype) if w.is_floating_point() else w).cpu()}

    names = [n for n in by_name if n not in companion] + list(experts.new)
    by_name.update({n: TensorInfo(n, residual, shape, "F32") for n, shape in experts.new.items()})
    shards: list[list[str]] = [[]]
    size = planned = 0
    for name in names:  # plan shards from shapes alone (the NF4 companions are small; counted as packed bytes)
        info = by_name[name]
        numel = math.prod(info.shape) * (2 if name in quantized_in else 1)  # packed NF4: 2 weights a byte
        nbytes = numel // 2 if (name in requant or name in quantized_in and cfg.quantize == "nf4") \
            else byte_size((numel,), dtype)
        if shards[-1] and size + nbytes > cfg.shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
        planned += nbytes
    guard.needs = lambda: max(0, planned - size_of(out))
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        out_tensors.clear()
        for name in shard:  # one shard in memory at a time
            if progress is not None:
                progress(name)
            out_tensors.update(produce(name))
        write_safetensors(out / fname, [entry_of(k, v) for k, v in out_tensors.items()], out_tensors.__getitem__)
        for k, v in out_tensors.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    out_tensors.clear()
    if len(shards) > 1:
        write_index(out, weight_map, total)
    copy_side_files(residual, out)
    config.pop("quantization_config", None)
    config.pop(CONFIG_KEY, None)
    config["dtype"] = config["torch_dtype"] = cfg.dtype
    if cfg.quantize == "nf4":
        qc = dict(qcfg) if nf4_residual else quantization_config(NF4Spec(compute_dtype=cfg.dtype), _skip_modules(residual, deltas))
        config["quantization_config"] = qc
    write_json(out / "config.json", config)

    report = _report(stats, cfg, residual, Path(adapter_dir), out, time.perf_counter() - t0)
    write_json(out / "merge_report.json", report)
    return report


def _skip_modules(residual: Path, deltas: dict[str, str]) -> list[str]:
    """Linear modules that stay full precision when only the adapted ones are NF4 (as ``decompose`` writes)."""
    from qpissa.decompose.targets import linear_modules

    linears, _, _ = linear_modules(residual)
    adapted = set(deltas.values())
    return sorted(m for m in linears if m not in adapted)


def _report(stats: list[dict[str, Any]], cfg: MergeConfig, residual: Path, adapter: Path, out: Path,
            seconds: float) -> dict[str, Any]:
    """Totals (root of summed squares) of ‖s·B·A‖, ‖s·(BA − B₀A₀)‖ and the NF4 re-quantization error."""
    def total(key: str) -> float | None:
        vals = [s[key] for s in stats if key in s]
        return math.sqrt(sum(v * v for v in vals)) if vals else None

    report: dict[str, Any] = {
        "residual": str(residual), "adapter": str(adapter), "init_adapter": cfg.init_adapter, "output": str(out),
        "dtype": cfg.dtype, "quantize": cfg.quantize, "merged_modules": sum(1 for s in stats if s["adapter_fro"] > 0),
        "seconds": round(seconds, 3), "adapter_fro_total": total("adapter_fro"),
        "finetune_delta_fro_total": total("finetune_delta_fro")}
    if cfg.quantize == "nf4":
        err, weight, ft = total("requant_error_fro"), total("weight_fro"), report["finetune_delta_fro_total"]
        ratio = err / ft if ft else None
        report.update({"requant_error_fro_total": err, "requant_error_relative": err / weight if weight else 0.0,
                       "requant_error_over_finetune_delta": ratio})
        if ratio is not None and ratio > 1:
            report["warning"] = (f"re-quantizing to NF4 moved the weights {ratio:.3g}× as far as fine-tuning did "
                                 "(‖requant error‖ / ‖s·(BA − B₀A₀)‖, Frobenius); the NF4 merge erases the "
                                 "fine-tuning: keep the adapter on the residual, or merge without --quantize")
    report["modules"] = stats
    return report
