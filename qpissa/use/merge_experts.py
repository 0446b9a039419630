"""Merging MoE experts: W_e = deq(Q_e) (or the plain residual) + s·B_e·A_e, written per expert under the names
``save_pretrained`` uses (``mlp.experts.{e}.gate_proj.weight``…, Mixtral ``block_sparse_moe.experts.{e}.w1.weight``…),
which transformers fuses at load.

The adapter holds PEFT ``target_parameters`` factors per experts module: ``lora_A`` (E·r, in) expert-major and
``lora_B`` (out, r·E) expert-minor (see :func:`qpissa.decompose.experts.peft_factors`); ``gate_up_proj`` sits in
the inner wrapper (``experts.base_layer``), ``down_proj`` in the outer one.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from qpissa.adapters import Adapter, expert_parameter, module_scale, pattern_value
from qpissa.decompose.experts import model_block
from qpissa.formats import TensorInfo, load_tensor
from qpissa.moe import CONFIG_KEY, read_nf4_states

NAMES = re.compile(r"(?P<block>.+)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.weight")


class ExpertMerge:
    """The expert part of a merge: which output tensors are experts, and each one's merged value."""

    def __init__(self, adapter: Adapter, residual: Path, config: dict, by_name: dict[str, TensorInfo]) -> None:
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, int]] = {}  # "{experts}:{kind}" → A, B, s, r
        for module in [m for m in adapter.factors if expert_parameter(m) is not None]:
            a, b = adapter.factors.pop(module)
            experts, kind = expert_parameter(module)
            r = int(pattern_value(adapter.config.get("rank_pattern"), experts, adapter.config["r"]))
            self.factors[f"{experts}:{kind}"] = (a, b, module_scale(adapter.config, experts), r)
        nf4 = config.get(CONFIG_KEY) or {}
        on_disk = nf4.get("on_disk") or {"block": "mlp", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        self.proj = {on_disk["gate"]: ("gate_up_proj", 0), on_disk["up"]: ("gate_up_proj", 1),
                     on_disk["down"]: ("down_proj", 0)}
        self.nf4_file = residual / nf4["file"] if nf4 else None
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        self.new: dict[str, tuple[int, ...]] = {}  # NF4 experts: output names not in the residual shards → shape
        if self.nf4_file is not None:
            self.states = read_nf4_states(self.nf4_file)
            for key, state in self.states.items():
                experts, e, kind = key.rsplit(".", 2)
                block = experts.removesuffix(".experts")
                block = re.sub(r"(^|\.)mlp$", rf"\g<1>{on_disk['block']}", block)
                shape = tuple(int(x) for x in _shape(state))
                if kind == "gate_up_proj":
                    half = (shape[0] // 2, shape[1])
                    self.new[f"{block}.experts.{e}.{on_disk['gate']}.weight"] = half
                    self.new[f"{block}.experts.{e}.{on_disk['up']}.weight"] = half
                else:
                    self.new[f"{block}.experts.{e}.{on_disk['down']}.weight"] = shape
        self.by_name = by_name
        self._cache: tuple[str, torch.Tensor] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.new or (bool(self.factors) and self._parse(name) is not None)

    def _parse(self, name: str) -> tuple[str, int, str, int] | None:
        """(experts module in the model, expert, kind, half) of a per-expert checkpoint name, else None."""
        m = NAMES.fullmatch(name)
        if m is None or m["proj"] not in self.proj:
            return None
        kind, half = self.proj[m["proj"]]
        return f"{model_block(m['block'])}.experts", int(m["e"]), kind, half

    def produce(self, name: str, device: str = "cpu") -> torch.Tensor:
        """The merged fp32 weight of one per-expert output tensor."""
        experts, e, kind, half = self._parse(name)  # type: ignore[misc]
        if name in self.new:
            w = self._dequantized(f"{experts}.{e}.{kind}", device)
            if kind == "gate_up_proj":
                w = w.chunk(2)[half]
        else:
            w = load_tensor(self.by_name[name]).float().to(device)
        factors = self.factors.get(f"{experts}:{kind}")
        if factors is None:
            return w
        a, b, s, r = factors
        n_experts = a.shape[0] // r  # lora_A (E·r, in)
        delta = s * (b[:, e::n_experts].float().to(device) @ a[e * r:(e + 1) * r].float().to(device))  # (out, in)
        if kind == "gate_up_proj":
            delta = delta.chunk(2)[half]
        return w + delta

    def _dequantized(self, key: str, device: str) -> torch.Tensor:
        if self._cache is None or self._cache[0] != key:  # gate and up come from one NF4 matrix
            from qpissa.moe import stack_from_state

            state = self.states[key]
            stack = stack_from_state([state], tuple(int(x) for x in _shape(state)))
            self._cache = (key, stack.dequantize(torch.float32)[0].to(device))
        return self._cache[1]


def _shape(state: dict[str, torch.Tensor]) -> list[int]:
    import json

    qs = next(v for k, v in state.items() if k.startswith("quant_state."))
    return json.loads(bytes(qs.tolist()).decode())["shape"]
