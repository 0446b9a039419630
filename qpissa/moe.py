"""Load a decompose output whose MoE experts are NF4: ``qpissa.moe.load(OUT)``.

transformers 5 + bitsandbytes 0.50 quantize only ``nn.Linear``, so fused expert parameters
(``mlp.experts.gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) cannot be loaded 4-bit by them
(bitsandbytes#1849). Here each fused parameter keeps its experts' NF4 bytes in bitsandbytes' per-expert layout
(:class:`NF4ExpertStack`: packed codes, fp32 absmax, the 16 NF4 levels) and the dense parameter is a
zero-stride placeholder of the right shape (2 bytes of storage). A pre-hook on the MoE block dequantizes the
layer's stacks into the parameters just before the block runs and a hook drops them after, so memory holds the
4-bit bytes plus one layer's stack while it runs. PEFT's ``target_parameters`` LoRA wraps the experts module as
usual: its parametrization adds s·B·A to whatever the parameter holds when the experts run.
transformers never materializes the experts in ``dtype``: their parameters stay placeholders while it loads the
rest block by block (:mod:`qpissa.moe_meta`), so the load peaks at about the 4-bit bytes + one block.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from qpissa.errors import UserError
from qpissa.moe_meta import placeholder
from qpissa.quant import absmax_fp32

CONFIG_KEY = "qpissa_nf4_experts"  # written by decompose into OUT/residual/config.json
NF4_EXPERTS_FILE = "nf4-experts.safetensors"  # the experts' NF4 bytes in OUT/residual (transformers does not read it)
IN_BLOCK = re.compile(r"(^|\.)\d+\.")  # experts live in numbered blocks (a loop's model-level 3-D queries: no experts)
DEQUANT_WEIGHTS = 1 << 24  # weights per batched dequantize call (64 MiB of fp32 temporaries)


class NF4ExpertStack(nn.Module):
    """One fused expert parameter in NF4: ``packed`` (E, ⌈out·in/2⌉) uint8, high nibble first; ``absmax``
    (E, out·in/blocksize) fp32; ``code`` (16,) the NF4 levels (bitsandbytes' storage, double quant undone)."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                 shape: tuple[int, int], transposed: bool = False) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("code", code)
        self.blocksize, self.shape = blocksize, tuple(shape)
        self.transposed = transposed  # the model stores the parameter [E, in, out] (``is_transposed``: gpt-oss)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """(E, out, in) in ``dtype`` ((E, in, out) when ``transposed``, as the model stores it), in batched calls of
        ≤ :data:`DEQUANT_WEIGHTS` weights (their fp32 temporaries); one expert at a time only when an expert's weights
        do not fill whole NF4 blocks."""
        from qpissa.nf4_cpu import dequantize_nf4_cpu  # plain torch, any device: code[q]·absmax in flat order

        e, (m, n) = self.packed.shape[0], self.shape
        result = torch.empty(e, *((n, m) if self.transposed else (m, n)), dtype=dtype, device=self.packed.device)
        per = max(1, DEQUANT_WEIGHTS // (m * n)) if (m * n) % self.blocksize == 0 and (m * n) % 2 == 0 else 1
        for i in range(0, e, per):
            j = min(e, i + per)
            w = dequantize_nf4_cpu(self.packed[i:j].reshape(-1), self.absmax[i:j].reshape(-1), self.code,
                                   self.blocksize, (j - i, m, n))
            result[i:j] = w.transpose(1, 2) if self.transposed else w
        return result


def stack_from_state(states: list[dict[str, torch.Tensor]], shape: tuple[int, int],
                     transposed: bool = False) -> NF4ExpertStack:
    """An :class:`NF4ExpertStack` from per-expert bitsandbytes state dicts (``""`` → packed, ``absmax``, …)."""
    import bitsandbytes.functional as bnbf

    packed, absmax, code, blocksize = [], [], None, None
    for state in states:
        qs = bnbf.QuantState.from_dict({k: v for k, v in state.items() if k}, device=torch.device("cpu"))
        if qs.quant_type != "nf4":
            raise UserError(f"expert weights must be NF4, found {qs.quant_type}")
        packed.append(state[""].reshape(-1))
        absmax.append(absmax_fp32(qs))  # double quant undone as bitsandbytes does
        code, blocksize = qs.code.float(), int(qs.blocksize)
    return NF4ExpertStack(torch.stack(packed), torch.stack(absmax), code, blocksize, shape, transposed)


def read_nf4_states(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{experts}.{e}.{kind}`` → its NF4 state dict, read from the residual's NF4 experts file ``path``."""
    import re

    from safetensors import safe_open

    pattern = re.compile(r"(.+\.\d+\.[^.]+)\.weight(?:\.(.+))?")  # {experts}.{e}.{param}.weight[.state]
    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if m := pattern.fullmatch(key):
                out.setdefault(m[1], {})[m[2] or ""] = f.get_tensor(key)
    return out


def attach_nf4_experts(model: nn.Module, residual: Path, file: str = NF4_EXPERTS_FILE,
                       dtype: torch.dtype | None = None) -> int:
    """Give every experts module of ``model`` its NF4 stacks from ``residual`` and the dequantizing hooks; returns
    the number of fused parameters made 4-bit. A missing expert is an error, not a random weight."""
    if not (residual / file).is_file():
        raise UserError(f"{residual / file} is missing; re-run qpissa decompose into this folder")
    states = read_nf4_states(residual / file)
    count = 0
    modules = dict(model.named_modules())
    for full, experts in modules.items():
        fused = {k: p for k, p in experts.named_parameters(recurse=False) if p.ndim == 3}
        if not fused or not IN_BLOCK.search(full) or isinstance(experts, nn.modules.conv._ConvNd):
            continue
        name, transposed = full.rsplit(".", 1)[0], bool(getattr(experts, "is_transposed", False))
        block = modules[name]  # the MoE block: the experts' parent module
        stacks = {}
        for kind, param in fused.items():
            keys = [f"{full}.{e}.{kind}" for e in range(param.shape[0])]
            missing = [k for k in keys if k not in states]
            if missing:
                raise UserError(f"{residual}: no NF4 expert weights for {', '.join(missing[:3])}; "
                                "re-run qpissa decompose (its --experts-dtype nf4 output) into this folder")
            shape = tuple(param.shape[1:])
            stack = stack_from_state([states.pop(k) for k in keys], shape[::-1] if transposed else shape, transposed)
            experts.add_module(f"nf4_{kind}", stack.to(param.device))
            param.requires_grad_(False)
            param.data = placeholder(param, dtype=dtype)  # the load's dtype (transformers may make missing ones another)
            stacks[kind] = param
            count += 1
        if stacks:  # the block's hooks, and the experts module's own for blocks that call it outside its forward
            running: list[bool] = []  # (JetMoE's attention calls its experts' ``map``/``reduce``, not the block)
            block.register_forward_pre_hook(_fill(experts, stacks, running, block=True))
            block.register_forward_hook(_drop(stacks, running, block=True))
            experts.register_forward_pre_hook(_fill(experts, stacks, running))
            experts.register_forward_hook(_drop(stacks, running))
    return count


def _fill(experts: nn.Module, stacks: dict[str, nn.Parameter], running: list[bool], block: bool = False):
    """Dequantize the stacks into the parameters (once: the experts' hook inside a running block finds them full)."""
    def hook(_module, _args):
        if block:
            running.append(True)
        elif running:
            return
        for kind, param in stacks.items():
            param.data = getattr(experts, f"nf4_{kind}").dequantize(param.dtype)
    return hook


def _drop(stacks: dict[str, nn.Parameter], running: list[bool], block: bool = False):
    """Back to placeholders when the block ends (or the experts module, called outside a running block)."""
    def hook(_module, _args, _output):
        if block:
            running.pop()
        elif running:
            return
        for param in stacks.values():
            param.data = placeholder(param)
    return hook


def resident_bytes(module: nn.Module) -> int:
    """Bytes the parameters and buffers of ``module`` hold (storage, so a placeholder counts as its one element)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def load_residual(residual: str | Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(residual, **kwargs)``, with NF4 experts attached when the residual
    has them (transformers' report of the fused expert parameters as missing is silenced: they are attached here)."""
    from transformers import AutoModelForCausalLM

    residual = Path(residual)
    config = json.loads((residual / "config.json").read_text())
    if CONFIG_KEY not in config:
        return AutoModelForCausalLM.from_pretrained(residual, **kwargs)
    from transformers.utils import logging

    from qpissa.moe_meta import experts_stay_on_meta

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with experts_stay_on_meta(), _no_init_of_4bit(config):  # no bf16 copy of the experts, not even for a moment
            model = AutoModelForCausalLM.from_pretrained(residual, **kwargs)
    finally:
        logging.set_verbosity(level)
    dtype = kwargs.get("dtype")
    attach_nf4_experts(model, residual, config[CONFIG_KEY].get("file", NF4_EXPERTS_FILE),
                       dtype if isinstance(dtype, torch.dtype) else None)
    fp32 = _strict_fp32(model)
    if isinstance(dtype, torch.dtype):
        _cast_unquantized(model, dtype, fp32)
    for name, param in model.named_parameters():  # as a plain 16-bit load keeps them
        if fp32.search(name) and _unquantized(param) and param.element_size() < 4:
            param.data = param.data.float()
    return model


def _strict_fp32(model: nn.Module):
    """The parameters the model keeps in fp32 in any 16-bit load (``_keep_in_fp32_modules_strict``: routers,
    Hunyuan-V4's indexer ``k_norm``), matched as transformers matches them. transformers' pre-quantized 4-bit load
    leaves a ``….weight`` among them in the checkpoint's dtype (its bias goes fp32), and the family then fails on
    mixed dtypes (``k_norm``: fp32 bias, bf16 weight); here they are fp32, as in a plain load."""
    import re

    patterns = sorted(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return re.compile("|".join(p.replace("*", ".*") for p in patterns) if patterns else r"(?!)")


def _unquantized(param: torch.Tensor) -> bool:
    """A floating weight held in full (not NF4 bytes, not an expert's 1-element placeholder)."""
    return param.is_floating_point() and type(param).__name__ != "Params4bit" and 0 not in param.stride()


def _cast_unquantized(model: nn.Module, dtype: torch.dtype, keep=None) -> None:
    """Some families (gpt-oss, Llama-4, Phi-MoE, MiniMax) leave transformers' 4-bit load with their unquantized
    weights (embeddings, norms, routers) in the checkpoint's dtype whatever ``dtype`` asked, and then fail on mixed
    dtypes: cast those, but those matched by ``keep`` (the model's strict fp32 ones). NF4 bytes and the experts'
    1-element placeholders are left as they are."""
    for name, param in model.named_parameters():
        if _unquantized(param) and param.dtype != dtype and not (keep is not None and keep.search(name)):
            param.data = param.data.to(dtype)


@contextmanager
def _no_init_of_4bit(config: dict):
    """transformers initializes the modules around the (missing) fused experts; a family whose ``_init_weights``
    reaches an NF4 linear there (Llama-4: ``normal_`` on its uint8 bytes) would fail. Loaded 4-bit weights are
    never re-initialized here. transformers' bitsandbytes path also swaps Llama-4's fused experts for a list of
    per-expert linears (``MODULES_TO_PATCH_FOR_QUANTIZATION``) that no NF4 file here fills: the experts stay fused,
    as :func:`attach_nf4_experts` expects."""
    import transformers
    from transformers.quantizers import base as quantizers

    patched = dict(quantizers.MODULES_TO_PATCH_FOR_QUANTIZATION)
    quantizers.MODULES_TO_PATCH_FOR_QUANTIZATION.clear()
    try:
        with _skip_4bit_init(transformers, config):
            yield
    finally:
        quantizers.MODULES_TO_PATCH_FOR_QUANTIZATION.update(patched)


@contextmanager
def _skip_4bit_init(transformers, config: dict):

    cls = getattr(transformers, (config.get("architectures") or [""])[0], None)
    owner = next((c for c in getattr(cls, "__mro__", ()) if "_init_weights" in vars(c)), None)  # the family's base:
    if owner is None:  # its sub-models (…TextModel) initialize through it too
        yield
        return
    original = vars(owner)["_init_weights"]

    def init(self, module):
        if any(not p.is_floating_point() for p in module.parameters(recurse=False)):
            return
        original(self, module)

    owner._init_weights = init
    try:
        yield
    finally:
        owner._init_weights = original


def load(out: str | Path, adapter: str | Path | None = None, *, is_trainable: bool = False,
         dtype: torch.dtype = torch.bfloat16, device: str | None = None):
    """A decompose output (OUT, or OUT/residual) as a causal LM: transformers loads the residual (NF4 linears via
    bitsandbytes), NF4 experts are attached here, then PEFT loads ``adapter`` (default OUT/adapter, if present).
    Plain outputs (no NF4 experts) load exactly as transformers + peft would."""
    out = Path(out)
    residual = out / "residual" if (out / "residual" / "config.json").is_file() else out
    if not (residual / "config.json").is_file():
        raise UserError(f"{out}: no residual/config.json; pass a qpissa decompose output folder")
    model = load_residual(residual, dtype=dtype, **({"device_map": device} if device else {}))
    if adapter is None and (out / "adapter" / "adapter_config.json").is_file() and residual != out:
        adapter = out / "adapter"
    if adapter is not None:
        from qpissa.adapters import load_peft

        model = load_peft(model, adapter, is_trainable=is_trainable)
    return model
