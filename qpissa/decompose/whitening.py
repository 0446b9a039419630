"""The output-error (H-weighted) norm and its whitening: the math behind calibrated initialization.

A linear layer y = W·x (W: m×n) evaluated on calibration inputs X (tokens×n) has output error
‖X(W − Ŵ)ᵀ‖_F² = trace(E·H·Eᵀ) = ‖E·H^½‖_F² with E = W − Ŵ and H = XᵀX (n×n, accumulated in fp64).
Substituting M = E·H^½ turns "best rank-r correction in the output norm" into plain Eckart–Young:
L* = [E·H^½]_r·H^{−½} (CLoQ, Deng et al. 2025, arXiv 2501.18475, Thm. 1; QERA, Zhang et al.,
ICLR 2025). H must be invertible, so it is damped first: H + λ·mean(diag H)·I (as GPTQ and PEFT's
CorDA do). Any positive multiple of H gives the same factors; the error scales with its square root.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qpissa.decompose.linalg import low_rank_factors

DEFAULT_DAMP = 1e-2  # λ of H + λ·mean(diag H)·I, as GPTQ and PEFT's CorDA start


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + λ·mean(diag H)·I (n×n, same device/dtype as ``h``): makes H^{−½} exist and bounds its
    condition number by ≈ n/λ; the weighted objective becomes ‖E·H^½‖² + λ·mean(diag H)·‖E‖²."""
    n = h.shape[0]
    eye = torch.eye(n, device=h.device, dtype=h.dtype)  # (n, n)
    return h + (damp * torch.diagonal(h).mean()) * eye


def sqrt_and_inv_sqrt(h: torch.Tensor, rel_floor: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric H^½ and H^{−½} from one fp64 eigendecomposition H = V·diag(λ)·Vᵀ.

    Eigenvalues below ``rel_floor``·λ_max (rounding noise of a PSD matrix, possibly negative) are
    clamped so the inverse root stays finite; damp H first (:func:`damped`) for a well-posed inverse.
    """
    h64 = h.to(torch.float64)
    h64 = (h64 + h64.T) / 2  # symmetrize rounding noise
    lam, v = torch.linalg.eigh(h64)  # (n,) ascending, (n, n)
    floor = lam.max().clamp_min(0) * rel_floor + torch.finfo(torch.float64).tiny  # 0-dim, no host sync
    lam = torch.maximum(lam, floor)
    root = torch.sqrt(lam)  # (n,)
    half = (v * root[None, :]) @ v.T  # (n, n)
    inv_half = (v / root[None, :]) @ v.T  # (n, n)
    return half, inv_half


@dataclass(frozen=True)
class Whitening:
    """H (raw, fp64, for measuring output error) with the roots of its damped form (fp64).

    Build once per distinct H with :func:`whiten` and pass it to every method sharing that input
    (q/k/v, gate/up): the n×n eigendecomposition is then paid once.
    """

    h: torch.Tensor  # (n, n) raw H = Σ x·xᵀ
    half: torch.Tensor  # (n, n) (H + λ·mean(diag H)·I)^½
    inv_half: torch.Tensor  # (n, n) (H + λ·mean(diag H)·I)^{−½}
    damp: float


def whiten(h: torch.Tensor | Whitening, damp: float = DEFAULT_DAMP) -> Whitening:
    """Roots of the damped H (fp64, on ``h``'s device); a :class:`Whitening` passes through unchanged."""
    if isinstance(h, Whitening):
        return h
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"H must be a square n×n matrix, got shape {tuple(h.shape)}")
    h64 = h.to(torch.float64)
    half, inv_half = sqrt_and_inv_sqrt(damped(h64, damp))
    return Whitening(h64, half, inv_half, damp)


def output_error(e: torch.Tensor, h: torch.Tensor | Whitening, chunk_rows: int = 4096) -> float:
    """‖E·H^½‖_F = √trace(E·H·Eᵀ) = ‖X·Eᵀ‖_F for H = XᵀX, without forming H^½: √Σ((E·H)∘E).

    ``h`` is the raw H (a :class:`Whitening` contributes its raw ``h``, not the damped one). fp64,
    in row chunks so a 28672×8192 E never needs more than ``chunk_rows``×n fp64 temporaries.
    """
    hm = h.h if isinstance(h, Whitening) else h
    hm = hm.to(device=e.device, dtype=torch.float64)
    total = torch.zeros((), device=e.device, dtype=torch.float64)
    for start in range(0, e.shape[0], chunk_rows):
        rows = e[start:start + chunk_rows].to(torch.float64)  # (c, n)
        total += ((rows @ hm) * rows).sum()
    return float(total.clamp_min(0).sqrt())


def weighted_low_rank_factors(target: torch.Tensor, rank: int, scale: float, h: Whitening,
                              start: torch.Tensor | None = None, **svd_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r s·B·A of ``target`` (m×n) in the H norm: [T·H^½]_r·H^{−½} (CLoQ/QERA closed form).

    [T·H^½]_r = U·S·Vᵀ → B = U·√(S/s) (m×r), A = √(S/s)·Vᵀ·H^{−½} (r×n); computed in ``target``'s
    dtype/device. ``start`` (a previous A) warm-starts a randomized SVD in the whitened space (A·H^½).
    """
    half = h.half.to(device=target.device, dtype=target.dtype)  # (n, n)
    inv_half = h.inv_half.to(device=target.device, dtype=target.dtype)  # (n, n)
    white_start = None if start is None else start.to(target.dtype) @ half  # (r, n)
    a_white, b = low_rank_factors(target @ half, rank, scale, start=white_start, **svd_kwargs)  # (r, n) (m, r)
    return a_white @ inv_half, b  # (r, n) (m, r)
