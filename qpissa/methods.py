"""Adapter initialization methods: one pure function per method, W → (A, B, residual).

Notation (DESIGN.md §3): W ∈ R^{m×n} (out×in), rank r, scale s (α/r, or α/√r with rsLoRA),
adapter update ΔW = s·B·A with A: r×n (lora_A), B: m×r (lora_B). Every function returns an
:class:`Init` whose ``reconstruction()`` is what the saved model computes: deq(Q) + s·B·A
(or R + s·B·A when the residual stays in full precision). Adapters are cast to their storage
dtype *before* the residual is fixed, so W = R + s·B·A holds for what is stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from qpissa.linalg import SvdMethod, low_rank_factors, seeded_draw
from qpissa.quant import NF4Spec, NF4Tensor, dequantize_nf4, quantize_nf4

Method = Literal["lora", "qlora", "pissa", "qpissa", "loftq"]
METHODS: tuple[str, ...] = ("lora", "qlora", "pissa", "qpissa", "loftq")
QUANTIZED_METHODS = frozenset({"qlora", "qpissa", "loftq"})


@dataclass(frozen=True)
class SvdOptions:
    """How principal components are extracted."""

    method: SvdMethod = field(default="exact", metadata={"help": "exact (LAPACK) or randomized (Halko)"})
    oversample: int = field(default=16, metadata={"help": "randomized SVD oversampling p"})
    power_iters: int = field(default=4, metadata={"help": "randomized SVD power iterations q"})
    seed: int = field(default=0, metadata={"help": "randomized SVD seed"})

    def kwargs(self) -> dict:
        return {"method": self.method, "oversample": self.oversample, "power_iters": self.power_iters, "seed": self.seed}


@dataclass
class Init:
    """Result of one method on one weight."""

    a: torch.Tensor  # (r, n) lora_A, already in adapter dtype
    b: torch.Tensor  # (m, r) lora_B, already in adapter dtype
    scale: float
    quantized: NF4Tensor | None = None  # frozen NF4 residual, or
    residual: torch.Tensor | None = None  # frozen full-precision residual
    info: dict = field(default_factory=dict)

    def base(self) -> torch.Tensor:
        """The frozen base as the loaded model sees it (fp32)."""
        return dequantize_nf4(self.quantized) if self.quantized is not None else self.residual.float()

    def reconstruction(self) -> torch.Tensor:
        """base + s·B·A in fp32: what the saved residual + adapter compute."""
        return self.base() + self.scale * (self.b.float() @ self.a.float())  # (m, n)


def adapter_scale(rank: int, alpha: float | None, rslora: bool = False) -> float:
    """s = α/r (LoRA) or α/√r (rsLoRA, Kalajdzievski 2023); α defaults to r."""
    alpha = float(rank if alpha is None else alpha)
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _fit(target: torch.Tensor, rank: int, scale: float, svd: SvdOptions, dtype: torch.dtype,
         start: torch.Tensor | None = None):
    """Best rank-r factors of ``target`` (Eckart–Young), cast to the adapter dtype; ``start`` (the previous
    A) warm-starts a randomized SVD."""
    a, b = low_rank_factors(target, rank, scale, start=None if start is None else start.to(target.dtype),
                            **svd.kwargs())
    return a.to(dtype), b.to(dtype)


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float, like: torch.Tensor) -> torch.Tensor:
    return scale * (b.to(like.dtype) @ a.to(like.dtype))  # (m, n)


def _frob(e: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(e))


def kaiming_a(rank: int, n: int, seed: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """PEFT's default lora_A init: kaiming_uniform(a=√5) → U(−1/√n, 1/√n), seeded per tensor, on ``device``
    (drawn on the CPU generator, see :func:`qpissa.linalg.seeded_draw`, so every device gets the same A)."""
    bound = 1.0 / math.sqrt(n)
    u = seeded_draw(torch.rand, (rank, n), seed, torch.float32, device)  # (r, n) in [0, 1)
    return (u * 2 - 1).mul_(bound).to(dtype)


def lora(w: torch.Tensor, rank: int, scale: float, *, seed: int = 0, adapter_dtype=torch.bfloat16) -> Init:
    """Plain LoRA (Hu et al. 2021): base W unchanged, A Kaiming-uniform, B = 0."""
    m, n = w.shape
    a = kaiming_a(rank, n, seed, adapter_dtype, w.device)
    return Init(a, w.new_zeros(m, rank, dtype=adapter_dtype), scale, residual=w, info={"iters": 0})


def qlora(w: torch.Tensor, rank: int, scale: float, *, spec: NF4Spec = NF4Spec(), seed: int = 0,
          adapter_dtype=torch.bfloat16) -> Init:
    """QLoRA (Dettmers et al. 2023): Q = NF4(W), A Kaiming-uniform, B = 0."""
    m, n = w.shape
    a = kaiming_a(rank, n, seed, adapter_dtype, w.device)
    return Init(a, w.new_zeros(m, rank, dtype=adapter_dtype), scale, quantized=quantize_nf4(w, spec),
                info={"iters": 0})


def pissa(w: torch.Tensor, rank: int, scale: float, *, svd: SvdOptions = SvdOptions(),
          adapter_dtype=torch.bfloat16, residual_dtype: torch.dtype | None = None) -> Init:
    """PiSSA: W = U S Vᵀ; A = √(S_r/s)V_rᵀ, B = U_r√(S_r/s); R = W − s·B·A kept in full precision."""
    a, b = _fit(w, rank, scale, svd, adapter_dtype)
    residual = (w - _delta(a, b, scale, w)).to(residual_dtype or w.dtype)  # (m, n)
    return Init(a, b, scale, residual=residual, info={"iters": 0})


def qpissa(w: torch.Tensor, rank: int, scale: float, *, iters: int = 1, spec: NF4Spec = NF4Spec(),
           svd: SvdOptions = SvdOptions(), adapter_dtype=torch.bfloat16, refit: bool = True) -> Init:
    """QPiSSA with T iterations (PiSSA repo): Q₀ = 0; (A,B) = SVD_r(W − deq(Q)), Q = NF4(W − s·B·A).

    Improvements: keep the iterate with the lowest ‖W − deq(Q) − s·B·A‖_F, then refit
    (A,B) = SVD_r(W − deq(Q)) on the stored Q; the refit is kept only if it lowers the error
    (Eckart–Young says it can only lower it in exact arithmetic; the bf16 cast decides the rest).
    """
    deq = torch.zeros_like(w)
    best: tuple[float, torch.Tensor, torch.Tensor, NF4Tensor] | None = None
    history = []
    a = None
    for _ in range(iters):
        a, b = _fit(w - deq, rank, scale, svd, adapter_dtype, start=a)
        q = quantize_nf4(w - _delta(a, b, scale, w), spec)
        deq = dequantize_nf4(q).to(w.dtype)
        err = _frob(w - deq - _delta(a, b, scale, w))
        history.append(err)
        if best is None or err < best[0]:
            best = (err, a, b, q)
    err, a, b, q = best
    info = {"iters": iters, "frobenius_by_iter": history, "best_iter": history.index(err) + 1, "refit": False}
    if refit:
        deq = dequantize_nf4(q).to(w.dtype)
        a2, b2 = _fit(w - deq, rank, scale, svd, adapter_dtype, start=a)
        if _frob(w - deq - _delta(a2, b2, scale, w)) < err:
            a, b, info["refit"] = a2, b2, True
    return Init(a, b, scale, quantized=q, info=info)


def loftq(w: torch.Tensor, rank: int, scale: float, *, iters: int = 1, spec: NF4Spec = NF4Spec(),
          svd: SvdOptions = SvdOptions(), adapter_dtype=torch.bfloat16) -> Init:
    """LoftQ (Li et al. 2023), T alternating steps from A = B = 0:
    Q = NF4(W − s·B·A); (A,B) = SVD_r(W − deq(Q)). Ends on the SVD step; correct for any α and rsLoRA.
    """
    m, n = w.shape
    a = w.new_zeros(rank, n, dtype=adapter_dtype)  # (r, n) on w's device
    b = w.new_zeros(m, rank, dtype=adapter_dtype)  # (m, r)
    history = []
    for _ in range(iters):
        q = quantize_nf4(w - _delta(a, b, scale, w), spec)
        deq = dequantize_nf4(q).to(w.dtype)
        a, b = _fit(w - deq, rank, scale, svd, adapter_dtype, start=a if history else None)
        history.append(_frob(w - deq - _delta(a, b, scale, w)))
    return Init(a, b, scale, quantized=q, info={"iters": iters, "frobenius_by_iter": history})


def initialize(method: Method, w: torch.Tensor, rank: int, scale: float, *, iters: int = 1,
               spec: NF4Spec = NF4Spec(), svd: SvdOptions = SvdOptions(), seed: int = 0,
               adapter_dtype=torch.bfloat16, refit: bool = True) -> Init:
    """Run ``method`` on one weight ``w`` (m×n, fp32 or fp64)."""
    if method == "lora":
        return lora(w, rank, scale, seed=seed, adapter_dtype=adapter_dtype)
    if method == "qlora":
        return qlora(w, rank, scale, spec=spec, seed=seed, adapter_dtype=adapter_dtype)
    if method == "pissa":
        return pissa(w, rank, scale, svd=svd, adapter_dtype=adapter_dtype)
    if method == "qpissa":
        return qpissa(w, rank, scale, iters=iters, spec=spec, svd=svd, adapter_dtype=adapter_dtype, refit=refit)
    if method == "loftq":
        return loftq(w, rank, scale, iters=iters, spec=spec, svd=svd, adapter_dtype=adapter_dtype)
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
