"""What a decomposition quantized: the share of the checkpoint's weights that ended up 4-bit.

A report of quantization errors over the targets says nothing about the weights that were not targets:
on an MoE checkpoint whose experts were not decomposed, a "4-bit" output could keep 95% of its weights
in bf16. So every report counts the checkpoint's tensors (element counts from the safetensors headers)
in four groups that sum to the whole checkpoint:

- ``quantized_4bit``: targets stored NF4 (quantized methods);
- ``targets_source_dtype``: targets whose residual stays in the source dtype (``lora``, ``pissa``);
- ``non_targets``: tensors inside blocks left as they are (non-target linears, routers, norms, biases);
- ``embeddings_heads``: tensors outside blocks (embedding tables, LM/pooler heads).

When less than half is 4-bit, :func:`warning` names the largest untouched group of tensors (names with
their indices replaced by ``*``) and the flag that changes it.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Iterable

from qpissa.formats import TensorInfo, byte_size

GROUPS = ("quantized_4bit", "targets_source_dtype", "non_targets", "embeddings_heads")
LABELS = {"quantized_4bit": "4-bit NF4", "targets_source_dtype": "targets kept in source dtype",
          "non_targets": "non-targets kept in source dtype", "embeddings_heads": "embeddings/heads in source dtype"}
WARN_BELOW = 0.5
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")
_IN_BLOCK = re.compile(r"(^|\.)\d+(\.|$)")


def pattern(name: str) -> str:
    """``model.layers.3.mlp.experts.7.up_proj.weight`` → ``model.layers.*.mlp.experts.*.up_proj.weight``."""
    return _INDEX.sub("*", name)


def group_of(info: TensorInfo, target_names: set[str], quantized: bool, router_names: set[str] = frozenset(),
             plain_targets: set[str] = frozenset()) -> str:
    """Which of :data:`GROUPS` tensor ``info`` belongs to."""
    if info.name in target_names:
        return "quantized_4bit" if quantized and info.name not in plain_targets else "targets_source_dtype"
    if _IN_BLOCK.search(info.name) or info.name in router_names:
        return "non_targets"
    return "embeddings_heads"


def coverage(tensors: Iterable[TensorInfo], target_names: Iterable[str], quantized: bool,
             router_names: Iterable[str] = (), plain_targets: Iterable[str] = ()) -> dict:
    """Counts and shares per group, the source dtypes, and the largest untouched tensor groups.

    ``target_names``: the checkpoint tensors decomposed; ``quantized``: whether their residual is NF4;
    ``router_names``: MoE router/gate weights (kept in source dtype by design, reported as such);
    ``plain_targets``: targets whose residual is not NF4 although the method quantizes (``--experts-dtype bfloat16``)."""
    targets, routers, plain = set(target_names), set(router_names), set(plain_targets)
    params: dict[str, int] = defaultdict(int)
    source_bytes: dict[str, int] = defaultdict(int)
    dtypes: dict[str, set[str]] = defaultdict(set)
    untouched: dict[tuple[str, str], int] = defaultdict(int)
    router_params = 0
    for info in tensors:
        group, n = group_of(info, targets, quantized, routers, plain), math.prod(info.shape)
        params[group] += n
        source_bytes[group] += byte_size(info.shape, info.dtype)
        dtypes[group].add(info.dtype)
        router_params += n if info.name in routers else 0
        if group != "quantized_4bit":
            untouched[(group, pattern(info.name))] += n
    total = sum(params.values())
    biggest = sorted(untouched.items(), key=lambda kv: -kv[1])[:5]
    return {"total_params": total,
            "groups": {g: {"params": params[g], "share": params[g] / total if total else 0.0,
                           "source_bytes": source_bytes[g], "source_dtypes": sorted(dtypes[g])} for g in GROUPS},
            "router_params": router_params,
            "largest_untouched": [{"group": g, "tensors": p, "params": n, "share": n / total if total else 0.0}
                                  for (g, p), n in biggest]}


def flag_for(group: str, tensors: str) -> str:
    """The flag that changes where ``group`` (a tensor name pattern ``tensors``) ends up."""
    if group == "targets_source_dtype":
        if ".experts." in tensors:
            return "--experts-dtype nf4 (the default) stores experts in 4-bit NF4"
        return "--method qpissa (or qlora, loftq) stores targets in 4-bit NF4"
    if group == "embeddings_heads":
        return "no flag quantizes embeddings/heads; they stay in source dtype as in QLoRA"
    module = tensors.rsplit(".", 1)[0] if tensors.endswith((".weight", ".bias")) else tensors
    name = module.replace(".", r"\.").replace("*", r"\d+")
    return f"--targets '{name}' (plus the default targets' names) makes it a target"


def experts_line(experts: dict) -> str:
    """What happened to an MoE model's experts (the report's ``experts`` section, :mod:`qpissa.decompose.experts`)."""
    line = (f"MoE experts: {experts['matrices']:,} expert matrices ({experts['experts']:,} experts in "
            f"{experts['modules']} layers, {experts['layout']} layout) decomposed one by one with {experts['method']}, "
            f"residual {experts['residual']}")
    if experts.get("calibrated"):
        line += f"; {experts['calibrated']:,} calibrated on the tokens routed to their expert"
    if experts.get("calibration_fallback"):
        line += (f"; {experts['calibration_fallback']:,} of them fell back to the uncalibrated "
                 f"{experts.get('fallback_method', experts['method'])} (their expert was routed fewer than "
                 f"{experts.get('min_routed_tokens', '--calib-expert-tokens')} calibration tokens)")
    return line


def lines(cov: dict, experts: dict | None = None) -> list[str]:
    """Human lines: the share per group (and the experts line of an MoE model), then the warning if under half
    is 4-bit."""
    g = cov["groups"]
    parts = [f"{100 * g[k]['share']:.1f}% {LABELS[k]}" for k in GROUPS if g[k]["params"] or k == "quantized_4bit"]
    out = [f"weights quantized: {'; '.join(parts)} (of {cov['total_params']:,} checkpoint weights)"]
    if experts:
        out.append(experts_line(experts))
    if cov.get("router_params"):
        tensors = ((experts or {}).get("routers") or {}).get("tensors")
        named = f": {', '.join(tensors)}" if tensors else ""
        out.append(f"MoE routers and gates ({cov['router_params']:,} weights) stay in their source dtype by design{named}")
    if cov.get("built_at_load"):
        b = cov["built_at_load"]
        out.append(f"{b['modules']:,} linears that transformers builds at load from {', '.join(b['from'])} stay in "
                   "their source dtype without an adapter (no checkpoint tensor of their own): "
                   f"{', '.join(b['tensors'])}")
    warn = warning(cov)
    return out + ([warn] if warn else [])


def warning(cov: dict) -> str | None:
    """One line when less than :data:`WARN_BELOW` of the weights are 4-bit: the biggest untouched group and
    the flag that changes it; None otherwise."""
    share = cov["groups"]["quantized_4bit"]["share"]
    if share >= WARN_BELOW or not cov["largest_untouched"]:
        return None
    top = cov["largest_untouched"][0]
    return (f"warning: only {100 * share:.1f}% of the weights are 4-bit; the biggest untouched group is "
            f"{top['tensors']} ({100 * top['share']:.1f}%, {LABELS[top['group']]}): {flag_for(top['group'], top['tensors'])}")
