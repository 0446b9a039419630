"""Final outputs from the per-tensor parts: residual shards (one per input shard), adapter dir, config."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qpissa.atomic import write_json
from qpissa.decompose.config import DecomposeConfig
from qpissa.decompose.methods import QUANTIZED_METHODS
from qpissa.decompose.targets import Target
from qpissa.adapters import adapter_config, adapter_key
from qpissa.formats import (TensorInfo, copy_side_files, load_tensor, byte_size, save_tensors, write_index,
                            write_safetensors)
from qpissa.quant import head_skip_modules, quantization_config


def part_name(index: int) -> str:
    """File name of target ``index``'s part in OUT/.parts/ (the same for one process or several)."""
    return f"{index:05d}.safetensors"


def assemble(model_dir: Path, out_dir: Path, tensors: list[TensorInfo], targets: list[Target],
              others: list[str], cfg: DecomposeConfig, task: str | None) -> None:
    """Stream residual shards (one per input shard) and the adapter from the parts."""
    from safetensors import safe_open

    residual_dir, adapter_dir = out_dir / "residual", out_dir / "adapter"
    part_of = {t.weight.name: out_dir / ".parts" / part_name(i) for i, t in enumerate(targets)}
    weight_map: dict[str, str] = {}
    total = 0
    shards = list(dict.fromkeys(t.file for t in tensors))
    for shard in shards:
        entries, sources = [], {}
        for info in (t for t in tensors if t.file == shard):
            part = part_of.get(info.name)
            if part is None:
                entries.append((info.name, info.dtype, info.shape, byte_size(info.shape, info.dtype)))
                sources[info.name] = (shard, info.name)
                continue
            with safe_open(str(part), framework="pt") as f:
                for key in f.keys():
                    if key.startswith("__lora_"):
                        continue
                    t = f.get_slice(key)
                    entries.append((key, t.get_dtype(), tuple(t.get_shape()), byte_size(t.get_shape(), t.get_dtype())))
                    sources[key] = (part, key)
        write_safetensors(residual_dir / shard.name, entries, lambda k: _read(*sources[k]))
        for name, _, _, nbytes in entries:
            weight_map[name] = shard.name
            total += nbytes
    if len(shards) > 1:
        write_index(residual_dir, weight_map, total)
    copy_side_files(model_dir, residual_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if cfg.method in QUANTIZED_METHODS:
        heads = [h for h in head_skip_modules([t.module for t in targets]) if h not in others]
        config["quantization_config"] = quantization_config(cfg.spec(), sorted(others) + heads)
    write_json(residual_dir / "config.json", config)
    adapter = {}
    for t in targets:
        with safe_open(str(part_of[t.weight.name]), framework="pt") as f:
            adapter[adapter_key(t.module, "lora_A")] = f.get_tensor("__lora_A__")
            adapter[adapter_key(t.module, "lora_B")] = f.get_tensor("__lora_B__")
    save_tensors(adapter_dir / "adapter_model.safetensors", adapter)
    alpha = float(cfg.rank if cfg.alpha is None else cfg.alpha)
    write_json(adapter_dir / "adapter_config.json", adapter_config(
        base_model=str(residual_dir.resolve()), rank=cfg.rank, alpha=alpha, rslora=cfg.rslora,
        target_modules=[t.module for t in targets], fan_in_fan_out=any(t.transposed for t in targets),
        task_type=task))


def _read(path: Path, key: str) -> torch.Tensor:
    return load_tensor(TensorInfo(key, Path(path), (), ""))

