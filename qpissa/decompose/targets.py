"""Which checkpoint tensors are adapter targets: linear layers found on a meta-device model.

Default: every nn.Linear (or GPT-2 Conv1D) inside a transformer block, i.e. whose module
name has a numeric layer index (``model.layers.3.self_attn.q_proj``, ``encoder.layer.0.output.dense``);
embeddings, poolers and heads stay out. ``--targets`` takes short names (``q_proj``), full
module names or regular expressions (full match on the module name).
"""
from __future__ import annotations

import functools
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from qpissa.errors import UserError
from qpissa.formats import TensorInfo, weight_key
from qpissa.decompose.architectures import known_linear_modules
from qpissa.decompose.roles import checkpoint_map, meta_model, roles_of

BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


@dataclass(frozen=True)
class Target:
    """One adapter target: a module, its checkpoint weight and its layout."""

    module: str  # module name in the loaded model, e.g. model.layers.0.self_attn.q_proj
    weight: TensorInfo  # the checkpoint tensor holding its weight
    transposed: bool  # True for Conv1D (weight stored in×out)

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) as the math sees it."""
        rows, cols = self.weight.shape
        return (cols, rows) if self.transposed else (rows, cols)


def _known_linear_modules(model_dir: Path) -> tuple[dict[str, bool], str, str | None] | None:
    """:func:`qpissa.decompose.architectures.known_linear_modules` of config.json (no transformers import); None for
    other architectures, or an unreadable config (the meta path reports it)."""
    try:
        return known_linear_modules(json.loads((model_dir / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return None


def linear_modules(model_dir: Path) -> tuple[dict[str, bool], str, str | None]:
    """{module name: is_conv1d} for every linear layer, via a weightless (meta) model; plus the
    architecture class name and PEFT task type. Architectures of :mod:`qpissa.decompose.architectures` are
    read from config.json alone (the same answer, without importing transformers)."""
    known = _known_linear_modules(model_dir)
    if known is not None:
        return known
    from transformers.pytorch_utils import Conv1D

    model, arch = meta_model(str(model_dir))
    found = {name: isinstance(mod, Conv1D) for name, mod in model.named_modules()
             if isinstance(mod, (torch.nn.Linear, Conv1D))}
    task = "CAUSAL_LM" if arch.endswith("ForCausalLM") else None
    return found, arch, task


def full_precision_modules(model_dir: Path) -> set[str]:
    """Linear modules that cannot be NF4 in a transformers 4-bit load, so no default target: those it leaves in full
    precision (NF4 bytes written for them would not load: a size mismatch), i.e. the ones the model lists in
    ``_keep_in_fp32_modules`` (DeepSeek-V4's compressor, the DSA indexers' ``weights_proj``) and subclasses of
    ``nn.Linear`` with a forward of their own (DeepSeek-V4's grouped ``o_a_proj``), and those whose parent's forward
    reads their ``weight`` itself (Inkling-2 Loop casts its input to ``down_proj.weight.dtype``: uint8 bytes when
    4-bit), and those whose 4-bit weight transformers' loader cannot read back by their name (:func:`bnb_loadable`).
    Read from the meta model; the architectures of :mod:`qpissa.decompose.architectures` have none."""
    if _known_linear_modules(model_dir) is not None:
        return set()
    from transformers.quantizers.quantizers_utils import should_convert_module

    model, _ = meta_model(str(model_dir))
    keep = sorted(getattr(model, "_keep_in_fp32_modules", None) or [])
    modules = dict(model.named_modules())
    out = set()
    for name, mod in modules.items():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if (type(mod) is not torch.nn.Linear or (keep and not should_convert_module(name, keep))
                or _weight_read_above(name, modules) or not bnb_loadable(name)):
            out.add(name)
    return out


def built_at_load(model_dir: Path) -> dict[str, str]:
    """Linear modules whose weight transformers makes at load from another checkpoint tensor by a conversion that is
    not the experts' stacking (a fused q/k/v split into q_proj/k_proj/v_proj, a transposed kernel: Sarvam-MoE,
    Param2-MoE, LARA, Ergo) → the source pattern. Their weight is no checkpoint tensor, so no per-tensor target: by
    default they stay as transformers builds them, in the source dtype without an adapter, and the report lists
    them; routers and gates are left out (never targets, kept by design). Empty for families without such
    conversions (and for the architectures of :mod:`qpissa.decompose.architectures`, answered without importing
    transformers)."""
    if _known_linear_modules(model_dir) is not None:
        return {}
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    model, _ = meta_model(str(model_dir))
    roles = roles_of(model_dir)
    out: dict[str, str] = {}
    for conv in get_model_conversion_mapping(model, add_legacy=False):
        if not isinstance(conv, WeightConverter) or all(isinstance(o, (MergeModulelist, Concatenate))
                                                        for o in conv.operations):
            continue  # the experts' stacking: read per expert by qpissa.decompose.experts
        source = ", ".join(p.replace("\\", "") for p in conv.source_patterns)
        for target in conv.target_patterns:
            tail = re.sub(r"\\?\.weight$", "", target).replace("*", r"\d+")
            try:
                found = re.compile(r"(^|\.)" + tail + "$")
            except re.error:
                continue
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and found.search(name) and not roles.is_router(name):
                    out[name] = source
    return out


def _weight_read_above(name: str, modules: dict[str, torch.nn.Module]) -> bool:
    """Whether the forward of a module above ``name`` reads its ``weight`` itself (``self.down_proj.weight.dtype``
    in its parent, Ergo's ``self.self_attn.o_proj.weight.dtype`` in the decoder layer): a uint8 dtype when 4-bit."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, max(len(parts) - 4, 0), -1):  # parent, grandparent, great-grandparent
        rel = re.escape(".".join(parts[depth:]))
        if re.search(rf"self\.{rel}\.weight\b(?!\.(device|shape|size))",
                     _forward_source(type(modules[".".join(parts[:depth])]))):
            return True
    return False


def bnb_loadable(module: str) -> bool:
    """Whether transformers' bitsandbytes loader reads a 4-bit weight of ``module`` back. It finds a weight's quant
    state (``….weight.absmax``, ``….weight.quant_map``, …) by matching those suffixes, and a module whose own name
    ends in ``weight`` (Qwen4-Exp's hyper-connection ``block_inject_weight``) has them matched at its name instead:
    its NF4 bytes load without their quant state and PEFT fails on the module. Asked of transformers' own matching,
    for names holding ``weight`` only."""
    if "weight" not in module.rsplit(".", 1)[-1]:
        return True
    try:
        from transformers.core_model_loading import WeightConverter, rename_source_key
        from transformers.integrations.bitsandbytes import Bnb4bitDeserialize
        from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    except ImportError:  # another transformers: its own load says what it cannot read
        return True
    names = Bnb4BitHfQuantizer.serialized_names["weight"]
    converter = WeightConverter(names, "weight", [Bnb4bitDeserialize(None)])
    return all(rename_source_key(f"{module}.{n}", [], [converter])[0] == f"{module}.weight" for n in names)


@functools.lru_cache(maxsize=256)
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _checkpoint_key(module: str, by_name: dict[str, TensorInfo]) -> TensorInfo | None:
    """The checkpoint tensor for ``module.weight`` (see :func:`qpissa.formats.weight_key`)."""
    key = weight_key(module, by_name)
    return None if key is None else by_name[key]


def matches(module: str, patterns: list[str]) -> bool:
    """Short name (suffix after a dot), exact module name, or a full-match regex."""
    for pat in patterns:
        if module == pat or module.endswith("." + pat):
            return True
        try:
            if re.fullmatch(pat, module):
                return True
        except re.error:
            continue
    return False


def check_patterns(patterns: list[str]) -> None:
    """Every --targets pattern must compile, even when another one matches (no silent drop)."""
    for pat in patterns:
        try:
            re.compile(pat)
        except re.error as err:
            raise UserError(f"--targets {pat!r}: not a valid regular expression ({err}); fix or remove it") from None


def model_type_of(model_dir: Path) -> str | None:
    """config.json's ``model_type`` (None when unreadable: the meta-model path reports that)."""
    try:
        return json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def peft_accepts(model_type: str | None, module: str) -> bool:
    """Whether PEFT takes a LoRA on ``module``: it refuses a Mamba mixer's ``out_proj``/``conv1d`` in Mamba-based
    model types (Nemotron-H), so a default target there would make every load fail. Asked of PEFT itself, for
    those two names only: any other module is taken without importing PEFT (and transformers), as decompose of a
    dense model never needs them."""
    if module.rsplit(".", 1)[-1] not in ("out_proj", "conv1d"):
        return True
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:  # another PEFT: its own load says what it refuses
        return True
    stub = torch.nn.Module()
    stub.config = type("Config", (), {"model_type": model_type})()
    try:
        _check_lora_target_modules_mamba(LoraConfig(), stub, module.rsplit(".", 1)[-1])
    except ValueError:
        return False
    return True


def find_targets(model_dir: Path, tensors: list[TensorInfo], patterns: list[str] | None) -> tuple[list[Target], list[str], str, str | None]:
    """Resolve targets; returns (targets, non-target linear module names, arch, task type)."""
    if patterns:
        check_patterns(patterns)
    linears, arch, task = linear_modules(model_dir)
    by_name = {t.name: t for t in tensors}
    roles = roles_of(model_dir)
    if roles.experts:  # an MoE model: checkpoint names as the model reads them (Phi-MoE's gate is its router)
        mapped = checkpoint_map(model_dir, list(by_name))
        by_name = {new: by_name[old] for old, (new, expert, _) in mapped.items() if expert is None}
    targets, others = [], []
    model_type = model_type_of(model_dir)
    full = full_precision_modules(model_dir)
    built: dict[str, str] | None = None
    for module, conv in linears.items():
        chosen = matches(module, patterns) if patterns else bool(BLOCK_INDEX.search(module))
        chosen = chosen and not roles.is_router(module)  # routers and gates: never targets (the report lists them)
        if chosen and not peft_accepts(model_type, module):
            if patterns:
                raise UserError(f"--targets: PEFT refuses a LoRA on {module} in this architecture (a Mamba mixer's "
                                "out_proj/conv1d); leave it out of --targets")
            chosen = False  # the default leaves it out, as a non-target
        if chosen and module in full:
            if patterns:
                raise UserError(f"--targets: {module} cannot be 4-bit in this architecture (the model keeps it in "
                                "fp32, gives it a forward of its own or reads its weight, or transformers' 4-bit "
                                "loader misreads its name); leave it out of --targets")
            chosen = False
        if not chosen:
            others.append(module)
            continue
        info = _checkpoint_key(module, by_name)
        if info is None and built is None:
            built = built_at_load(model_dir)  # once, and only when a target has no tensor
        if info is None and (source := built.get(module)) is not None:
            if patterns:
                raise UserError(f"--targets: transformers builds {module} at load from {source} (a split, "
                                "concatenated or transposed tensor), which is not decomposed; leave it out of "
                                "--targets")
            others.append(module)  # the default: kept as transformers builds it, in the source dtype (reported)
            continue
        if info is None or len(info.shape) != 2:
            what = "no tensor" if info is None else f"a {len(info.shape)}-D tensor {info.name}"
            raise UserError(f"{model_dir}: target module {module} has {what} for {module}.weight in the checkpoint; "
                            "exclude it with --targets or fix the checkpoint")
        targets.append(Target(module, info, conv))
    if not targets:
        what = f"--targets {' '.join(patterns)}" if patterns else "the default (linear layers inside blocks)"
        raise UserError(f"{model_dir}: no linear layer matches {what}; "
                        f"examples of names here: {', '.join(list(linears)[:4])}")
    return targets, others, arch, task


def moe_lora_targets(model_dir: Path) -> tuple[list[str], list[str]] | None:
    """(target_modules, target_parameters) of a plain LoRA on an (unquantized) MoE model, by decompose's rule:
    every linear inside the blocks but routers/gates (and what PEFT refuses), plus the experts' fused parameters by
    their name inside a block; the linears that only a 4-bit load excludes stay targets here. None for a dense model (PEFT's ``all-linear`` is then the same set). Why: PEFT's
    ``all-linear`` puts a LoRA on routers that are ``nn.Linear`` (Llama-4, Hunyuan, Qwen2-MoE's shared-expert gate)
    and none on the experts, so the LoRA baseline would train what every other method leaves untouched."""
    from qpissa.decompose.report import layer_type

    roles = roles_of(model_dir)
    if not roles.experts:
        return None
    linears, _, _ = linear_modules(model_dir)
    kind = model_type_of(model_dir)
    modules = sorted(m for m in linears if BLOCK_INDEX.search(m) and not roles.is_router(m) and peft_accepts(kind, m))
    params = sorted({f"{layer_type(p.module + '.x').rsplit('.', 1)[0]}.{p.name}" for p in roles.experts.values()})
    return modules, params
