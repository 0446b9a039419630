"""What each weight of an MoE model is for, read from the model's modules on the meta device (no weights).

A name list per family breaks on the next family (Granite's experts have no ``experts`` on disk, Phi-MoE's router is
``gate`` on disk and ``router`` in memory, Hunyuan's router is a Linear ``gate.wg``, Qwen2-MoE has a [1, H]
``shared_expert_gate``). Roles come from structure instead:

- **routed experts**: a module holding 3-D parameters [E, ·, ·] (transformers 5 fuses every family's experts so);
  ``is_transposed`` on it (gpt-oss) means [E, in, out], else [E, out, in] (as PEFT reads it: Llama-4's unflagged
  [E, H, 2I] is taken as stored, by PEFT and here alike). Its 2-D [E, ·] parameters are
  expert biases (gpt-oss): kept in the source dtype, never targets.
- **MoE block**: the experts module's parent. Its child whose output feeds the block's first top-k (traced on meta
  tensors, :func:`routing_children`) is the **router**, and any other child holding a single matrix a **gate**
  (``shared_expert_gate`` [1, H]): never targets, never 4-bit, whatever their shape; the report lists them. Other
  children with two or more linear layers are shared experts (MLPs: ordinary linear targets); another experts
  module beside it (JetMoE's ``input_linear`` and ``output_linear``) is experts too, no router.
- experts held otherwise (DBRX's [E·I, H] parameters under ``experts``, Doge's embedding tables whose rows a
  top-k picks): refused in one line (:func:`roles_of`), never left in bf16 beside a targeted router.
- dense MLPs outside MoE blocks (DeepSeek-V3's first layers) are plain linear targets.

Checkpoint names map to the model's names with transformers' own conversion mapping for the family
(:func:`checkpoint_map`), so per-expert files (``experts.{e}.w1``), renamed fused files (Granite's
``input_linear``) and fused files all land on the parameter they load into.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qpissa.errors import UserError

IN_BLOCK = re.compile(r"(^|\.)\d+\.")  # a module inside a numbered block (``model.layers.3.mlp.experts``)


@dataclass(frozen=True)
class ExpertParam:
    """One fused expert parameter of the model: ``module.name`` of shape [E, a, b]."""

    module: str  # the experts module, e.g. model.layers.1.mlp.experts
    name: str  # the parameter, e.g. gate_up_proj
    shape: tuple[int, int, int]
    transposed: bool  # stored [E, in, out] (the module's ``is_transposed``), else [E, out, in]

    @property
    def key(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def matrix(self) -> tuple[int, int]:
        """(out, in) of one expert as the math sees it."""
        _, a, b = self.shape
        return (b, a) if self.transposed else (a, b)


@dataclass(frozen=True)
class Roles:
    """Roles of the model's weights, by their names in the loaded model."""

    experts: dict[str, ExpertParam] = field(default_factory=dict)  # "module.param" → parameter
    routers: tuple[str, ...] = ()  # router/gate modules (never targets)
    expert_biases: tuple[str, ...] = ()  # "module.param" of [E, out] expert biases (source dtype)
    shared: tuple[str, ...] = ()  # shared-expert modules inside MoE blocks (ordinary linear targets)

    def is_router(self, module: str) -> bool:
        """Whether ``module`` (a module or parameter name) is a router/gate or lies inside one."""
        return any(module == r or module.startswith(r + ".") for r in self.routers)


def _linears(module: torch.nn.Module) -> int:
    from transformers.pytorch_utils import Conv1D

    return sum(isinstance(m, (torch.nn.Linear, Conv1D)) for m in module.modules())


class _Routed(Exception):
    """Raised at the MoE block's first top-k: the routing is known, the experts need not run."""


def routing_children(block: torch.nn.Module, hidden: int) -> set[str] | None:
    """Names of ``block``'s children whose output feeds its first top-k (or that run it), by running the block on
    meta tensors and following which module's output each tensor derives from; None when the block cannot run so."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    taint: dict[int, frozenset[str]] = {}
    keep: list[torch.Tensor] = []  # tensors stay alive so their ids are not reused
    active: list[str] = []
    found: set[str] = set()

    def mark(out, names: frozenset[str]) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                taint[id(t)] = taint.get(id(t), frozenset()) | names
                keep.append(t)

    class Trace(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            sources = frozenset().union(*(taint.get(id(t), frozenset()) for t in tree_leaves((args, kwargs))
                                          if isinstance(t, torch.Tensor)))
            if getattr(func, "__name__", "") in ("topk", "argmax", "argsort", "sort"):
                found.update(sources | set(active[:1]))
                raise _Routed
            out = func(*args, **kwargs)
            mark(out, sources)
            return out

    def leave(name: str, out) -> None:  # returns None: the child's output stays as it is
        active.pop()
        mark(out, frozenset({name}))

    hooks = []
    for name, child in block.named_children():
        hooks.append(child.register_forward_pre_hook(lambda m, a, name=name: active.append(name) and None))
        hooks.append(child.register_forward_hook(lambda m, a, out, name=name: leave(name, out)))
    try:
        with Trace():
            block(torch.zeros(1, 4, hidden, device="meta"))
    except _Routed:
        return found
    except Exception:  # noqa: BLE001 - a block that does not run on meta tensors: the structural rule decides
        return None
    finally:
        for h in hooks:
            h.remove()
    return None


def _stacks(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own 3-D parameters (a convolution's kernel is 3-D too: none)."""
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return {}
    return {p: t for p, t in module.named_parameters(recurse=False) if t.ndim == 3}


def model_roles(model: torch.nn.Module) -> Roles:
    """:class:`Roles` of a (meta-device) model; see the module docstring."""
    experts: dict[str, ExpertParam] = {}
    biases, routers, shared = [], [], []
    modules = dict(model.named_modules())
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    holders = dict.fromkeys(n for n, m in modules.items()  # JetMoE: two experts modules a block; only inside
                            if _stacks(m) and IN_BLOCK.search(n))  # numbered blocks (Inkling-2 Loop's model-level
    # message queries [loops, 4, H] are no experts)
    for name in holders:
        module = modules[name]
        params, stacks = dict(module.named_parameters(recurse=False)), _stacks(module)
        transposed = bool(getattr(module, "is_transposed", False))
        for p, t in stacks.items():
            experts[f"{name}.{p}"] = ExpertParam(name, p, tuple(t.shape), transposed)
        n_experts = next(iter(stacks.values())).shape[0]
        biases += [f"{name}.{p}" for p, t in params.items() if t.ndim == 2 and t.shape[0] == n_experts]
        block_name = name.rsplit(".", 1)[0] if "." in name else ""
        block = modules[block_name]
        routing = routing_children(block, hidden) if hidden else None
        for child, sub in block.named_children():
            full = f"{block_name}.{child}" if block_name else child
            if full in holders or full in routers or full in shared:  # another experts module, or seen already
                continue
            matrices = any(p.ndim >= 2 for p in sub.parameters())
            if routing is not None and child in routing and matrices:
                routers.append(full)  # its output picks the experts: whatever its shape or layers
            elif _linears(sub) >= 2:
                shared.append(full)
            elif matrices:
                routers.append(full)  # a gate of one matrix (shared_expert_gate [1, H]) or a router not traced
    return Roles(experts, tuple(routers), tuple(biases), tuple(shared))


def expert_order(model_dir: Path) -> dict[str, list[str]]:
    """Experts module → its fused parameters in registration order (PEFT nests their LoRA wrappers so)."""
    order: dict[str, list[str]] = {}
    for param in roles_of(model_dir).experts.values():
        order.setdefault(param.module, []).append(param.name)
    return order


def meta_model(model_dir: str) -> tuple[torch.nn.Module, str]:
    """The model of ``model_dir``'s config.json built on the meta device, and its architecture class name (cached
    while config.json is unchanged: targets, experts and routers are read from one build)."""
    try:
        stamp = (Path(model_dir) / "config.json").stat().st_mtime_ns
    except OSError:
        stamp = 0
    return _meta_model(str(Path(model_dir).resolve()), stamp)


@functools.lru_cache(maxsize=4)
def _meta_model(model_dir: str, _stamp: int) -> tuple[torch.nn.Module, str]:
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as err:  # noqa: BLE001 - any config failure is the user's file
        raise UserError(f"{Path(model_dir) / 'config.json'}: cannot read model config ({err})") from None
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise UserError(f"{Path(model_dir) / 'config.json'}: unknown architecture {arch!r}; "
                        "set 'architectures' to a transformers model class")
    with torch.device("meta"):
        return cls(config), arch


def roles_of(model_dir: Path) -> Roles:
    """:func:`model_roles` of ``model_dir``; an architecture without 3-D parameters (every dense family) is answered
    from config.json alone when it names no MoE keys (no transformers import)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and not any(re.search(r"expert", k) for k in config) \
            and not any(isinstance(v, dict) and any("expert" in k for k in v) for v in config.values()):
        return Roles()
    model = meta_model(str(model_dir))[0]
    roles = model_roles(model)
    if not roles.experts:  # experts that are no [E, ·, ·] parameter (DBRX's [E·I, H]): refused, never left bf16
        modules = dict(model.named_modules())
        for name, param in model.named_parameters():
            owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
            if ".experts." in f".{name}" and param.ndim >= 2 and not isinstance(owner, torch.nn.Linear):
                raise UserError(f"{model_dir}: the experts are held as {name} {list(param.shape)}, not as one "
                                "[experts, out, in] parameter per kind; this expert layout is not supported")
        _refuse_expert_tables(model, model_dir)
    return roles


def _refuse_expert_tables(model: torch.nn.Module, model_dir: Path) -> None:
    """Experts held as embedding tables inside a block whose rows a router's top-k picks (Doge's CDMoE: one expert a
    row of ``down_embed``/``up_embed`` [E, H]): no [E, out, in] stack to make NF4 with an adapter, and no
    ``nn.Linear`` that transformers loads 4-bit. Refused in one line rather than left in bf16 beside a router that
    would be made a target."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    for name, module in model.named_modules():
        tables = {c: m.weight for c, m in module.named_children() if isinstance(m, torch.nn.Embedding)}
        if tables and hidden and re.search(r"(^|\.)\d+(\.|$)", name) and routing_children(module, hidden):
            held = ", ".join(f"{name}.{c}.weight {list(w.shape)}" for c, w in tables.items())
            raise UserError(f"{model_dir}: the experts are held as embedding tables {held} whose rows the router's "
                            "top-k picks, not as one [experts, out, in] parameter per kind; this expert layout is "
                            "not supported")


def checkpoint_map(model_dir: Path, names: list[str]) -> dict[str, tuple[str, int | None, int]]:
    """Checkpoint tensor name → (its name in the model, expert index or None, part) by transformers' conversion
    mapping of the family: per-expert tensors merged into a fused parameter get their expert index and which part
    of a concatenation they are (0 gate, 1 up); anything else maps by renaming alone (expert None, part 0).
    A tensor that a conversion of another kind makes (split, concatenated or transposed) keeps its checkpoint name:
    no model name collides with it, so it is never read as a target, a router or an expert."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    out: dict[str, tuple[str, int | None, int]] = {}
    for name, (new, pattern, conv) in _conversions(model_dir, names).items():
        if pattern is None:
            out[name] = (new, None, 0)
            continue
        ops = [(type(o), getattr(o, "dim", None)) for o in conv.operations]
        if _row_order(conv, pattern) is not None:  # a stack loaded as stored, or with its rows de-interleaved
            out[name] = (new, None, 0)
            continue
        if ops not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]):
            out[name] = (name, None, 0)  # split q/k/v, concatenated convolutions, transposed kernels: no target
            continue  # reads it (a target that needs it is refused by its lookup); it is copied as it is
        m = (re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), name)
             or re.search(pattern.replace("*", r"(\d+)"), name))  # a pattern written as a regex (``\.experts.*.w1``)
        if m is None or not m.groups():
            raise UserError(f"{model_dir}: cannot read the expert index of tensor {name} (pattern {pattern})")
        out[name] = (new, int(m.group(1)), conv.source_patterns.index(pattern))
    return out


def interleaved(model_dir: Path, names: list[str]) -> set[str]:
    """The checkpoint tensors transformers de-interleaves along their rows on load: Inkling-2 stores each expert's
    gate and up rows alternating (``w13_weight``, ``Interleave(dim=1)``), the model holds gate rows, then up rows."""
    return {name for name, (_, pattern, conv) in _conversions(model_dir, names).items()
            if pattern is not None and _row_order(conv, pattern) == "interleaved"}


def _row_order(conv, pattern: str) -> str | None:
    """What the family's converter does to one stored stack [E, rows, cols], found by running transformers' own
    operations on a probe of row numbers: "same" (the stack as stored, e.g. a dequantize that passes a 16-bit tensor
    through), "interleaved" (rows 0, 2, 4, … then 1, 3, 5, …), or None (anything else: split, merged,
    transposed)."""
    probe = torch.arange(8, dtype=torch.float32).reshape(1, 8, 1)
    state: dict = {pattern: [probe]}
    try:
        for op in conv.operations:
            state = op.convert(state, [pattern], conv.target_patterns, model=None, full_layer_name=None)
    except Exception:  # noqa: BLE001 - an operation that needs more than this one tensor: not a plain stack
        return None
    result = next(iter(state.values())) if len(state) == 1 else None
    result = result[0] if isinstance(result, list) and len(result) == 1 else result
    if not isinstance(result, torch.Tensor) or result.shape != probe.shape:
        return None
    order = result.reshape(-1)
    if torch.equal(order, probe.reshape(-1)):
        return "same"
    return "interleaved" if torch.equal(order, torch.cat([probe.reshape(-1)[0::2], probe.reshape(-1)[1::2]])) else None


def _conversions(model_dir: Path, names: list[str]) -> dict[str, tuple[str, str | None, object]]:
    """Checkpoint name → (renamed name, the converter's source pattern or None, the converter or None)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(meta_model(str(model_dir))[0], add_legacy=False)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    out = {}
    for name in names:
        new, pattern = rename_source_key(name, renamings, converters)
        conv = None if pattern is None else next(c for c in converters if pattern in c.source_patterns)
        out[name] = (new, pattern, conv)
    return out
