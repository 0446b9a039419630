"""SORSA orthonormal regularizer on LoRA/PiSSA adapter factors (Cao 2024, arXiv:2409.00055).

SORSA keeps the principal singular vectors of each adapted weight orthonormal. Our adapters store
PiSSA's factors A = diag(√S) Vᵀ (r×n) and B = U diag(√S) (m×r), so the singular vectors are the
*normalized* factors: Â = diag(1/‖a_i‖) A (unit rows), B̂ = B diag(1/‖b_j‖) (unit columns). Per module

    R(A, B) = ‖Â Âᵀ − I_r‖_F + ‖B̂ᵀ B̂ − I_r‖_F          (0 at PiSSA/QPiSSA initialization)

summed over all adapted modules. As in SORSA, R is not added to the task loss; after the clipped
optimizer step with learning rate η_t, a separate plain gradient step

    θ ← θ − η_t · (γ / η_max) · ∇_θ R

is taken, so the regularizer is neither clipped nor rescaled by Adam and its strength is γ at the
peak learning rate η_max (SORSA's default γ = 4e-4).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

EPS = 1e-12


def adapter_pairs(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) weight pairs of every PEFT LoRA layer: A (r, n) = lora_A.weight, B (m, r) = lora_B.weight."""
    pairs = []
    for module in model.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict):
            for name in lora_a:
                pairs.append((lora_a[name].weight, lora_b[name].weight))
    return pairs


def orthonormal_penalty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖ÂÂᵀ − I‖_F + ‖B̂ᵀB̂ − I‖_F for one module, computed in fp32 (or fp64 for fp64 inputs)."""
    a = a.float() if a.element_size() < 4 else a  # (r, n)
    b = b.float() if b.element_size() < 4 else b  # (m, r)
    a_hat = a / a.norm(dim=1, keepdim=True).clamp_min(EPS)  # (r, n) unit rows
    b_hat = b / b.norm(dim=0, keepdim=True).clamp_min(EPS)  # (m, r) unit columns
    eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)  # (r, r)
    return torch.linalg.matrix_norm(a_hat @ a_hat.T - eye) + torch.linalg.matrix_norm(b_hat.T @ b_hat - eye)


def sorsa_regularizer(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """R = Σ over modules of :func:`orthonormal_penalty`."""
    terms = [orthonormal_penalty(a, b) for a, b in pairs]
    if not terms:
        raise ValueError("no LoRA adapter factors found for the SORSA regularizer")
    return torch.stack(terms).sum()


def sorsa_step(pairs: list[tuple[torch.Tensor, torch.Tensor]], gamma: float, lr: float, peak_lr: float) -> float:
    """Apply θ ← θ − lr·(γ/peak_lr)·∇R in place to every factor; return R before the step."""
    params = [p for pair in pairs for p in pair]
    with torch.enable_grad():
        value = sorsa_regularizer(pairs)
        grads = torch.autograd.grad(value, params)
    step = lr * gamma / peak_lr
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(g.to(p.dtype), alpha=step)
    return float(value.detach())
