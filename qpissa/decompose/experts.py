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
from pathlib import Path

import torch

from qpissa.adapters import expert_wrapper
from qpissa.errors import UserError
from qpissa.formats import TensorInfo, load_index, load_tensor
from qpissa.decompose.config import DecomposeConfig
from qpissa.decompose.methods import CALIBRATED_METHODS
from qpissa.decompose.targets import Target, matches
from qpissa.decompose.tensor import Stats, decompose_tensor

SUPPORTED = ("the experts' fused 3-D parameters as transformers 5 holds them (any name, either orientation), per "
             "expert or fused on disk as transformers' conversion mapping for the family reads them")
UNCALIBRATED = {"qpissa": "qpissa", "loftq": "loftq", "cloq": "loftq", "corda": "qpissa"}  # T=1 LoftQ = CLoQ with H=I


@dataclass(frozen=True)
class ExpertTarget(Target):
    """One expert's matrix (out×in as the math sees it) of one fused parameter ``kind``; ``weight`` is the first
    source. Per-expert files: ``sources`` are its parts in concatenation order (gate, up); fused: the 3-D stack."""

    sources: tuple[TensorInfo, ...] = ()  # per-expert layout: (gate, up) or (down,); fused: the 3-D stack
    expert: int = 0
    kind: str = "down_proj"  # the fused parameter's name in the model (gate_up_proj, down_proj, …)
    experts_module: str = ""  # the model's module holding the fused parameters, e.g. model.layers.0.mlp.experts
    fused: bool = False  # sources is one 3-D stack, this expert at index ``expert``
    stored_t: bool = False  # the model stores this parameter [E, in, out] (gpt-oss): slices are transposed
    interleaved: bool = False  # fused on disk with gate and up rows alternating (Inkling-2): de-interleaved on read

    @property
    def shape(self) -> tuple[int, int]:
        if self.fused:
            a, b = self.sources[0].shape[1:]
            return (b, a) if self.stored_t else (a, b)
        return sum(s.shape[0] for s in self.sources), self.sources[0].shape[1]

    @property
    def residual_key(self) -> str:
        """Where this expert's NF4 residual lives in OUT/residual (read by :mod:`qpissa.moe`)."""
        return f"{self.experts_module}.{self.expert}.{self.kind}.weight"


def find_experts(tensors: list[TensorInfo], patterns: list[str] | None = None,
                 model_dir: Path | None = None) -> tuple[list[ExpertTarget], list[str]]:
    """Expert targets in (layer, kind, expert) order and the checkpoint names of the routers/gates (never targets),
    from the model's module roles (:mod:`qpissa.decompose.roles`); an expert parameter whose checkpoint tensors do
    not add up is an error naming them (never a silent skip). ``patterns`` (``--targets``) filter the experts."""
    from qpissa.decompose.roles import checkpoint_map, interleaved, meta_model, roles_of

    if model_dir is None:
        model_dir = tensors[0].file.parent if tensors else Path(".")
    roles = roles_of(model_dir)
    if not roles.experts:
        return [], []
    mapped = checkpoint_map(model_dir, [t.name for t in tensors])
    per: dict[tuple[str, int], list[tuple[int, TensorInfo]]] = defaultdict(list)
    fused: dict[str, TensorInfo] = {}
    routers, unknown = [], []
    modules = tuple(f"{p.module}." for p in roles.experts.values())
    params = {n for n, _ in meta_model(str(model_dir))[0].named_parameters()}  # e.g. a norm inside the experts module
    for t in tensors:
        name, expert, part = mapped[t.name]
        if roles.is_router(name):
            routers.append(t.name)
        if name not in roles.experts:
            if name.startswith(modules) and name not in roles.expert_biases and name not in params:
                unknown.append(t.name)  # under an experts module, yet no parameter the model has
            continue
        if expert is not None and len(t.shape) == 2:
            per[(name, expert)].append((part, t))
        elif expert is None and tuple(t.shape) == roles.experts[name].shape:
            fused[name] = t
        else:
            raise UserError(f"unknown expert layout: tensor {t.name} {list(t.shape)} for the model's "
                            f"{name} {list(roles.experts[name].shape)}; supported layouts: {SUPPORTED}")
    if unknown:
        raise UserError(f"unknown expert layout: tensors {', '.join(unknown[:4])}{' …' if len(unknown) > 4 else ''} "
                        f"({len(unknown)} in all) are no parameter of the model's experts; supported layouts: {SUPPORTED}")
    targets: list[ExpertTarget] = []
    mixed = interleaved(model_dir, [t.name for t in fused.values()])
    for key in sorted(roles.experts, key=_natural):
        param = roles.experts[key]
        if key in fused:
            stack = fused[key]
            targets += [ExpertTarget(f"{param.module}.{e}.{param.name}", stack, False, (stack,), e, param.name,
                                     param.module, True, param.transposed, stack.name in mixed)
                        for e in range(param.shape[0])]
            continue
        found = sorted(e for k, e in per if k == key)
        if found != list(range(param.shape[0])):
            names = [s.name for e in found for _, s in per[(key, e)]][:4]
            raise UserError(f"unknown expert layout: the model's {key} {list(param.shape)} has no complete set of "
                            f"checkpoint tensors ({', '.join(names) or 'none found'}); supported layouts: {SUPPORTED}")
        for e in found:
            sources = tuple(t for _, t in sorted(per[(key, e)], key=lambda p: p[0]))
            if param.transposed or sum(s.shape[0] for s in sources) != param.shape[1] \
                    or any(s.shape[1] != param.shape[2] for s in sources):
                raise UserError(f"unknown expert layout at {', '.join(s.name for s in sources)}: they do not make "
                                f"expert {e} of the model's {key} {list(param.shape)}; supported layouts: {SUPPORTED}")
            targets.append(ExpertTarget(f"{param.module}.{e}.{param.name}", sources[0], False, sources, e,
                                        param.name, param.module))
    if patterns:
        targets = [t for t in targets if matches(t.module, patterns) or matches(f"{t.experts_module}.{t.kind}", patterns)]
    return targets, routers


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def load_expert(target: ExpertTarget) -> torch.Tensor:
    """This expert's matrix (out×in), reading only its rows: one slice of a fused stack, or its gate and up."""
    if target.fused:
        w = load_index(target.sources[0], target.expert)  # a packed (MXFP4/FP8) stack: that expert decoded
        if target.interleaved:  # stored rows g0 u0 g1 u1 …: the model's gate rows, then its up rows
            w = torch.cat([w[0::2], w[1::2]])
        return w.T.contiguous() if target.stored_t else w
    parts = [load_tensor(s) for s in target.sources]
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # (2I, H): gate rows, then up rows


def fused_expert_stack(param: str, experts: list[ExpertTarget]) -> torch.Tensor | None:
    """The model's fused parameter ``param`` (``….experts.gate_up_proj``, in its stored orientation) built from the
    checkpoint (calibration runs blocks of the real model); ``experts``: every expert of the checkpoint
    (:func:`find_experts` without ``--targets``); None when ``param`` is no such parameter."""
    found = sorted((t for t in experts if f"{t.experts_module}.{t.kind}" == param), key=lambda t: t.expert)
    if not found:
        return None
    return torch.stack([load_expert(t).T if t.stored_t else load_expert(t) for t in found])


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
    return [s.shape[0] for s in target.sources]


def residual_names(target: ExpertTarget) -> list[str]:
    """Checkpoint names of a plain (bfloat16) residual: the per-expert source names (a fused source is refused by
    :func:`check_plain_residual`)."""
    return [s.name for s in target.sources]


def check_plain_residual(targets: list[ExpertTarget]) -> None:
    """``--experts-dtype bfloat16`` writes the residual per expert under the source names; a fused source would need
    the whole stack rewritten at once: one line instead."""
    fused = sorted({t.sources[0].name for t in targets if t.fused})
    if fused:
        raise UserError(f"--experts-dtype bfloat16 needs per-expert tensors on disk; {', '.join(fused[:2])} hold "
                        "all experts fused: use --experts-dtype nf4 (the default)")


def peft_factors(targets: list[ExpertTarget], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 order: dict[str, list[str]] | None = None) -> dict[str, torch.Tensor]:
    """PEFT ``target_parameters`` tensors per experts module and kind from per-expert (A_e r×in, B_e out×r).

    PEFT 0.21's ParamWrapper reads ``lora_A`` (r·E, in) as (E, r, in), expert-major, and ``lora_B`` (out, r·E) as
    (out, r, E), expert-minor (its ``get_delta_weight``); for two parameters of one module it nests the wrappers,
    ``gate_up_proj`` inside (``experts.base_layer.lora_*``), ``down_proj`` outside (``experts.lora_*``): in the
    module's parameter order (``order``: experts module → its parameters as registered)."""
    groups: dict[tuple[str, str], list[ExpertTarget]] = defaultdict(list)
    for t in targets:
        groups[(t.experts_module, t.kind)].append(t)
    out = {}
    for (module, kind), members in groups.items():
        members.sort(key=lambda t: t.expert)
        a = torch.cat([factors[t.module][0] for t in members])  # (E·r, in)
        b = torch.stack([factors[t.module][1] for t in members], dim=-1)  # (out, r, E)
        kinds, registered = {k for m, k in groups if m == module}, (order or {}).get(module)
        where = expert_wrapper(module, kind, [k for k in registered if k in kinds] if registered else None)
        out[f"base_model.model.{where}.lora_A.weight"] = a.contiguous()
        out[f"base_model.model.{where}.lora_B.weight"] = b.reshape(b.shape[0], -1).contiguous()
    return out


def target_parameters(targets: list[ExpertTarget]) -> list[str]:
    """adapter_config ``target_parameters``: the fused parameters, by their name inside a block."""
    from qpissa.decompose.report import layer_type

    return sorted({f"{layer_type(t.experts_module + '.x').rsplit('.', 1)[0]}.{t.kind}" for t in targets})


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
            "routers": {"count": len(routers), "dtype": "source (not targets)", "tensors": _patterns(routers)}}


def _patterns(names: list[str]) -> list[str]:
    """Checkpoint names with layer and expert indices as ``*``, each once: the router/gate tensors the report lists."""
    from qpissa.decompose.coverage import pattern

    return list(dict.fromkeys(pattern(n) for n in names))
