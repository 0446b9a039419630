"""Truncated SVD: exact (LAPACK) and randomized (Halko, Martinsson & Tropp 2011, Alg. 4.4).

Both return the top-``rank`` triplet ``(U_r, S_r, Vh_r)`` with ``W ≈ U_r diag(S_r) Vh_r``.
The randomized variant sketches with ``rank + oversample`` columns, runs ``power_iters``
subspace iterations with QR re-orthonormalization and uses a seeded generator, so the
same seed gives the same factors (PEFT's ``pissa_niter_k`` uses no oversampling and no seed).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

SvdMethod = Literal["exact", "randomized"]


def seeded_draw(sample: Callable[..., torch.Tensor], shape: tuple[int, ...], seed: int, dtype: torch.dtype,
                device: torch.device | str) -> torch.Tensor:
    """``sample(*shape)`` (``torch.rand``/``torch.randn``) from a fresh CPU generator seeded with ``seed``, moved to
    ``device``.

    Why the CPU generator even for a CUDA weight: CUDA's Philox stream differs from the CPU's Mersenne
    Twister, so a per-device generator would make the same ``--seed`` give different adapters on a GPU
    and a CPU. Drawing on the CPU keeps the factors device-independent (and byte-identical to earlier
    releases on CPU); the copy is r×n or n×(r+p) numbers, small beside the m×n weight on the device.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return sample(*shape, generator=gen, dtype=dtype).to(device)


def canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each (u_i, v_i) pair so u_i's largest-magnitude entry is positive: the factors then do not
    depend on the LAPACK build or thread count's sign choice."""
    idx = u.abs().argmax(dim=0)  # (r,)
    sign = torch.sign(u[idx, torch.arange(u.shape[1], device=u.device)])  # (r,)
    sign[sign == 0] = 1
    return u * sign[None, :], vh * sign[:, None]


def exact_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``w`` (m×n) from a full thin SVD."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (m,k) (k,) (k,n), k=min(m,n)
    u, vh = canonical_signs(u[:, :rank], vh[:rank])
    return u, s[:rank], vh


def randomized_svd(
    w: torch.Tensor, rank: int, oversample: int = 16, power_iters: int = 4, seed: int = 0,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized range finder + small SVD (Halko et al. 2011).

    Y = W·Ω, Ω ∈ R^{n×(r+p)} Gaussian; q times: Q = qr(Y), Z = qr(WᵀQ), Y = W·Z;
    Q = qr(Y); B = QᵀW; B = Ũ S Vᵀ; U = Q·Ũ; truncate to r.
    ``start`` (r'×n, r' ≤ r + oversample): rows spanning a nearby right subspace (the previous
    iterate's A in QPiSSA/LoftQ); they replace part of Ω and one power iteration suffices.
    """
    m, n = w.shape
    k = min(rank + oversample, m, n)
    omega = seeded_draw(torch.randn, (n, k), seed, w.dtype, w.device)  # (n, k)
    if start is not None:  # warm start: a row space close to the answer needs one power iteration
        omega[:, : start.shape[0]] = start.T.to(omega)
        power_iters = min(power_iters, 1)
    q, _ = torch.linalg.qr(w @ omega)  # (m, k)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(w.T @ q)  # (n, k)
        q, _ = torch.linalg.qr(w @ z)  # (m, k)
    b = q.T @ w  # (k, n)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)  # (k,k) (k,) (k,n)
    u = q @ ub  # (m, k)
    u, vh = canonical_signs(u[:, :rank], vh[:rank])
    return u, s[:rank], vh


def top_singular(
    w: torch.Tensor,
    rank: int,
    method: SvdMethod = "exact",
    oversample: int = 16,
    power_iters: int = 4,
    seed: int = 0,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch to :func:`exact_svd` or :func:`randomized_svd` (``start`` only matters for the latter)."""
    if method == "exact":
        return exact_svd(w, rank)
    if method == "randomized":
        return randomized_svd(w, rank, oversample=oversample, power_iters=power_iters, seed=seed, start=start)
    raise ValueError(f"unknown SVD method {method!r}: use 'exact' or 'randomized'")


def low_rank_factors(
    w: torch.Tensor, rank: int, scale: float, **svd_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA factors of ``w`` for ΔW = s·B·A: A = diag(√(S_r/s))·V_rᵀ (r×n), B = U_r·diag(√(S_r/s)) (m×r).

    Meng, Wang & Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation" (2024), Eq. 2–3.
    """
    u, s, vh = top_singular(w, rank, **svd_kwargs)
    root = torch.sqrt(s / scale)  # (r,)
    a = root[:, None] * vh  # (r, n)
    b = u * root[None, :]  # (m, r)
    return a, b


def error_norms(e: torch.Tensor, spectrum: bool = True) -> dict[str, float | None]:
    """Nuclear (Σσ), Frobenius (√Σσ²) and spectral (σ_max) norms of an error matrix, from one svdvals.

    ``spectrum=False`` skips the svdvals (as costly as an exact SVD on 8192×28672) and gives only Frobenius.
    """
    if not spectrum:
        return {"nuclear": None, "frobenius": float(torch.linalg.vector_norm(e)), "spectral": None}
    s = torch.linalg.svdvals(e)  # (min(m, n),)
    return {
        "nuclear": float(s.sum()),
        "frobenius": float(torch.linalg.vector_norm(e)),
        "spectral": float(s.max()) if s.numel() else 0.0,
    }


def balance_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B' = B·D, A' = D⁻¹·A with D = diag(2^round(log2 √(‖A_i,:‖/‖B_:,i‖))): each rank-1 pair gets equal norms
    (within a factor 2), as PiSSA's √σ split has them. Powers of two scale a float exactly, so B'·A' = B·A bit for bit
    in any dtype and the residual fitted to B·A stays exact. Why: a calibrated init puts H^{−½} into A (raw H = Σxxᵀ,
    so A is tiny and B huge); Adam moves every entry by ≈ lr whatever its scale, so the unbalanced pair's update
    B·ΔA is far larger than the balanced one's."""
    na = torch.linalg.vector_norm(a.float(), dim=1)  # (r,)
    nb = torch.linalg.vector_norm(b.float(), dim=0)  # (r,)
    ok = (na > 0) & (nb > 0)
    exponent = torch.where(ok, torch.round(0.5 * torch.log2(torch.where(ok, na / nb, 1.0))), 0.0)  # (r,)
    d = torch.exp2(exponent)  # (r,)
    return (a.float() / d[:, None]).to(a.dtype), (b.float() * d[None, :]).to(b.dtype)
