"""Opt-in training backend: route PEFT LoRA-on-bitsandbytes-NF4 layers through qpissa.kernels (Triton).

``apply_kernel_backend(model, "triton")`` replaces the ``forward`` of every PEFT
``lora.bnb.Linear4bit`` layer (a bitsandbytes ``Linear4bit`` base + LoRA adapter) with one call to
:func:`qpissa.kernels.fused_linear.fused_nf4_lora_linear`:

    y = x·deq(Q)ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ + bias        (Q frozen; grads for x, A, B)

reading bitsandbytes' packed NF4 bytes in place (no conversion, no copy). Layers in a state
the fused path does not cover — adapters disabled or merged, several active adapters, DoRA or
other LoRA variants, a LoRA bias, mixed-batch ``adapter_names``, non-NF4 or CPU-repacked weights —
run PEFT's own forward for that call. ``apply_kernel_backend(model, "bnb")`` undoes the patch.

Where Triton cannot run (not installed, or no CUDA device and ``TRITON_INTERPRET`` unset) it logs
one warning line and leaves the model on bitsandbytes, returning 0.
"""
from __future__ import annotations

import logging
import types
from typing import Literal

import torch
from torch import nn

log = logging.getLogger("qpissa.kernels")

KernelBackend = Literal["bnb", "triton"]
_ORIG = "_qpissa_bnb_forward"


def _lora_4bit_layers(model: nn.Module) -> list[nn.Module]:
    """PEFT LoRA layers whose base is a bitsandbytes Linear4bit."""
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # peft without bitsandbytes support
        return []
    return [m for m in model.modules() if isinstance(m, LoraLinear4bit)]


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA Linear4bit forward, fused; falls back to the original for uncovered states."""
    from qpissa.kernels.fused_linear import fused_nf4_lora_linear, triton_unavailable_reason
    from qpissa.quant import NF4Weight

    fallback = getattr(self, _ORIG)
    active = [a for a in self.active_adapters if a in self.lora_A]
    base = self.get_base_layer()
    qs = getattr(base.weight, "quant_state", None)
    if (self.disable_adapters or self.merged or args or any(v is not None for v in kwargs.values())
            or len(active) != 1 or active[0] in getattr(self, "lora_variant", {})
            or qs is None or qs.quant_type != "nf4" or getattr(qs, "packing_format_for_cpu", False)
            or self.lora_B[active[0]].bias is not None or triton_unavailable_reason(x.device) is not None):
        return fallback(x, *args, **kwargs)
    name = active[0]
    compute = base.compute_dtype or x.dtype
    xc = x.to(compute)  # (..., K) bitsandbytes casts the input to its compute dtype
    dropout = self.lora_dropout[name]
    x_lora = None if isinstance(dropout, nn.Identity) else dropout(xc)  # PEFT: lora_B(lora_A(dropout(x)))
    weight = NF4Weight.from_quant_state(base.weight.data, qs)
    y = fused_nf4_lora_linear(xc, weight, self.lora_A[name].weight, self.lora_B[name].weight,
                              self.scaling[name], base.bias, x_lora)  # (..., N)
    return y.to(x.dtype)


def apply_kernel_backend(model: nn.Module, backend: KernelBackend = "triton") -> int:
    """Use the fused Triton NF4+LoRA kernel ("triton") or bitsandbytes + PEFT ("bnb") for training.

    Returns the number of PEFT LoRA Linear4bit layers now on the fused path (0 for "bnb" or when
    falling back). Idempotent; "bnb" restores every layer patched before.
    """
    if backend not in ("bnb", "triton"):
        raise ValueError(f"kernel backend must be 'bnb' or 'triton', got {backend!r}")
    layers = _lora_4bit_layers(model)
    if backend == "bnb":
        for layer in layers:
            if _ORIG in layer.__dict__:
                del layer.forward  # instance attribute → class forward again
                delattr(layer, _ORIG)
        return 0
    if not layers:
        log.warning("qpissa: --kernels triton found no PEFT LoRA layers on bitsandbytes Linear4bit; nothing to fuse")
        return 0
    from qpissa.kernels.nf4_dequant import triton_unavailable_reason

    reason = triton_unavailable_reason(layers[0].get_base_layer().weight.device)
    if reason is not None:
        log.warning("qpissa: --kernels triton unavailable (%s); training with bitsandbytes kernels", reason)
        return 0
    for layer in layers:
        if _ORIG not in layer.__dict__:
            setattr(layer, _ORIG, layer.forward)
            layer.forward = types.MethodType(_fused_forward, layer)
    log.info("qpissa: fused Triton NF4+LoRA kernel on %d layers", len(layers))
    return len(layers)
