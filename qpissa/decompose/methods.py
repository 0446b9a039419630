"""Adapter initialization methods: one pure function per method, W → (A, B, residual).

Notation (PiSSA, Meng et al. 2024, §3; LoRA, Hu et al. 2021): W ∈ R^{m×n} (out×in), rank r, scale s (α/r, or α/√r with rsLoRA),
adapter update ΔW = s·B·A with A: r×n (lora_A), B: m×r (lora_B). Every function returns an
:class:`Init` whose ``reconstruction()`` is what the saved model computes: deq(Q) + s·B·A
(or R + s·B·A when the residual stays in full precision). Adapters are cast to their storage
dtype *before* the residual is fixed, so W = R + s·B·A holds for what is stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from qpissa.decompose.linalg import SvdMethod, canonical_signs, low_rank_factors, seeded_draw
from qpissa.quant import NF4Spec, NF4Tensor, dequantize_nf4, dequantized_rows, minus_dequantized, quantize_nf4
from qpissa.decompose.whitening import DEFAULT_DAMP, Whitening, output_error, weighted_low_rank_factors, whiten

Method = Literal["lora", "qlora", "pissa", "qpissa", "loftq", "cloq", "corda", "milora", "olora"]
METHODS: tuple[str, ...] = ("lora", "qlora", "pissa", "qpissa", "loftq", "cloq", "corda", "milora", "olora")
QUANTIZED_METHODS = frozenset({"qlora", "qpissa", "loftq", "cloq", "corda", "milora", "olora"})
# methods that cannot run without calibration statistics H (n×n); qpissa and loftq use H when given
CALIBRATED_METHODS = frozenset({"cloq", "corda"})
CALIBRATION_AWARE_METHODS = frozenset({"cloq", "corda", "qpissa", "loftq"})


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
    frobenius: float | None = None  # ‖W − reconstruction()‖_F where the method measured it (the driver reuses it)

    def base(self) -> torch.Tensor:
        """The frozen base as the loaded model sees it (fp32)."""
        return dequantize_nf4(self.quantized) if self.quantized is not None else self.residual.float()

    def reconstruction(self) -> torch.Tensor:
        """base + s·B·A in fp32: what the saved residual + adapter compute (deq(Q) added into the fresh s·B·A
        a few rows at a time: no second m×n buffer)."""
        d = (self.b.float() @ self.a.float()).mul_(self.scale)  # (m, n)
        if self.quantized is None:
            return d.add_(self.residual.float())
        for rows, part in dequantized_rows(self.quantized):
            d[rows].add_(part)
        return d


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


def _fitter(svd: SvdOptions, dtype: torch.dtype, wh: Whitening | None) -> Callable:
    """(target, rank, scale, start) → (A, B): Eckart–Young in the weight norm, or in the H norm
    ([T·H^½]_r·H^{−½}, see :mod:`qpissa.decompose.whitening`) when calibration statistics are given."""
    if wh is None:
        return lambda target, rank, scale, start=None: _fit(target, rank, scale, svd, dtype, start)

    def fit(target, rank, scale, start=None):
        a, b = weighted_low_rank_factors(target, rank, scale, wh, start=start, **svd.kwargs())
        return a.to(dtype), b.to(dtype)
    return fit


def _measure(wh: Whitening | None) -> Callable[[torch.Tensor], float]:
    """The error an iteration minimizes: ‖E‖_F, or the output error ‖E·H^½‖_F with H."""
    return _frob if wh is None else (lambda e: output_error(e, wh))


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float, like: torch.Tensor) -> torch.Tensor:
    return (b.to(like.dtype) @ a.to(like.dtype)).mul_(scale)  # (m, n) s·B·A, scaled in place: one m×n buffer


def _residual(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W − s·B·A (m×n), written over the s·B·A buffer: the same values as ``w - _delta(...)``, one buffer.
    A transposed W (Conv1D) keeps ``w - d``: its result takes W's layout, and reductions over it depend on that."""
    d = _delta(a, b, scale, w)  # (m, n)
    return torch.sub(w, d, out=d) if d.stride() == w.stride() else w - d


def _error(w: torch.Tensor, q: NF4Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """E = (W − deq Q) − s·B·A (m×n) in the s·B·A buffer, deq(Q) a few rows at a time: the values of
    ``w - dequantize_nf4(q).to(w.dtype) - _delta(...)`` without the two extra m×n temporaries."""
    e = _delta(a, b, scale, w)  # (m, n)
    if e.stride() != w.stride():  # transposed W: the expression's result takes W's layout, keep it
        return minus_dequantized(w, q) - e
    for rows, part in dequantized_rows(q):
        torch.sub(w[rows] - part.to(w.dtype), e[rows], out=e[rows])  # (W − deq) − s·B·A
    return e


def _frob(e: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(e))


def kaiming_a(rank: int, n: int, seed: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """PEFT's default lora_A init: kaiming_uniform(a=√5) → U(−1/√n, 1/√n), seeded per tensor, on ``device``
    (drawn on the CPU generator, see :func:`qpissa.decompose.linalg.seeded_draw`, so every device gets the same A)."""
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
           svd: SvdOptions = SvdOptions(), adapter_dtype=torch.bfloat16, refit: bool = True,
           h: torch.Tensor | Whitening | None = None, damp: float = DEFAULT_DAMP) -> Init:
    """QPiSSA with T iterations (PiSSA repo): Q₀ = 0; (A,B) = SVD_r(W − deq(Q)), Q = NF4(W − s·B·A).

    Improvements: keep the iterate with the lowest ‖W − deq(Q) − s·B·A‖_F, then refit
    (A,B) = SVD_r(W − deq(Q)) on the stored Q; the refit is kept only if it lowers the error
    (Eckart–Young says it can only lower it in exact arithmetic; the bf16 cast decides the rest).

    Calibrated (``h`` = H = Σ x·xᵀ, n×n): the same recipe in the output norm ‖E·H^½‖_F — principal
    part [W·H^½]_r·H^{−½}, Q = NF4(W − L), L = [(W − deq Q)·H^½]_r·H^{−½} (CLoQ, Deng et al. 2025;
    QERA, Zhang et al. 2025), best iterate and refit judged by output error; H damped by ``damp``.
    """
    wh = None if h is None else whiten(h, damp)
    fit, measure = _fitter(svd, adapter_dtype, wh), _measure(wh)
    q = None  # Q₀ = 0: the first fit sees W itself (W − 0 = W exactly)
    best: tuple[float, torch.Tensor, torch.Tensor, NF4Tensor] | None = None
    history = []
    a = None
    for _ in range(iters):
        a, b = fit(w if q is None else minus_dequantized(w, q), rank, scale, start=a)
        q = quantize_nf4(_residual(w, a, b, scale), spec)
        err = measure(_error(w, q, a, b, scale))
        history.append(err)
        if best is None or err < best[0]:
            best = (err, a, b, q)
    err, a, b, q = best
    key = "frobenius_by_iter" if wh is None else "output_error_by_iter"
    info = {"iters": iters, key: history, "best_iter": history.index(err) + 1, "refit": False}
    if wh is not None:
        info["damp"] = wh.damp
    if refit:
        a2, b2 = fit(minus_dequantized(w, q), rank, scale, start=a)
        err2 = measure(_error(w, q, a2, b2, scale))
        if err2 < err:
            a, b, err, info["refit"] = a2, b2, err2, True
    return Init(a, b, scale, quantized=q, info=info, frobenius=err if wh is None else None)


def loftq(w: torch.Tensor, rank: int, scale: float, *, iters: int = 1, spec: NF4Spec = NF4Spec(),
          svd: SvdOptions = SvdOptions(), adapter_dtype=torch.bfloat16,
          h: torch.Tensor | Whitening | None = None, damp: float = DEFAULT_DAMP) -> Init:
    """LoftQ (Li et al. 2023), T alternating steps from A = B = 0:
    Q = NF4(W − s·B·A); (A,B) = SVD_r(W − deq(Q)). Ends on the SVD step; correct for any α and rsLoRA.

    Calibrated (``h`` given): the SVD step becomes L = [(W − deq Q)·H^½]_r·H^{−½} (output-error optimal
    for that Q, CLoQ/QERA); the history records output errors.
    """
    m, n = w.shape
    wh = None if h is None else whiten(h, damp)
    fit, measure = _fitter(svd, adapter_dtype, wh), _measure(wh)
    a = w.new_zeros(rank, n, dtype=adapter_dtype)  # (r, n) on w's device
    b = w.new_zeros(m, rank, dtype=adapter_dtype)  # (m, r)
    history = []
    for _ in range(iters):
        q = quantize_nf4(_residual(w, a, b, scale), spec)
        a, b = fit(minus_dequantized(w, q), rank, scale, start=a if history else None)
        history.append(measure(_error(w, q, a, b, scale)))
    if wh is None:
        return Init(a, b, scale, quantized=q, info={"iters": iters, "frobenius_by_iter": history},
                    frobenius=history[-1])
    return Init(a, b, scale, quantized=q, info={"iters": iters, "output_error_by_iter": history, "damp": wh.damp})


def _finish(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, spec: NF4Spec, quantize: bool,
            info: dict) -> Init:
    """Residual W − s·B·A (with the adapters as stored): NF4 on our quantizer, or kept in w's dtype."""
    residual = _residual(w, a, b, scale)  # (m, n)
    if quantize:
        return Init(a, b, scale, quantized=quantize_nf4(residual, spec), info=info)
    return Init(a, b, scale, residual=residual, info=info)


def milora(w: torch.Tensor, rank: int, scale: float, *, spec: NF4Spec = NF4Spec(), adapter_dtype=torch.bfloat16,
           quantize: bool = True) -> Init:
    """MiLoRA (Wang et al. 2024, "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient
    LLM Finetuning"): W = U·S·Vᵀ (full thin SVD); the adapter takes the r *smallest* triplets,
    A = √(S_min/s)·V_minᵀ (r×n), B = U_min·√(S_min/s) (m×r); residual W − s·B·A (the principal
    part) → NF4. Needs the full spectrum, so always an exact SVD.
    """
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)  # (m,k) (k,) (k,n)
    u, vh = canonical_signs(u[:, -rank:], vh[-rank:])  # (m, r) (r, n) smallest r, descending order kept
    root = torch.sqrt(sv[-rank:] / scale)  # (r,)
    a = (root[:, None] * vh).to(adapter_dtype)  # (r, n)
    b = (u * root[None, :]).to(adapter_dtype)  # (m, r)
    return _finish(w, a, b, scale, spec, quantize, {"iters": 0})


def olora(w: torch.Tensor, rank: int, scale: float, *, spec: NF4Spec = NF4Spec(), adapter_dtype=torch.bfloat16,
          quantize: bool = True) -> Init:
    """OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of LLMs"), as PEFT's
    ``init_lora_weights="olora"``: W = Q·R (thin QR, fp32 or w's dtype if wider), A = R[:r] (r×n),
    B = Q[:, :r] (m×r) — no √s split, exactly as PEFT — and residual W − s·B·A → NF4.
    """
    work = w if w.dtype == torch.float64 else w.float()
    qm, rm = torch.linalg.qr(work)  # (m, k) (k, n)
    a = rm[:rank].contiguous().to(adapter_dtype)  # (r, n)
    b = qm[:, :rank].contiguous().to(adapter_dtype)  # (m, r)
    return _finish(w, a, b, scale, spec, quantize, {"iters": 0})
