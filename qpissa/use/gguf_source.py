"""Where the exporter's tensors come from: a model dir (plain or an NF4 residual) and optionally its LoRA/PiSSA adapter.

Reads one tensor at a time from the safetensors shards (nothing else is held), so the export of a 70B model needs
memory for its largest tensor, not for the model. For an adapted weight W = deq(R) + s·B·A (s = α/r or α/√r as PEFT
applies it); ``weight`` gives deq(R) (the residual, what the split export quantizes) and ``delta`` gives s·B·A.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from qpissa.adapters import Adapter, module_scale, read_adapter
from qpissa.errors import UserError
from qpissa.formats import TensorInfo, load_tensor, scan_checkpoint, weight_key
from qpissa.moe import CONFIG_KEY
from qpissa.use.merge import NF4_COMPANIONS, QS_KEY, read_nf4

_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<index>\d+)\.(?P<proj>\w+)\.weight$")


class TensorSource:
    """The tensors of ``model_dir`` (+ ``adapter_dir``): names with their real shapes, values on demand, fp32."""

    def __init__(self, model_dir: Path, adapter_dir: Path | None) -> None:
        self.model_dir = model_dir
        self.config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
        if self.config.get(CONFIG_KEY):
            raise UserError(f"{model_dir}: MoE experts held as NF4 bytes; GGUF export supports dense models")
        qcfg = self.config.get("quantization_config") or {}
        if qcfg and not (qcfg.get("load_in_4bit") and qcfg.get("bnb_4bit_quant_type") == "nf4"):
            raise UserError(f"{model_dir}/config.json: quantization {qcfg.get('quant_method')!r} is not "
                            "bitsandbytes NF4; export a bf16 or NF4 checkpoint")
        self.by_name = {i.name: i for i in scan_checkpoint(model_dir)}
        self.quantized = {n for n in self.by_name if n + QS_KEY in self.by_name}
        companions = {f"{n}.{s}" for n in self.quantized for s in NF4_COMPANIONS}
        self.names = [n for n in self.by_name if n not in companions]
        # MoE experts stored one matrix per expert (…experts.{e}.gate_proj.weight): llama.cpp wants them stacked,
        # one (E, m, n) tensor …experts.gate_proj.weight per layer and projection
        self.experts: dict[str, list[str]] = {}
        for n in self.names:
            m = _EXPERT.match(n)
            if m:
                self.experts.setdefault(f"{m['prefix']}.{m['proj']}.weight", []).append(n)
        for key, members in self.experts.items():
            members.sort(key=lambda n: int(_EXPERT.match(n)["index"]))
        stacked = {n for members in self.experts.values() for n in members}
        first = {members[0]: key for key, members in self.experts.items()}
        self.names = [first.get(n, n) for n in self.names if n not in stacked or n in first]
        self.adapter: Adapter | None = read_adapter(adapter_dir) if adapter_dir is not None else None
        self.modules: dict[str, str] = {}  # checkpoint weight key → adapter module
        if self.adapter is not None:
            if self.adapter.extra:
                raise UserError(f"{self.adapter.path}: extra tensors {sorted(self.adapter.extra)[:2]} "
                                "(modules_to_save?) cannot be exported; only LoRA factors are supported")
            for module in self.adapter.factors:
                key = weight_key(module, self.by_name)
                if key is None:
                    raise UserError(f"adapter module {module}: no weight {module}.weight in {model_dir}; "
                                    "is the adapter for this model?")
                self.modules[key] = module

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's real shape (an NF4 weight's comes from its quantization state, not its packed bytes)."""
        if name in self.experts:
            return (len(self.experts[name]), *self.shape(self.experts[name][0]))
        if name in self.quantized:
            from bitsandbytes.functional import unpack_tensor_to_dict

            return tuple(unpack_tensor_to_dict(load_tensor(self.by_name[name + QS_KEY]))["shape"])
        return self.by_name[name].shape

    def weight(self, name: str) -> torch.Tensor:
        """The stored tensor in fp32; an NF4 residual dequantized as bitsandbytes' Linear4bit uses it."""
        if name in self.experts:
            return torch.stack([self.weight(n) for n in self.experts[name]])  # (E, m, n)
        info: TensorInfo = self.by_name[name]
        if name in self.quantized:
            return read_nf4(info, self.by_name).float()
        return load_tensor(info).float()

    def lora(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float, int] | None:
        """(A (r×n), B (m×r), s, r) of the adapter on weight ``name``, fp32, or None when it has none."""
        if self.adapter is None or name not in self.modules:
            return None
        module = self.modules[name]
        a, b = self.adapter.factors[module]
        if self.adapter.config.get("fan_in_fan_out"):
            raise UserError(f"{self.adapter.path}: fan_in_fan_out adapters (Conv1D models) have no GGUF mapping")
        return a.float(), b.float(), module_scale(self.adapter.config, module), int(a.shape[0])

    def merged(self, name: str) -> torch.Tensor:
        """deq(R) + s·B·A for an adapted weight, the stored tensor otherwise (fp32)."""
        if name in self.experts:
            return torch.stack([self.merged(n) for n in self.experts[name]])  # (E, m, n)
        w = self.weight(name)
        factors = self.lora(name)
        if factors is not None:
            a, b, s, _ = factors
            delta = s * (b @ a)  # (m, n)
            if delta.shape != w.shape:
                raise UserError(f"{self.modules[name]}: adapter delta {tuple(delta.shape)} vs weight "
                                f"{tuple(w.shape)}; is the adapter for this model?")
            w = w + delta
        return w

    def parameter_count(self) -> int:
        return sum(math.prod(self.shape(n)) for n in self.names)
