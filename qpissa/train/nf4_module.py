"""A frozen NF4 linear layer whose stored bytes are plain parameters, so FSDP2 can shard them.

bitsandbytes' ``Linear4bit`` keeps its quantization state (absmax, code, shape) in a ``QuantState``
object beside a ``Params4bit`` tensor subclass; FSDP shards parameters only, so the state would
stay whole (and a probe of ``Linear4bit`` under FSDP1 failed with a shape error, DESIGN.md §4b).
:class:`FrozenNF4Linear` holds THE SAME tensors — the packed NF4 bytes (uint8), the absmax (fp32,
or uint8 codes plus the second-level absmax when double-quantized) — as frozen ``nn.Parameter``\\ s,
which ``fully_shard`` splits like any other; the 16/256-entry codebooks stay small buffers. Nothing
is re-quantized: :func:`swap_linear4bit` moves the loaded bytes in as they are.

Forward dequantizes with bitsandbytes' own ``dequantize_4bit`` (so the weight equals what
``Linear4bit`` computes with) and multiplies; backward dequantizes again instead of saving the
dense weight (under FSDP the packed bytes are re-gathered for backward; the dense weight never
outlives one matmul).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qpissa.quant import NF4Weight


class FrozenNF4Linear(nn.Module):
    """``y = x · dequant(Q)ᵀ + b`` with Q in bitsandbytes' NF4 storage, every tensor a frozen parameter."""

    def __init__(self, w: NF4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.blocksize, self.nested, self.offset, self.blocksize2 = w.blocksize, w.nested, w.offset, w.blocksize2
        self.weight_dtype = w.dtype
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.packed = frozen(w.packed.reshape(-1))  # the stored bytes themselves (a view, no copy)
        self.absmax = frozen(w.absmax)
        self.absmax2 = frozen(w.absmax2) if w.nested else None
        # own copies of the small codebooks: a view would keep the whole mmapped safetensors file resident
        self.register_buffer("code", w.code.clone())
        self.register_buffer("code2", w.code2.clone() if w.nested else None)
        self.bias = frozen(bias) if bias is not None else None

    def quant_state(self):
        """bitsandbytes' QuantState over this module's current (under FSDP: all-gathered) tensors."""
        from bitsandbytes.functional import QuantState

        state2 = (QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32)
                  if self.nested else None)
        offset = torch.tensor(self.offset, device=self.absmax.device) if self.nested else None
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          code=self.code, blocksize=self.blocksize, quant_type="nf4", dtype=self.weight_dtype,
                          offset=offset, state2=state2)

    def dequantize(self) -> torch.Tensor:
        """The dense (out, in) weight, exactly as bitsandbytes dequantizes the same bytes."""
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.packed.reshape(-1, 1), self.quant_state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Matmul.apply(x, self, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocksize={self.blocksize}"


class _NF4Matmul(torch.autograd.Function):
    """x·Wᵀ(+b) that keeps no dense W for backward: it dequantizes the packed bytes a second time there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: FrozenNF4Linear, packed: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.module, ctx.dtype, ctx.in_dtype = module, dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            w = module.dequantize().to(dtype)
            bias = module.bias.to(dtype) if module.bias is not None else None
            return F.linear(x.to(dtype), w, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = ctx.module.dequantize().to(ctx.dtype)  # FSDP re-gathered the bytes for this block's backward
        return (grad.to(ctx.dtype) @ w).to(ctx.in_dtype), None, None


def swap_linear4bit(model: nn.Module) -> int:
    """Replace every bitsandbytes ``Linear4bit`` in ``model`` (also PEFT's ``base_layer``\\ s) in place.

    Returns how many were swapped. The new module shares the loaded tensors (no copy, no re-quantization).
    """
    import bitsandbytes as bnb

    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = NF4Weight.from_quant_state(child.weight.data, child.weight.quant_state)
                bias = child.bias.data if child.bias is not None else None
                setattr(module, child_name, FrozenNF4Linear(w, bias))
                swapped += 1
    return swapped
