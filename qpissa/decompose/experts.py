"""Mixture-of-experts weights as targets: one decomposition per expert matrix, the same per-tensor path.

transformers 5 holds each layer's experts as fused 3-D parameters, ``mlp.experts.gate_up_proj`` (E, 2I, H)
and ``mlp.experts.down_proj`` (E, H, I) (Qwen3-MoE, Mixtral, OLMoE alike; ``gate_up[e] = cat(gate_e, up_e)``,
gate first), while ``save_pretrained`` writes one tensor per expert (``mlp.experts.{e}.gate_proj.weight``; Mixtral
``block_sparse_moe.experts.{e}.w1/w3/w2.weight``) and fuses them at load. Both on-disk layouts are read here.
Each expert's ``gate_up`` (2I×H, its gate and up rows read together) and ``down`` (H×I) is one target: rank r per
expert, the method run by :func:`qpissa.decompose.tensor.decompose_tensor` on that one matrix, so peak memory is
one expert matrix and ``--resume`` works per expert. Routers (``mlp.gate``) stay in their source dtype.

Residual (``--experts-dtype``): ``nf4`` (default) writes every expert's NF4 bytes in bitsandbytes' layout under
``{experts}.{e}.{gate_up_proj|down_proj}.weight`` (+ its quant state), read by :mod:`qpissa.moe`; ``bfloat16``
runs PiSSA on the experts and writes their residual in the per-expert layout transformers loads by itself.
Calibrated methods get each expert's own H from the calibration tokens the router sends it
(:mod:`qpissa.decompose.calibration`); an expert routed fewer than ``--calib-expert-tokens`` of them falls back to
the uncalibrated counterpart (:data:`UNCALIBRATED`), and the report counts those.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from qpissa.adapters import expert_wrapper
from qpissa.errors import UserError
from qpissa.formats import TensorInfo, load_index, load_tensor
from qpissa.decompose.config import DecomposeConfig
from qpissa.decompose.methods import CALIBRATED_METHODS
from qpissa.decompose.targets import Target, matches
from qpissa.decompose.tensor import Stats, decompose_tensor

KINDS = ("gate_up_proj", "down_proj")  # transformers 5's fused expert parameters
# on-disk per-expert name → (fused kind, which half of gate_up: 0 gate, 1 up)
PER_EXPERT = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0),
              "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", 0)}
PER_EXPERT_RE = re.compile(r"(?P<block>.+)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight")
FUSED_RE = re.compile(r"(?P<block>.+)\.experts\.(?P<proj>gate_up_proj|down_proj)")
SUPPORTED = ("per-expert {block}.experts.{e}.gate_proj/up_proj/down_proj.weight (Qwen3-MoE, OLMoE), "
             "{block}.experts.{e}.w1/w3/w2.weight (Mixtral), or fused 3-D {block}.experts.gate_up_proj [E, 2I, H] "
             "and {block}.experts.down_proj [E, H, I] (transformers 5)")
UNCALIBRATED = {"qpissa": "qpissa", "loftq": "loftq", "cloq": "loftq", "corda": "qpissa"}  # T=1 LoftQ = CLoQ with H=I


@dataclass(frozen=True)
class ExpertTarget(Target):
    """One expert's matrix: ``gate_up`` (its gate and up tensors stacked) or ``down``; ``weight`` is the first source."""

    sources: tuple[TensorInfo, ...] = ()  # per-expert layout: (gate, up) or (down,); fused: the 3-D stack
    expert: int = 0
    kind: str = "down_proj"
    experts_module: str = ""  # the model's module holding the fused parameters, e.g. model.layers.0.mlp.experts
    fused: bool = False  # sources is one 3-D stack, this expert at index ``expert``

    @property
    def shape(self) -> tuple[int, int]:
        if self.fused:
            return tuple(self.sources[0].shape[1:])  # type: ignore[return-value]
        return sum(s.shape[0] for s in self.sources), self.sources[0].shape[1]

    @property
    def residual_key(self) -> str:
        """Where this expert's NF4 residual lives in OUT/residual (read by :mod:`qpissa.moe`)."""
        return f"{self.experts_module}.{self.expert}.{self.kind}.weight"


def model_block(block: str) -> str:
    """On-disk block prefix → the transformers 5 module path: Mixtral's ``block_sparse_moe`` is ``mlp`` there."""
    return re.sub(r"(^|\.)block_sparse_moe$", r"\1mlp", block)


def find_experts(tensors: list[TensorInfo], patterns: list[str] | None = None) -> tuple[list[ExpertTarget], list[str]]:
    """Expert targets in (layer, kind, expert) order and the router weights; an ``experts`` tensor of another
    layout is an error naming it (never a silent skip). ``patterns`` (``--targets``) filter the expert modules."""
    per: dict[tuple[str, str, int], list[tuple[int, TensorInfo]]] = defaultdict(list)
    fused: dict[tuple[str, str], TensorInfo] = {}
    unknown = []
    for t in tensors:
        if ".experts." not in t.name:
            continue
        if (m := PER_EXPERT_RE.fullmatch(t.name)) and len(t.shape) == 2:
            kind, half = PER_EXPERT[m["proj"]]
            per[(m["block"], kind, int(m["e"]))].append((half, t))
        elif (m := FUSED_RE.fullmatch(t.name)) and len(t.shape) == 3:
            fused[(m["block"], m["proj"])] = t
        else:
            unknown.append(t.name)
    if unknown:
        raise UserError(f"unknown expert layout: tensors {', '.join(unknown[:4])}{' …' if len(unknown) > 4 else ''} "
                        f"({len(unknown)} in all); supported layouts: {SUPPORTED}")
    targets: list[ExpertTarget] = []
    blocks = sorted({b for b, _, _ in per} | {b for b, _ in fused}, key=_natural)
    for block in blocks:
        module = f"{model_block(block)}.experts"
        for kind in KINDS:
            if (block, kind) in fused:
                stack = fused[(block, kind)]
                targets += [ExpertTarget(f"{module}.{e}.{kind}", stack, False, (stack,), e, kind, module, True)
                            for e in range(stack.shape[0])]
                continue
            experts = sorted(e for b, k, e in per if b == block and k == kind)
            for e in experts:
                sources = tuple(t for _, t in sorted(per[(block, kind, e)], key=lambda p: p[0]))
                want = 2 if kind == "gate_up_proj" else 1
                if len(sources) != want or len({s.shape[1] for s in sources}) != 1:
                    raise UserError(f"unknown expert layout at {block}.experts.{e} ({', '.join(s.name for s in sources)}): "
                                    f"expected gate and up, or down, per expert; supported layouts: {SUPPORTED}")
                targets.append(ExpertTarget(f"{module}.{e}.{kind}", sources[0], False, sources, e, kind, module))
    if patterns:
        targets = [t for t in targets if matches(t.module, patterns) or matches(f"{t.experts_module}.{t.kind}", patterns)]
    by_name = {t.name for t in tensors}
    routers = [f"{b}.gate.weight" for b in blocks if f"{b}.gate.weight" in by_name]
    return targets, routers


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def load_expert(target: ExpertTarget) -> torch.Tensor:
    """This expert's matrix (out×in), reading only its rows: one slice of a fused stack, or its gate and up."""
    if target.fused:
        return load_index(target.sources[0], target.expert)  # a packed (MXFP4/FP8) stack: that expert decoded
    parts = [load_tensor(s) for s in target.sources]
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # (2I, H): gate rows, then up rows


def fused_expert_stack(param: str, experts: list[ExpertTarget]) -> torch.Tensor | None:
    """transformers 5's fused parameter ``param`` (``….experts.gate_up_proj`` / ``down_proj``) built from a per-expert
    checkpoint (calibration runs blocks of the real model); ``experts``: every expert of the checkpoint
    (:func:`find_experts` without ``--targets``); None when ``param`` is no such parameter."""
    if not re.search(r"\.experts\.(gate_up_proj|down_proj)$", param):
        return None
    module, kind = param.rsplit(".", 1)
    found = sorted((t for t in experts if t.experts_module == module and t.kind == kind), key=lambda t: t.expert)
    return torch.stack([load_expert(t) for t in found]) if found else None


def expert_config(cfg: DecomposeConfig, calibrated: bool = False) -> DecomposeConfig:
    """The config an expert is decomposed with: PiSSA for ``--experts-dtype bfloat16``; a calibrated method's
    uncalibrated counterpart when this expert has no statistics (``calibrated`` False: too few routed tokens)."""
    if cfg.experts_dtype == "bfloat16":
        return dataclasses.replace(cfg, method="pissa", calib_data=None, eval_kl=0)
    if (cfg.method in CALIBRATED_METHODS or cfg.calib_data) and not calibrated:
        return dataclasses.replace(cfg, method=UNCALIBRATED.get(cfg.method, cfg.method), calib_data=None, eval_kl=0,
                                   iters=1 if cfg.method == "cloq" else cfg.iters)
    return cfg


def decompose_expert(target: ExpertTarget, cfg: DecomposeConfig, stats: Stats | None = None) -> tuple[dict, dict]:
    """:func:`decompose_tensor` on one expert (calibrated with its routed tokens' ``stats`` when given); residual
    keys renamed for OUT/residual (see the module docstring)."""
    ecfg = expert_config(cfg, stats is not None)
    tensors, metrics = decompose_tensor(target, load_expert(target), ecfg, stats if ecfg is cfg else None)
    metrics["tensor"] = ", ".join(s.name for s in target.sources) + (f"[{target.expert}]" if target.fused else "")
    metrics["expert"] = {"index": target.expert, "kind": target.kind, "module": target.experts_module,
                         "method": ecfg.method, "calibrated": ecfg is cfg and stats is not None,
                         "fallback": ecfg.method != cfg.method and cfg.experts_dtype == "nf4"}
    first = target.weight.name
    out = {k: v for k, v in tensors.items() if k.startswith("__lora_")}
    if ecfg.method == "pissa":  # plain residual, written under the per-expert names transformers fuses at load
        residual = tensors[first].to(torch.bfloat16)
        for name, rows in zip(residual_names(target), residual.split(_rows(target))):
            out[name] = rows.contiguous()
    else:  # NF4 bytes + quant state under {experts}.{e}.{kind}.weight
        out.update({target.residual_key + k[len(first):]: v for k, v in tensors.items() if not k.startswith("__lora_")})
    return out, metrics


def _rows(target: ExpertTarget) -> list[int]:
    if target.fused:
        rows = target.shape[0]
        return [rows // 2, rows // 2] if target.kind == "gate_up_proj" else [rows]
    return [s.shape[0] for s in target.sources]


def residual_names(target: ExpertTarget) -> list[str]:
    """Per-expert checkpoint names of a plain (bfloat16) residual: the source names, or Qwen3-MoE's for a fused input."""
    if not target.fused:
        return [s.name for s in target.sources]
    block = target.sources[0].name.rsplit(".experts.", 1)[0]
    projs = ("gate_proj", "up_proj") if target.kind == "gate_up_proj" else ("down_proj",)
    return [f"{block}.experts.{target.expert}.{p}.weight" for p in projs]


def peft_factors(targets: list[ExpertTarget], factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """PEFT ``target_parameters`` tensors per experts module and kind from per-expert (A_e r×in, B_e out×r).

    PEFT 0.21's ParamWrapper reads ``lora_A`` (r·E, in) as (E, r, in), expert-major, and ``lora_B`` (out, r·E) as
    (out, r, E), expert-minor (its ``get_delta_weight``); for two parameters of one module it nests the wrappers,
    ``gate_up_proj`` inside (``experts.base_layer.lora_*``), ``down_proj`` outside (``experts.lora_*``)."""
    groups: dict[tuple[str, str], list[ExpertTarget]] = defaultdict(list)
    for t in targets:
        groups[(t.experts_module, t.kind)].append(t)
    out = {}
    for (module, kind), members in groups.items():
        members.sort(key=lambda t: t.expert)
        a = torch.cat([factors[t.module][0] for t in members])  # (E·r, in)
        b = torch.stack([factors[t.module][1] for t in members], dim=-1)  # (out, r, E)
        where = expert_wrapper(module, kind)
        out[f"base_model.model.{where}.lora_A.weight"] = a.contiguous()
        out[f"base_model.model.{where}.lora_B.weight"] = b.reshape(b.shape[0], -1).contiguous()
    return out


def target_parameters(targets: list[ExpertTarget]) -> list[str]:
    """adapter_config ``target_parameters``: the fused parameters, by their name inside a block."""
    from qpissa.decompose.report import layer_type

    return sorted({f"{layer_type(t.experts_module + '.x').rsplit('.', 1)[0]}.{t.kind}" for t in targets})


def on_disk_names(targets: list[ExpertTarget]) -> dict[str, str]:
    """How the source checkpoint names experts (merge writes the same): block suffix and gate/up/down names."""
    names = {"block": "mlp", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    for t in (t for t in targets if not t.fused):
        m = [PER_EXPERT_RE.fullmatch(s.name) for s in t.sources]
        names["block"] = m[0]["block"].rsplit(".", 1)[-1]
        if t.kind == "gate_up_proj":
            names["gate"], names["up"] = m[0]["proj"], m[1]["proj"]
        else:
            names["down"] = m[0]["proj"]
    return names


def summary(targets: list[ExpertTarget], routers: list[str], metrics: list[dict], cfg: DecomposeConfig) -> dict:
    """The report's ``experts`` section: layout, counts, residual dtype, fallbacks, routers."""
    fallback = sum(1 for m in metrics if (m.get("expert") or {}).get("fallback"))
    calibrated = sum(1 for m in metrics if (m.get("expert") or {}).get("calibrated"))
    return {"modules": len({t.experts_module for t in targets}), "matrices": len(targets),
            "experts": len({(t.experts_module, t.expert) for t in targets}),
            "layout": "fused 3-D" if any(t.fused for t in targets) else "per-expert",
            "residual": cfg.experts_dtype, "method": expert_config(cfg, calibrated=True).method,
            "calibrated": calibrated, "calibration_fallback": fallback,
            "fallback_method": expert_config(cfg).method, "min_routed_tokens": cfg.calib_expert_tokens,
            "routers": {"count": len(routers), "dtype": "source (not targets)"}}
