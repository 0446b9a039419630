"""Plain-PyTorch references for every kernel in ``qpissa.kernels`` (what the tests compare against).

Nothing here is fast; everything here is obviously correct:

* :func:`nf4_dequantize_reference` — bitsandbytes' packed NF4 layout read with indexing ops.
  Element ``i`` of the row-major weight lives in byte ``i // 2``: the *high* nibble for even ``i``,
  the *low* nibble for odd ``i`` (verified against ``bitsandbytes.functional.quantize_4bit``).
  ``w[i] = code[nibble_i] · absmax[i // blocksize]`` in fp32, then cast once to the output dtype.
  With double quantization (``compress_statistics=True``) the absmax vector is itself stored as
  uint8 codes: ``absmax[j] = code2[absmax_u8[j]] · absmax2[j // blocksize2] + offset`` (fp32).
  (QLoRA, Dettmers et al. 2023, §3 "Double Quantization".)
* :func:`fused_linear_reference` — ``y = x·deq(Q)ᵀ + s·(x_l·Aᵀ)·Bᵀ (+ bias)`` with the weight
  materialized, differentiable by torch.autograd (the gradient oracle for the fused kernel).
* :func:`fused_linear_backward_reference` — the closed-form backward the fused kernel implements.
"""
from __future__ import annotations

import torch

from qpissa.quant import NF4Weight  # the runtime type the kernels take (kept out of the references)


def absmax_reference(w: NF4Weight) -> torch.Tensor:
    """fp32 per-block scales; resolves double quantization: code2[a]·absmax2[j // bs2] + offset."""
    if not w.nested:
        return w.absmax.float()
    j = torch.arange(w.absmax.numel(), device=w.absmax.device)
    am = w.code2[w.absmax.long()] * w.absmax2[j // w.blocksize2]  # (n_blocks,) fp32
    return am + w.offset  # two roundings (mul, then add), like bitsandbytes' separate ops


def nf4_dequantize_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """deq(Q)[i] = code[nibble_i] · absmax[i // blocksize], fp32 product cast once → (N, K)."""
    n = w.numel
    i = torch.arange(n, device=w.packed.device)  # (n,)
    byte = w.packed[i // 2].to(torch.int32)  # (n,)
    nib = torch.where(i % 2 == 0, byte >> 4, byte & 0xF)  # (n,) high nibble first
    vals = w.code[nib] * absmax_reference(w)[i // w.blocksize]  # (n,) fp32
    return vals.to(dtype or w.dtype).reshape(w.shape)  # (N, K)


def fused_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
    bias: torch.Tensor | None = None, x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + s·(x_l·Aᵀ)·Bᵀ + bias with W = deq(Q) given dense; x_l defaults to x.

    Shapes: x (M, K), W (N, K), A (r, K), B (N, r) → y (M, N). Autograd gives dx, dA, dB.
    """
    x_l = x if x_lora is None else x_lora
    y = x @ weight.t() + scaling * ((x_l @ lora_a.t()) @ lora_b.t())  # (M, N)
    return y if bias is None else y + bias


def fused_linear_backward_reference(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed form (x_l = x): dx = dy·W + s·(dy·B)·A,  dA = s·(dy·B)ᵀ·x,  dB = s·dyᵀ·(x·Aᵀ)."""
    dyb = dy @ lora_b  # (M, r)
    dx = dy @ weight + scaling * (dyb @ lora_a)  # (M, K)
    da = scaling * (dyb.t() @ x)  # (r, K)
    db = scaling * (dy.t() @ (x @ lora_a.t()))  # (N, r)
    return dx, da, db
