"""One entry point for every init method: :func:`initialize` dispatches on the method name.

A new method: write its pure function (W → :class:`~qpissa.decompose.methods.Init`) in
:mod:`qpissa.decompose.methods` (or :mod:`qpissa.decompose.methods_calibrated` when it needs H), add its name
to ``Method``/``METHODS`` there (and ``QUANTIZED_METHODS`` when the residual is NF4), and a branch here.
"""
from __future__ import annotations

import torch

from qpissa.errors import UserError
from qpissa.decompose.methods import (CALIBRATED_METHODS, DEFAULT_DAMP, METHODS, Init, Method, SvdOptions, loftq, lora,
                                     milora, olora, pissa, qlora, qpissa)
from qpissa.decompose.methods_calibrated import cloq, corda
from qpissa.decompose.whitening import Whitening
from qpissa.quant import NF4Spec


def initialize(method: Method, w: torch.Tensor, rank: int, scale: float, *, iters: int = 1,
               spec: NF4Spec = NF4Spec(), svd: SvdOptions = SvdOptions(), seed: int = 0,
               adapter_dtype=torch.bfloat16, refit: bool = True,
               h: torch.Tensor | Whitening | None = None, damp: float = DEFAULT_DAMP) -> Init:
    """Run ``method`` on one weight ``w`` (m×n, fp32 or fp64).

    ``h``: calibration statistics H = Σ x·xᵀ of this layer's input (n×n), or a :class:`Whitening`
    built once from it; required by cloq and corda, used by qpissa and loftq, ignored otherwise.
    ``damp``: λ of H + λ·mean(diag H)·I (for a Whitening, the one it was built with); corda starts its
    PEFT damping schedule from it.
    """
    if method in CALIBRATED_METHODS and h is None:
        raise UserError(f"method {method!r} needs calibration statistics: pass --calib-data FILE "
                        f"(or choose one of {', '.join(m for m in METHODS if m not in CALIBRATED_METHODS)})")
    if method == "lora":
        return lora(w, rank, scale, seed=seed, adapter_dtype=adapter_dtype)
    if method == "qlora":
        return qlora(w, rank, scale, spec=spec, seed=seed, adapter_dtype=adapter_dtype)
    if method == "pissa":
        return pissa(w, rank, scale, svd=svd, adapter_dtype=adapter_dtype)
    if method == "qpissa":
        return qpissa(w, rank, scale, iters=iters, spec=spec, svd=svd, adapter_dtype=adapter_dtype, refit=refit,
                      h=h, damp=damp)
    if method == "loftq":
        return loftq(w, rank, scale, iters=iters, spec=spec, svd=svd, adapter_dtype=adapter_dtype, h=h, damp=damp)
    if method == "milora":
        return milora(w, rank, scale, spec=spec, adapter_dtype=adapter_dtype)
    if method == "olora":
        return olora(w, rank, scale, spec=spec, adapter_dtype=adapter_dtype)
    if method in ("cloq", "corda"):
        if method == "cloq":
            return cloq(w, rank, scale, h, spec=spec, svd=svd, adapter_dtype=adapter_dtype, damp=damp)
        return corda(w, rank, scale, h, spec=spec, svd=svd, adapter_dtype=adapter_dtype, damp=damp)
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
