"""Merging MoE experts: W_e = deq(Q_e) (or the plain residual) + s·B_e·A_e, written in the layout the family's
checkpoints use, so that plain transformers reads exactly those tensors (no extra, none missing).

The merged value is built as the model holds it (one fused parameter [E, ·, ·] per experts module and kind, in the
model's orientation), then transformers' own save-time conversion for the family
(``transformers.core_model_loading.revert_weight_conversion``) names and splits it: per expert
(``mlp.experts.{e}.gate_proj.weight``, Mixtral ``block_sparse_moe.experts.{e}.w1.weight``), renamed fused (Granite
``block_sparse_moe.input_linear.weight``) or fused as is (Llama-4, gpt-oss). One experts module is in memory at a time.

The adapter holds PEFT ``target_parameters`` factors per experts module: ``lora_A`` (E·r, in) expert-major and
``lora_B`` (out, r·E) expert-minor (see :func:`qpissa.decompose.experts.peft_factors`); ``gate_up_proj`` sits in
the inner wrapper (``experts.base_layer``), ``down_proj`` in the outer one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qpissa.adapters import Adapter, expert_parameter, module_scale, pattern_value
from qpissa.formats import TensorInfo, load_tensor
from qpissa.moe import CONFIG_KEY, read_nf4_states


class ExpertMerge:
    """The expert part of a merge: which output tensors are experts, and each one's merged value."""

    def __init__(self, adapter: Adapter, residual: Path, config: dict, by_name: dict[str, TensorInfo]) -> None:
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, int]] = {}  # "{experts}.{kind}" → A, B, s, r
        from qpissa.decompose.roles import expert_order

        fused = adapter.config.get("target_parameters")
        order = expert_order(residual) if fused else None  # PEFT nests one module's wrappers in this order
        for module in [m for m in adapter.factors if expert_parameter(m, fused, order) is not None]:
            a, b = adapter.factors.pop(module)
            experts, kind = expert_parameter(module, fused, order)
            r = int(pattern_value(adapter.config.get("rank_pattern"), f"{experts}.{kind}", adapter.config["r"]))
            self.factors[f"{experts}.{kind}"] = (a, b, module_scale(adapter.config, f"{experts}.{kind}"), r)
        nf4 = config.get(CONFIG_KEY) or {}
        self.by_name = by_name
        self.new: dict[str, tuple[int, ...]] = {}  # NF4 experts: output name → shape (not in the residual shards)
        self.plain: dict[str, tuple[str, int, int]] = {}  # bf16 experts in the shards: name → (param, expert, row0)
        self._owner: dict[str, str] = {}  # output name → the fused parameter it comes from
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None
        if not nf4 and not self.factors:
            return
        from qpissa.decompose.roles import checkpoint_map, meta_model, roles_of

        self.residual = residual
        roles = roles_of(residual)
        self.params = roles.experts
        if nf4:
            self.states = read_nf4_states(residual / nf4["file"])
            for key, param in self.params.items():
                shapes = self._revert(key, {key: torch.empty(param.shape, device="meta")})
                for name, t in shapes.items():
                    self.new[name], self._owner[name] = tuple(t.shape), key
            return
        mapped = checkpoint_map(residual, list(by_name))
        rows: dict[tuple[str, int], list[tuple[int, str]]] = {}
        for name, (model_name, expert, part) in mapped.items():
            if model_name in self.params and model_name in self.factors and expert is not None:
                rows.setdefault((model_name, expert), []).append((part, name))
        for (key, e), parts in rows.items():
            row0 = 0
            for _, name in sorted(parts):
                self.plain[name] = (key, e, row0)
                row0 += by_name[name].shape[0]

    def _revert(self, key: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's fused parameter(s) ``state`` under the checkpoint names transformers saves them with."""
        from transformers.core_model_loading import revert_weight_conversion

        from qpissa.decompose.roles import meta_model

        return revert_weight_conversion(meta_model(str(self.residual))[0], state)

    def __contains__(self, name: str) -> bool:
        return name in self.new or name in self.plain

    def _delta(self, key: str, e: int, device: str) -> torch.Tensor | None:
        """s·B_e·A_e (out, in) of expert ``e`` of the fused parameter ``key``; None without factors."""
        if key not in self.factors:
            return None
        a, b, s, r = self.factors[key]
        n_experts = a.shape[0] // r  # lora_A (E·r, in)
        return s * (b[:, e::n_experts].float().to(device) @ a[e * r:(e + 1) * r].float().to(device))

    def produce(self, name: str, device: str = "cpu") -> torch.Tensor:
        """The merged fp32 value of one output tensor."""
        if name in self.plain:
            key, e, row0 = self.plain[name]
            w = load_tensor(self.by_name[name]).float().to(device)
            delta = self._delta(key, e, device)
            return w if delta is None else w + delta[row0:row0 + w.shape[0]]
        key = self._owner[name]
        if self._cache is None or self._cache[0] != key:  # every output tensor of one fused parameter at once
            self._cache = (key, self._revert(key, {key: self._merged(key, device)}))
        return self._cache[1][name]

    def _merged(self, key: str, device: str) -> torch.Tensor:
        """The fused parameter ``key`` = deq(NF4) + s·B·A per expert, in the model's orientation, fp32."""
        from qpissa.moe import stack_from_state

        param = self.params[key]
        out = torch.empty(param.shape, dtype=torch.float32, device=device)
        for e in range(param.shape[0]):
            state = self.states[f"{param.module}.{e}.{param.name}"]
            w = stack_from_state([state], param.matrix).dequantize(torch.float32)[0].to(device)  # (out, in)
            delta = self._delta(key, e, device)
            w = w if delta is None else w + delta
            out[e] = w.T if param.transposed else w
        return out
