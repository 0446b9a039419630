"""PEFT LoRA adapter dirs, both ways: :func:`read_adapter` and what we write (:func:`adapter_config`,
:func:`adapter_key`). One place, so the keys and config fields we write are the ones we read."""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qpissa.errors import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def adapter_key(module: str, which: str) -> str:
    """PEFT's saved key for a LoRA factor: base_model.model.<module>.lora_A.weight."""
    return f"base_model.model.{module}.{which}.weight"


def expert_wrapper(experts_module: str, kind: str, kinds: list[str] | None = None) -> str:
    """Where PEFT 0.21 keeps the LoRA of an MoE experts module's fused parameter ``kind`` (``target_parameters``).
    For several targeted parameters of one module it nests the wrappers in the module's parameter order
    (``kinds``, as registered): the first innermost. ``gate_up_proj`` sits in ``….experts.base_layer``,
    ``down_proj`` in ``….experts``; Nemotron-H's ``up_proj``/``down_proj`` likewise; one parameter (JetMoE) in
    the module itself. Without ``kinds``: ``gate_up_proj`` and ``down_proj``."""
    kinds = kinds or (["gate_up_proj", "down_proj"] if kind in ("gate_up_proj", "down_proj") else [kind])
    return experts_module + ".base_layer" * (len(kinds) - 1 - kinds.index(kind))


def expert_parameter(module: str, target_parameters: list[str] | None = None,
                     order: dict[str, list[str]] | None = None) -> tuple[str, str] | None:
    """The inverse of :func:`expert_wrapper`: (experts module, fused parameter) of an adapter module, or None when
    ``module`` is not an MoE experts wrapper. The experts module's targeted parameters come from the adapter
    config's block-relative ``target_parameters``, their nesting order from ``order`` (experts module → its
    parameters as registered; :attr:`qpissa.decompose.roles.Roles.experts`), else gate_up_proj/up_proj first."""
    owner, depth = module, 0
    while owner.endswith(".base_layer"):
        owner, depth = owner.removesuffix(".base_layer"), depth + 1
    kinds = [t.rsplit(".", 1)[1] for t in target_parameters or ()
             if owner == t.rsplit(".", 1)[0] or owner.endswith("." + t.rsplit(".", 1)[0])]
    if not kinds and owner.endswith(".experts"):  # an adapter config without target_parameters: the usual pair
        kinds = ["gate_up_proj", "down_proj"]
    if order and owner in order:
        kinds = [k for k in order[owner] if k in kinds]
    else:
        kinds = sorted(kinds, key=lambda k: (k != "gate_up_proj" and k != "up_proj", k))
    if depth >= len(kinds):
        return None
    return owner, kinds[len(kinds) - 1 - depth]


def adapter_config(*, base_model: str, rank: int, alpha: float, rslora: bool, target_modules: list[str],
                   fan_in_fan_out: bool, task_type: str | None, target_parameters: list[str] | None = None,
                   rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None) -> dict:
    """adapter_config.json that plain PEFT loads. ``init_lora_weights`` must be true: "pissa" here
    would make PEFT re-run PiSSA at load time and fail on a 4-bit base. PEFT's version comes from package
    metadata: importing peft (and with it transformers) only for it costs seconds."""
    from importlib.metadata import version

    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "task_type": task_type,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "use_rslora": rslora,
        "target_modules": sorted(target_modules),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
        "peft_version": version("peft"),
    }
    if target_parameters:  # MoE experts (PEFT's LoRA on 3-D parameters)
        config["target_parameters"] = sorted(target_parameters)
    if rank_pattern:  # per-module ranks (--rank-allocation error); PEFT applies them at load
        config.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern or {})
    return config


@dataclass
class Adapter:
    """A PEFT LoRA adapter dir in memory: its config and {module: (A (r×n), B (m×r))} plus other tensors."""

    path: Path
    config: dict[str, Any]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    extra: dict[str, torch.Tensor]  # tensors that are not LoRA factors (e.g. modules_to_save), kept as is


def read_adapter(path: str | Path) -> Adapter:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors``; keys ``base_model.model.<module>.lora_A.weight``."""
    path = Path(path)
    cfg_path, weights = path / "adapter_config.json", path / ADAPTER_WEIGHTS
    if not cfg_path.exists():
        raise UserError(f"{path}: no adapter_config.json; give a PEFT LoRA adapter directory")
    if not weights.exists():
        hint = " (re-save with safe_serialization=True)" if (path / "adapter_model.bin").exists() else ""
        raise UserError(f"{path}: no {ADAPTER_WEIGHTS}{hint}")
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {config.get('peft_type')!r}; only LoRA adapters are supported")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise UserError(f"{cfg_path}: {flag}=true is not supported; train without it")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{weights}: cannot read ({err}); re-save the adapter") from None
    halves: dict[str, dict[str, torch.Tensor]] = {}
    extra = {}
    for key, value in tensors.items():
        m = _FACTOR.match(key)
        if m is None:
            extra[key] = value
            continue
        module = m.group("module").removeprefix("base_model.model.")
        halves.setdefault(module, {})[m.group("which")] = value
    factors = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise UserError(f"{weights}: module {module} has only {sorted(pair)}; the adapter file is incomplete")
        a, b = pair["lora_A"], pair["lora_B"]  # (r, n), (m, r)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{weights}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                            "only linear LoRA factors (r×n, m×r) are supported")
        factors[module] = (a, b)
    if not factors:
        raise UserError(f"{weights}: no lora_A/lora_B tensors found")
    return Adapter(path, config, factors, extra)


def pattern_value(pattern: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's per-module override: the first key that matches ``(.*\\.)?key$`` (peft.utils.get_pattern_key)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: dict[str, Any], module: str) -> float:
    """s for one module as PEFT computes it: α/r, or α/√r with ``use_rslora`` (patterns applied)."""
    r = pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


V4_EXPERT_KEY = re.compile(r"\.experts\.\d+\.")  # a per-expert LoRA key: an adapter trained on transformers 4


@contextmanager
def native_targets(adapter: str | Path | None = None):
    """Load an adapter with the targets its config names. PEFT 0.21 rewrites the config of every adapter for the
    model types whose MoE layout changed in transformers 5 (deepseek_v3, glm4_moe, ernie4_5_moe, dots1, qwen2_moe,
    qwen3_moe, mixtral, …): each target ending in gate_proj/up_proj/down_proj becomes an expert parameter and the
    fused gate_up's rank doubles. That is right for a transformers 4 adapter (per-expert keys) and wrong for one
    naming transformers 5 modules (ours: dense first layers and shared experts would lose their LoRA, the experts'
    rank would not fit). Inside this context the rewrite is skipped, unless ``adapter`` holds per-expert keys; so is
    PEFT's renaming of an adapter key that already names one of the model's modules (keys that name none are renamed
    as PEFT does: an adapter saved in the checkpoint's names still loads). A renaming can match its own output and
    rename such a key again (Inkling-2's ``sconv.weight_proj`` → ``sconv.weight_proj.weight``, Laguna's
    ``mlp.shared_expert.`` → ``shared_experts.`` giving ``shared_experts..down_proj``): those LoRAs would load as
    missing keys, left at their random init."""
    try:
        import peft.utils.transformers_weight_conversion as conversion
    except ImportError:  # a PEFT without the rewrite
        yield
        return
    if adapter is not None and _has_v4_expert_keys(Path(adapter)):
        yield
        return
    original = conversion.convert_peft_config_for_transformers
    keys = getattr(conversion, "convert_peft_adapter_state_dict_for_transformers", None)
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    if keys is not None:  # PEFT imports it from this module when it loads the weights
        conversion.convert_peft_adapter_state_dict_for_transformers = _own_names_kept(keys)
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original
        if keys is not None:
            conversion.convert_peft_adapter_state_dict_for_transformers = keys


def _own_names_kept(convert: Any) -> Any:
    """PEFT's adapter-key conversion for the keys whose module the model does not have; the others as written."""
    def keep(model: Any, peft_config: Any, adapter_state_dict: dict, adapter_name: str = "default", **_: Any) -> dict:
        names = {n for n, _ in model.named_modules()}
        own = {k: v for k, v in adapter_state_dict.items()
               if (m := re.sub(r"\.lora_(A|B|embedding_A|embedding_B)\..*$", "", k)) in names
               or m.removeprefix("base_model.model.") in names}
        rest = {k: v for k, v in adapter_state_dict.items() if k not in own}
        return {**(convert(model, peft_config, rest, adapter_name) if rest else {}), **own}
    return keep


def _has_v4_expert_keys(path: Path) -> bool:
    from safetensors import safe_open

    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        return False
    with safe_open(str(weights), framework="pt") as f:
        return any(V4_EXPERT_KEY.search(k) for k in f.keys())


def load_peft(model: Any, adapter: str | Path, **kwargs: Any) -> Any:
    """``PeftModel.from_pretrained(model, adapter, **kwargs)`` with the adapter's own targets (see
    :func:`native_targets`)."""
    from peft import PeftModel

    with native_targets(adapter):
        return PeftModel.from_pretrained(model, str(adapter), **kwargs)
