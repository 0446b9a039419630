"""Final outputs from the per-tensor parts: residual shards (one per input shard), adapter dir, config."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qpissa.atomic import write_json
from qpissa.decompose.config import DecomposeConfig
from qpissa.decompose.allocation import scale_alpha
from qpissa.decompose.methods import QUANTIZED_METHODS, adapter_scale
from qpissa.decompose.expert_rank import adapter_patterns, expert_rank
from qpissa.decompose.experts import ExpertTarget, peft_factors, target_parameters
from qpissa.decompose.roles import expert_order
from qpissa.decompose.targets import Target
from qpissa.adapters import adapter_config, adapter_key
from qpissa.formats import (TensorInfo, copy_side_files, load_tensor, byte_size, save_tensors, write_index,
                            write_safetensors)
from qpissa.quant import head_skip_modules, quantization_config
from qpissa.moe import CONFIG_KEY, NF4_EXPERTS_FILE


def part_name(index: int) -> str:
    """File name of target ``index``'s part in OUT/.parts/ (the same for one process or several)."""
    return f"{index:05d}.safetensors"


def assemble(model_dir: Path, out_dir: Path, tensors: list[TensorInfo], targets: list[Target],
              others: list[str], cfg: DecomposeConfig, task: str | None, ranks: dict[str, int] | None = None) -> None:
    """Stream residual shards (one per input shard) and the adapter from the parts; ``ranks`` (per-module
    ranks of ``--rank-allocation error``) become PEFT's ``rank_pattern``, with the ``alpha_pattern`` that keeps
    every module's scale s = α/r (α/√r with rsLoRA) that of the uniform run."""
    from safetensors import safe_open

    residual_dir, adapter_dir = out_dir / "residual", out_dir / "adapter"
    part_of: dict[str, list[Path]] = {}  # checkpoint tensor → the parts holding it (an expert stack: one per expert)
    for i, t in enumerate(targets):
        for source in getattr(t, "sources", (t.weight,)):
            part_of.setdefault(source.name, []).append(out_dir / ".parts" / part_name(i))
    written: set[Path] = set()
    nf4_experts = cfg.experts_dtype == "nf4" and cfg.method in QUANTIZED_METHODS
    expert_parts = {out_dir / ".parts" / part_name(i) for i, t in enumerate(targets) if isinstance(t, ExpertTarget)}
    expert_entries: list[tuple] = []  # NF4 experts: their own file, which transformers does not read
    expert_sources: dict[str, tuple[Path, str]] = {}  # gathered over every input shard
    weight_map: dict[str, str] = {}
    total = 0
    shards = list(dict.fromkeys(t.file for t in tensors))
    for shard in shards:
        entries, sources = [], {}
        for info in (t for t in tensors if t.file == shard):
            parts = part_of.get(info.name)
            if parts is None:  # a non-target: copied, or dequantized to the residual's dtype (quantized sources)
                entries.append((info.name, info.dtype, info.shape, byte_size(info.shape, info.dtype)))
                sources[info.name] = (shard, info.name) if info.packed is None else info
                continue
            for part in (p for p in parts if p not in written):  # an expert's gate and up share one part
                written.add(part)
                for key, entry in _part_entries(part):
                    if nf4_experts and part in expert_parts:
                        expert_entries.append(entry)
                        expert_sources[key] = (part, key)
                    else:
                        entries.append(entry)
                        sources[key] = (part, key)
        write_safetensors(residual_dir / shard.name, entries, lambda k: _read_source(sources[k]))
        for name, _, _, nbytes in entries:
            weight_map[name] = shard.name
            total += nbytes
    if expert_entries:
        write_safetensors(residual_dir / NF4_EXPERTS_FILE, expert_entries, lambda k: _read(*expert_sources[k]))
    if len(shards) > 1:
        write_index(residual_dir, weight_map, total)
    copy_side_files(model_dir, residual_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)  # the source's own format (FP8, MXFP4, …): the residual is not in it
    if cfg.method in QUANTIZED_METHODS:
        heads = [h for h in head_skip_modules([t.module for t in targets]) if h not in others]
        config["quantization_config"] = quantization_config(cfg.spec(), sorted(others) + heads)
    experts = [t for t in targets if isinstance(t, ExpertTarget)]
    if experts and cfg.experts_dtype == "nf4" and cfg.method in QUANTIZED_METHODS:  # qpissa.moe.load reads them
        config[CONFIG_KEY] = {"file": NF4_EXPERTS_FILE, "parameters": target_parameters(experts),
                                        "blocksize": cfg.blocksize,
                                        "double_quant": cfg.double_quant}
    write_json(residual_dir / "config.json", config)
    adapter, expert_factors = {}, {}
    for i, t in enumerate(targets):
        with safe_open(str(out_dir / ".parts" / part_name(i)), framework="pt") as f:
            a, b = f.get_tensor("__lora_A__"), f.get_tensor("__lora_B__")
        if isinstance(t, ExpertTarget):
            expert_factors[t.module] = (a, b)
        else:
            adapter[adapter_key(t.module, "lora_A")], adapter[adapter_key(t.module, "lora_B")] = a, b
    tuned = experts if expert_rank(cfg) else []  # --expert-rank 0: NF4 experts with no adapter
    adapter.update(peft_factors(tuned, expert_factors, expert_order(model_dir) if tuned else None))
    save_tensors(adapter_dir / "adapter_model.safetensors", adapter)
    alpha = float(cfg.rank if cfg.alpha is None else cfg.alpha)
    patterns = {}
    if ranks is not None:
        scale = adapter_scale(cfg.rank, cfg.alpha, cfg.rslora)
        patterns = {"rank_pattern": {t.module: ranks[t.module] for t in targets},
                    "alpha_pattern": {t.module: scale_alpha(ranks[t.module], scale, cfg.rslora) for t in targets}}
    patterns.update(adapter_patterns(cfg, sorted({f"{t.experts_module}.{t.kind}" for t in tuned})))  # --expert-rank
    write_json(adapter_dir / "adapter_config.json", adapter_config(
        base_model=str(residual_dir.resolve()), rank=cfg.rank, alpha=alpha, rslora=cfg.rslora,
        target_modules=[t.module for t in targets if not isinstance(t, ExpertTarget)],
        fan_in_fan_out=any(t.transposed for t in targets), task_type=task,
        target_parameters=target_parameters(tuned) if tuned else None, **patterns))


def _part_entries(part: Path) -> list[tuple[str, tuple]]:
    """(key, safetensors entry) of a part's residual tensors (its adapter factors stay out)."""
    from safetensors import safe_open

    with safe_open(str(part), framework="pt") as f:
        return [(key, (key, (t := f.get_slice(key)).get_dtype(), tuple(t.get_shape()),
                       byte_size(t.get_shape(), t.get_dtype()))) for key in f.keys() if not key.startswith("__lora_")]


def _read_source(source: tuple[Path, str] | TensorInfo) -> torch.Tensor:
    """A non-target's tensor: as stored, or (a quantized source's) decoded and cast to the residual's dtype."""
    if isinstance(source, TensorInfo):
        return load_tensor(source).to(getattr(torch, {"BF16": "bfloat16", "F16": "float16"}.get(source.dtype, "float32")))
    return _read(*source)


def _read(path: Path, key: str) -> torch.Tensor:
    return load_tensor(TensorInfo(key, Path(path), (), ""))

