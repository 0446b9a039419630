"""PiSSA → LoRA conversion: a trained PiSSA/QPiSSA adapter as a plain LoRA on the *original* model.

PiSSA (Meng et al. 2024, §3 and App. "Converting PiSSA to LoRA") starts from W = R + s·B₀A₀ and trains
(A, B) on the frozen residual R, so the fine-tuned weight is R + s·B·A. Its change against the original
weight is

    ΔW = s·B·A − s·B₀·A₀ = s·B′·A′,   A′ = [A; A₀] (2r×n),   B′ = [B, −B₀] (m×2r),

a rank-2r LoRA that needs no residual: W + s·B′A′ = R + s·B·A. The scale is kept by the new α′:
s = α/r → α′ = 2α (α′/2r = α/r); rsLoRA s = α/√r → α′ = √2·α (α′/√(2r) = α/√r); per-module
``rank_pattern`` entries double and ``alpha_pattern`` entries scale the same way (PEFT doubles them even
under rsLoRA, which changes s — see PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=…)``).

QPiSSA: the trained model is deq(Q) + s·B·A with Q = NF4(W − s·B₀A₀). The converted LoRA gives
W + s·B′A′, which differs from it by exactly the initialization error E = W − deq(Q) − s·B₀A₀ for every
module, independent of training. The conversion is exact; the quantized model it came from is not W.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from qpissa.adapters import ADAPTER_WEIGHTS, Adapter, expert_parameter, module_scale, pattern_value, read_adapter
from qpissa.atomic import output_folder, write_json
from qpissa.choices import check_choices
from qpissa.errors import UserError
from qpissa.formats import is_within, save_tensors

OutDType = Literal["same", "bfloat16", "float16", "float32"]


@dataclass
class ConvertConfig:
    dtype: OutDType = field(default="same", metadata={"help": "same | bfloat16 | float16 | float32 (factor dtype)"})
    base_model: str | None = field(default=None, metadata={"help": "original model path/id to record in adapter_config.json"})
    overwrite: bool = field(default=False, metadata={"help": "replace an adapter already in --output"})

    def __post_init__(self) -> None:
        check_choices(self)


def converted_config(config: dict[str, Any], base_model: str | None) -> dict[str, Any]:
    """adapter_config.json of the rank-2r LoRA: r′ = 2r and α′ chosen so that every module keeps its s."""
    grow = math.sqrt(2.0) if config.get("use_rslora") else 2.0
    out = dict(config)
    out["r"] = 2 * config["r"]
    out["lora_alpha"] = config.get("lora_alpha", config["r"]) * grow
    out["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    out["alpha_pattern"] = {k: v * grow for k, v in (config.get("alpha_pattern") or {}).items()}
    out["init_lora_weights"] = True
    out["inference_mode"] = True
    if base_model is not None:
        out["base_model_name_or_path"] = base_model
    return out


def convert_factors(trained: tuple[torch.Tensor, torch.Tensor], init: tuple[torch.Tensor, torch.Tensor],
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A′, B′) = ([A; A₀], [B, −B₀]) in fp32, cast to ``dtype``; B′A′ = BA − B₀A₀."""
    (a, b), (a0, b0) = trained, init
    a_new = torch.cat([a.float(), a0.float()], dim=0)  # (2r, n)
    b_new = torch.cat([b.float(), -b0.float()], dim=1)  # (m, 2r)
    return a_new.to(dtype).contiguous(), b_new.to(dtype).contiguous()


def convert_expert_factors(trained: tuple[torch.Tensor, torch.Tensor], init: tuple[torch.Tensor, torch.Tensor],
                           rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`convert_factors` per expert for PEFT ``target_parameters`` factors: lora_A (E·r, in) is read as
    (E, r, in) and lora_B (out, r·E) as (out, r, E), so each expert's [A_e; A₀_e] and [B_e, −B₀_e] are joined
    along the rank axis: (E·2r, in) and (out, 2r·E)."""
    (a, b), (a0, b0) = trained, init
    experts = a.shape[0] // rank
    a_new = torch.cat([a.float().view(experts, rank, -1), a0.float().view(experts, rank, -1)], dim=1)  # (E, 2r, in)
    b_new = torch.cat([b.float().view(b.shape[0], rank, experts), -b0.float().view(b.shape[0], rank, experts)],
                      dim=1)  # (out, 2r, E)
    return (a_new.reshape(-1, a.shape[1]).to(dtype).contiguous(),
            b_new.reshape(b.shape[0], -1).to(dtype).contiguous())


def _check_compatible(trained: Adapter, init: Adapter) -> None:
    if trained.path.resolve() == init.path.resolve():
        raise UserError(f"--init {init.path} is the trained adapter itself; pass the adapter training started "
                        "from (decompose's OUT/adapter)")
    keys = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
    for key in keys:
        t, i = trained.config.get(key) or None, init.config.get(key) or None
        if t != i:
            raise UserError(f"{trained.path} and {init.path} differ in {key} ({t!r} vs {i!r}); "
                            "--init must be the adapter this run started from")
    if set(trained.factors) != set(init.factors):
        only = sorted(set(trained.factors) ^ set(init.factors))[0]
        raise UserError(f"{trained.path} and {init.path} adapt different modules (e.g. {only}); "
                        "--init must be the adapter this run started from")
    for module, (a, b) in trained.factors.items():
        a0, b0 = init.factors[module]
        if a.shape != a0.shape or b.shape != b0.shape:
            raise UserError(f"{module}: trained A/B {tuple(a.shape)}/{tuple(b.shape)} vs init "
                            f"{tuple(a0.shape)}/{tuple(b0.shape)}; --init must match the trained adapter")


def original_model_of(init_dir: Path) -> str | None:
    """The original checkpoint a decompose output came from (``OUT/manifest.json`` or ``OUT/report.json``)."""
    for name in ("manifest.json", "report.json"):
        path = init_dir.parent / name
        if path.exists():
            try:
                meta = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            for key in ("model_dir", "model", "source_model", "base_model"):
                value = meta.get(key) if isinstance(meta, dict) else None
                if isinstance(value, str) and Path(value).is_dir():
                    return str(Path(value).resolve())
    return None


def convert_pissa_to_lora(trained_dir: str | Path, init_dir: str | Path, out_dir: str | Path,
                          cfg: ConvertConfig = ConvertConfig()) -> dict[str, Any]:
    """Write the rank-2r LoRA equivalent of ``trained_dir`` − ``init_dir`` to ``out_dir``; returns a summary."""
    trained, init = read_adapter(trained_dir), read_adapter(init_dir)
    out = Path(out_dir)
    for src in (trained.path, init.path):
        if is_within(out, src) or is_within(src, out):
            raise UserError(f"--output {out} overlaps input {src}; choose a new directory")
    if (out / "adapter_config.json").exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds an adapter; pass --overwrite or choose a new directory")
    _check_compatible(trained, init)
    if all(torch.equal(a, init.factors[m][0]) and torch.equal(b, init.factors[m][1])
           for m, (a, b) in trained.factors.items()):
        raise UserError(f"{trained.path} and --init {init.path} hold identical factors, so the LoRA would be zero; "
                        "--init must be the adapter training started from (decompose's OUT/adapter)")
    tensors: dict[str, torch.Tensor] = {}
    for module, pair in trained.factors.items():
        dtype = pair[0].dtype if cfg.dtype == "same" else getattr(torch, cfg.dtype)
        if expert_parameter(module, trained.config.get("target_parameters")) is not None:  # MoE experts (PEFT target_parameters)
            rank = int(pattern_value(trained.config.get("rank_pattern"), module, trained.config["r"]))
            a_new, b_new = convert_expert_factors(pair, init.factors[module], rank, dtype)
        else:
            a_new, b_new = convert_factors(pair, init.factors[module], dtype)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a_new
        tensors[f"base_model.model.{module}.lora_B.weight"] = b_new
    tensors.update(trained.extra)
    base = cfg.base_model or original_model_of(init.path)
    config = converted_config(trained.config, base)
    with output_folder(out):  # a full disk or Ctrl-C: no half adapter left behind
        save_tensors(out / ADAPTER_WEIGHTS, tensors)
        write_json(out / "adapter_config.json", config)  # last: a dir with a config is a complete adapter
    return {"output": str(out), "modules": len(trained.factors), "r": trained.config["r"], "r_new": config["r"],
            "lora_alpha": trained.config.get("lora_alpha"), "lora_alpha_new": config["lora_alpha"],
            "use_rslora": bool(trained.config.get("use_rslora")),
            "scale": module_scale(trained.config, next(iter(trained.factors))),
            "extra_tensors": sorted(trained.extra), "base_model_name_or_path": config.get("base_model_name_or_path"),
            "base_model_found": base is not None}
