"""One target weight → (part tensors, metrics): the method plus the QLoRA/LoftQ baselines, measured."""
from __future__ import annotations

import hashlib

import torch

from qpissa.errors import UserError
from qpissa.decompose.config import DecomposeConfig
from qpissa.decompose.linalg import balance_factors, error_norms
from qpissa.decompose.methods import adapter_scale, loftq, qpissa
from qpissa.decompose.initialize import initialize
from qpissa.decompose.targets import Target
from qpissa.decompose.whitening import Whitening, output_error
from qpissa.quant import minus_dequantized, quantize_nf4

Stats = tuple[Whitening, torch.Tensor | None]  # (calibration H with its roots, held-out H) of one target


def decompose_tensor(target: Target, w: torch.Tensor, cfg: DecomposeConfig,
                     stats: Stats | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the method and the baselines on one weight (calibrated when ``stats`` is given); return
    (part tensors, metrics)."""
    dtype = getattr(torch, cfg.dtype)
    w = (w.T if target.transposed else w).to(device=cfg.device, dtype=dtype)  # (m, n)
    if not _all_finite(w):
        raise UserError(f"{target.weight.file}: tensor {target.weight.name} contains NaN or Inf; fix the checkpoint")
    if cfg.loftq_baseline is None or cfg.spectral_norms is None:
        cfg = cfg.resolved(w.numel())
    spec, svd = cfg.spec(), cfg.svd_options()
    scale = adapter_scale(cfg.rank, cfg.alpha, cfg.rslora)
    adapter_dtype = getattr(torch, cfg.adapter_dtype)
    seed = _seed(target, cfg)
    h = None if stats is None else stats[0]
    init = initialize(cfg.method, w, cfg.rank, scale, iters=cfg.iters, spec=spec, svd=svd, seed=seed,
                      adapter_dtype=adapter_dtype, refit=cfg.refit, h=h, damp=cfg.damp)
    if cfg.balances(calibrated=h is not None):  # B·A unchanged exactly: the residual and every error below stay the same
        init.a, init.b = balance_factors(init.a, init.b)
    if init.residual is not None:  # measure what is stored: the residual in the checkpoint's dtype
        init.residual = init.residual.to(_source_dtype(target))
    h_eval = None if stats is None else (stats[1] if stats[1] is not None else stats[0])  # held-out H if any
    outputs: dict[str, float] = {}

    def measure(which: str, hat: torch.Tensor | None = None, e: torch.Tensor | None = None) -> dict:
        """Weight-error norms of one reconstruction, and its output error when calibrated (``hat`` is not kept:
        W − Ŵ is written over it when the layouts agree, the values and layout of ``w - hat``; or ``e`` given)."""
        if e is None:
            e = torch.sub(w, hat, out=hat) if hat.stride() == w.stride() else w - hat  # (m, n)
        if h_eval is not None:
            outputs[which] = output_error(e, h_eval)
        return error_norms(e, cfg.spectral_norms)

    if init.frobenius is not None and h_eval is None and not cfg.spectral_norms:  # measured by the method already
        error = {"nuclear": None, "frobenius": init.frobenius, "spectral": None}
    else:
        error = measure("method", init.reconstruction().to(dtype))
    metrics = {"module": target.module, "tensor": target.weight.name, "shape": list(target.shape),
               "rank": cfg.rank,
               "method": error, "qlora": error, "info": init.info}
    if cfg.method == "qlora":  # B = 0: the method's reconstruction is the QLoRA baseline's
        if h_eval is not None:
            outputs["qlora"] = outputs["method"]
    else:  # quantize W once more for the baseline
        metrics["qlora"] = measure("qlora", e=minus_dequantized(w, quantize_nf4(w, spec)))
    if cfg.method == "loftq" and h is None:
        metrics["loftq"] = metrics["method"]
    elif cfg.loftq_baseline:  # uncalibrated LoftQ(T), also in calibrated runs
        baseline = loftq(w, cfg.rank, scale, iters=cfg.iters, spec=spec, svd=svd, adapter_dtype=adapter_dtype)
        metrics["loftq"] = measure("loftq", baseline.reconstruction().to(dtype))
    if stats is not None and cfg.loftq_baseline:  # uncalibrated QPiSSA(T) too
        plain = qpissa(w, cfg.rank, scale, iters=cfg.iters, spec=spec, svd=svd, adapter_dtype=adapter_dtype,
                       refit=cfg.refit)
        metrics["qpissa"] = measure("qpissa", plain.reconstruction().to(dtype))
    if stats is not None:  # every output error on the held-out H
        metrics["output"] = outputs
        metrics["output_split"] = "held_out" if stats[1] is not None else "calibration"
    name = target.weight.name
    if init.quantized is not None:
        tensors = init.quantized.serialized(name)
    else:
        residual = init.residual
        tensors = {name: (residual.T if target.transposed else residual).contiguous().cpu()}
    tensors["__lora_A__"] = init.a.contiguous().cpu()
    tensors["__lora_B__"] = init.b.contiguous().cpu()
    return tensors, metrics


def measure_curve(target: Target, w: torch.Tensor, cfg: DecomposeConfig, mean_rank: float,
                  stats: Stats | None = None) -> dict:
    """The first pass of ``--rank-allocation error``: this module's measured error curve
    (:func:`qpissa.decompose.allocation.error_curve`) at its candidate ranks, with its width m+n."""
    from qpissa.decompose.allocation import candidate_ranks, error_curve
    from qpissa.decompose.whitening import whiten

    w = (w.T if target.transposed else w).to(device=cfg.device, dtype=getattr(torch, cfg.dtype))  # (m, n)
    if not _all_finite(w):
        raise UserError(f"{target.weight.file}: tensor {target.weight.name} contains NaN or Inf; fix the checkpoint")
    ranks = candidate_ranks(cfg.rank, tuple(w.shape), mean_rank)
    svd = cfg.svd_options().kwargs()
    svd["seed"] = _seed(target, cfg)
    h = None if stats is None else whiten(stats[0], cfg.damp)
    errors = error_curve(w, ranks, spec=cfg.spec(), svd_kwargs=svd, h=h)
    return {"ranks": ranks, "errors": errors, "width": int(w.shape[0] + w.shape[1])}


def _seed(target: Target, cfg: DecomposeConfig) -> int:
    return cfg.seed + int(hashlib.sha256(target.module.encode()).hexdigest()[:8], 16)


def _all_finite(w: torch.Tensor) -> bool:
    """No NaN/Inf in ``w``: a NaN or Inf makes the sum NaN or Inf, so a finite sum settles it in one read (an
    overflowing sum of finite weights falls back to the elementwise check, no m×n bool temporary otherwise)."""
    return bool(torch.isfinite(w.sum())) or bool(torch.isfinite(w).all())


def _source_dtype(target: Target) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[target.weight.dtype]

