"""Rank allocation under a parameter budget (``--rank-allocation error``): each module's rank from its own
measured error curve, instead of the same r everywhere.

Per module (m×n), one SVD to the largest candidate rank k_max (randomized as ``--svd`` says; weighted by H^½
when calibrated); then at every candidate rank k the method's first iterate is *measured*: R_k = W − P_k
(P_k the rank-k principal part, [W·H^½]_k·H^{−½} when calibrated), E_k = R_k − deq(NF4(R_k)) and the error
‖E_k‖_F (or ‖E_k·H^½‖_F). A rank-k adapter costs k·(m+n) parameters.

The allocation minimizes Σ_modules err² — the squared error of all targets stacked, additive over modules
(with H: the summed output MSE) — on the budget: greedy on each curve's lower convex hull (largest error drop
per parameter first; a segment that no longer fits is skipped), which is optimal at the hull's breakpoints
(Lagrangian relaxation). If the greedy result is worse than uniform r on the same curves (possible only
through budget left over), uniform r is kept, so the allocation never loses to uniform on the measured curves.
"""
from __future__ import annotations

import heapq
import math

import torch

from qpissa.decompose.linalg import low_rank_factors
from qpissa.decompose.whitening import Whitening, output_error, weighted_low_rank_factors
from qpissa.quant import NF4Spec, minus_dequantized, quantize_nf4

MAX_RANK_FACTOR = 2  # k_max = 2·r (r: the uniform rank the budget buys on average)
CANDIDATES = 8  # candidate ranks per module: k_max/8, 2·k_max/8, …, k_max (and r itself)


def candidate_ranks(rank: int, shape: tuple[int, int], mean_rank: float) -> list[int]:
    """Candidate ranks of one module: multiples of k_max/8 up to k_max = 2·mean_rank (below min(m, n)),
    plus ``rank`` (uniform r) so uniform is always a point of every curve."""
    kmax = max(1, min(min(shape) - 1, math.ceil(MAX_RANK_FACTOR * mean_rank)))
    step = max(1, kmax // CANDIDATES)
    ks = set(range(step, kmax + 1, step)) | {kmax}
    if rank <= kmax:
        ks.add(rank)
    return sorted(ks)


def error_curve(w: torch.Tensor, ranks: list[int], *, spec: NF4Spec, svd_kwargs: dict,
                h: Whitening | None = None) -> list[float]:
    """‖E_k‖ (or ‖E_k·H^½‖) of R_k = W − P_k quantized to NF4, measured at every k in ``ranks``
    (ascending); one SVD to max(ranks), truncated for the smaller k."""
    kmax = ranks[-1]
    if h is None:
        a, b = low_rank_factors(w, kmax, 1.0, **svd_kwargs)  # (kmax, n) (m, kmax), descending σ
    else:
        a, b = weighted_low_rank_factors(w, kmax, 1.0, h, **svd_kwargs)
    errors = []
    for k in ranks:
        residual = w - b[:, :k] @ a[:k]  # (m, n) R_k
        e = minus_dequantized(residual, quantize_nf4(residual, spec))  # (m, n) R_k − deq(NF4(R_k))
        errors.append(float(torch.linalg.vector_norm(e)) if h is None else output_error(e, h))
    return errors


def _hull(costs: list[int], sq: list[float]) -> list[int]:
    """Indices of the lower convex hull of (cost, err²), from the first point, along which err² decreases."""
    hull = [0]
    for i in range(1, len(costs)):
        if sq[i] >= sq[hull[-1]]:
            continue  # more parameters, no less error: never chosen
        while len(hull) >= 2:
            i0, i1 = hull[-2], hull[-1]
            # i1 lies on or above the segment i0 → i: drop it (cross product)
            if (sq[i1] - sq[i0]) * (costs[i] - costs[i0]) >= (sq[i] - sq[i0]) * (costs[i1] - costs[i0]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(curves: dict[str, dict], budget: int, uniform: int | None = None) -> dict:
    """``curves``: module → {"ranks": [k…], "errors": [‖E_k‖…], "width": m+n}; the ranks minimizing Σ err² with
    Σ k·(m+n) ≤ ``budget`` (greedy on convex hulls); ``uniform``: r, kept if the greedy result is not better."""
    modules = list(curves)
    costs = {mod: [k * c["width"] for k in c["ranks"]] for mod, c in curves.items()}
    sq = {mod: [e * e for e in c["errors"]] for mod, c in curves.items()}
    hulls = {mod: _hull(costs[mod], sq[mod]) for mod in modules}
    pos = {mod: 0 for mod in modules}  # position on the hull
    spent = sum(costs[mod][0] for mod in modules)
    if spent > budget:
        return {}
    heap: list[tuple[float, int, str]] = []

    def push(order: int, mod: str) -> None:
        h, p = hulls[mod], pos[mod]
        if p + 1 < len(h):
            i, j = h[p], h[p + 1]
            heapq.heappush(heap, (-(sq[mod][i] - sq[mod][j]) / (costs[mod][j] - costs[mod][i]), order, mod))

    for order, mod in enumerate(modules):
        push(order, mod)
    while heap:
        _, order, mod = heapq.heappop(heap)
        h, p = hulls[mod], pos[mod]
        extra = costs[mod][h[p + 1]] - costs[mod][h[p]]
        if spent + extra > budget:
            continue  # this module's next step no longer fits; the others may
        spent += extra
        pos[mod] = p + 1
        push(order, mod)
    ranks = {mod: curves[mod]["ranks"][hulls[mod][pos[mod]]] for mod in modules}
    total = sum(sq[mod][curves[mod]["ranks"].index(ranks[mod])] for mod in modules)
    kept_uniform = False
    if uniform is not None and all(uniform in curves[m]["ranks"] for m in modules) \
            and sum(uniform * curves[m]["width"] for m in modules) <= budget:
        flat = sum(sq[m][curves[m]["ranks"].index(uniform)] for m in modules)
        if flat < total:
            ranks, total, kept_uniform = {m: uniform for m in modules}, flat, True
    return {"ranks": ranks, "params": sum(ranks[m] * curves[m]["width"] for m in modules),
            "sum_sq_error": total, "kept_uniform": kept_uniform}


def scale_alpha(rank: int, scale: float, rslora: bool) -> float:
    """The α that gives a rank-``rank`` module the scale ``scale`` (α = s·r, or s·√r with rsLoRA), so every
    module keeps the s the uniform run would use."""
    return scale * (math.sqrt(rank) if rslora else rank)
