"""Init methods that need calibration statistics H = Σ x·xᵀ of the layer's input (n×n): CLoQ, CorDA.

Calibrated QPiSSA and LoftQ live in :mod:`qpissa.decompose.methods` (``qpissa(..., h=H)``, ``loftq(..., h=H)``);
the H-norm math (damping, roots, output error, weighted Eckart–Young) in :mod:`qpissa.decompose.whitening`.
Notation as there: W m×n, ΔW = s·B·A, A r×n, B m×r.
"""
from __future__ import annotations

import torch

from qpissa.decompose.linalg import top_singular
from qpissa.decompose.methods import DEFAULT_DAMP, Init, SvdOptions, _delta, _finish, _fitter
from qpissa.quant import NF4Spec, minus_dequantized, quantize_nf4
from qpissa.decompose.whitening import Whitening, output_error, whiten


def cloq(w: torch.Tensor, rank: int, scale: float, h: torch.Tensor | Whitening, *, spec: NF4Spec = NF4Spec(),
         svd: SvdOptions = SvdOptions(), adapter_dtype=torch.bfloat16, damp: float = DEFAULT_DAMP) -> Init:
    """CLoQ (Deng et al. 2025, arXiv 2501.18475; = QERA-exact, Zhang et al., ICLR 2025): QLoRA's
    Q = NF4(W), then the output-error-optimal rank-r correction of E = W − deq(Q):
    L = [E·H^½]_r·H^{−½}; [E·H^½]_r = U·S·Vᵀ → B = U·√(S/s), A = √(S/s)·Vᵀ·H^{−½}
    (H damped by ``damp``·mean(diag H)). One quantization, one SVD, no iterations.
    """
    wh = whiten(h, damp)
    q = quantize_nf4(w, spec)
    e = minus_dequantized(w, q)  # (m, n) QLoRA's quantization error W − deq(Q)
    a, b = _fitter(svd, adapter_dtype, wh)(e, rank, scale)
    info = {"iters": 0, "damp": wh.damp, "output_error_qlora": output_error(e, wh),
            "output_error": output_error(e - _delta(a, b, scale, w), wh)}
    return Init(a, b, scale, quantized=q, info=info)


def corda_damping(cov: torch.Tensor, damp: float = DEFAULT_DAMP, max_inv_error: float = 0.05) -> tuple[torch.Tensor, float]:
    """PEFT's CorDA damping: C̃ = C + λ·mean(diag C)·I, λ doubled from ``damp`` until the fp32 inverse
    satisfies ‖C̃·C̃⁻¹ − I‖_F < ``max_inv_error`` (checked in fp32 as PEFT does, so λ matches PEFT's).
    Returns (C̃ in fp64 on C's device, λ)."""
    c32 = cov.float()
    n = c32.shape[0]
    eye = torch.eye(n, device=c32.device, dtype=c32.dtype)  # (n, n)
    mean_diag = torch.diagonal(c32).mean()
    for _ in range(64):
        fixed = c32 + eye * mean_diag * damp  # (n, n)
        if torch.dist(fixed @ torch.linalg.inv(fixed), eye).item() < max_inv_error:
            break
        damp *= 2
    cov64 = cov.to(torch.float64)
    eye64 = torch.eye(n, device=cov.device, dtype=torch.float64)
    return cov64 + eye64 * torch.diagonal(cov64).mean() * damp, damp


def corda(w: torch.Tensor, rank: int, scale: float, cov: torch.Tensor | Whitening, *, spec: NF4Spec = NF4Spec(),
          svd: SvdOptions = SvdOptions(), adapter_dtype=torch.bfloat16, damp: float = DEFAULT_DAMP,
          quantize: bool = True) -> Init:
    """CorDA, instruction-previewed mode (Yang et al., NeurIPS 2024, "CorDA: Context-Oriented
    Decomposition Adaptation"), as PEFT's ``init_lora_weights="corda"`` with ``corda_method="ipm"``:
    C̃ = damped covariance (:func:`corda_damping`), W·C̃ = U·S·Vᵀ, keep the r *largest* triplets,
    A = √(S_r/s)·V_rᵀ·C̃⁻¹ (r×n), B = U_r·√(S_r/s) (m×r); residual W − s·B·A → NF4 on our quantizer
    (``quantize=False``: kept in full precision, PEFT's own residual).

    The factors depend on C's overall scale (B ∝ √c, A ∝ 1/√c; s·B·A does not): PEFT's covariance is
    the mean over samples of X̂ᵀX̂ with X̂ = X / |max X| per sample; pass that for PEFT's exact factors.
    """
    c = cov.h if isinstance(cov, Whitening) else cov
    c = c.to(device=w.device)
    fixed, used = corda_damping(c, damp)  # (n, n) fp64
    work = w.dtype if w.dtype == torch.float64 else torch.float32
    u, sv, vh = top_singular(w.to(work) @ fixed.to(work), rank, **svd.kwargs())  # (m, r) (r,) (r, n)
    right = torch.linalg.solve(fixed, vh.to(torch.float64).T).T.to(work)  # (r, n) V_rᵀ·C̃⁻¹ (C̃ symmetric)
    root = torch.sqrt(sv / scale)  # (r,)
    a = (root[:, None] * right).to(adapter_dtype)  # (r, n)
    b = (u * root[None, :]).to(adapter_dtype)  # (m, r)
    return _finish(w, a, b, scale, spec, quantize, {"iters": 0, "damp": used})
