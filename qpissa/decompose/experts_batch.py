"""One block's experts of one kind decomposed as a batch: batched randomized SVD / QR and batched NF4.

The per-matrix path (:func:`qpissa.decompose.experts.decompose_expert`) runs QPiSSA on one expert matrix at a time:
128 experts × 2 kinds per Qwen3-30B-A3B block, each a dozen skinny fp32 GEMMs (W·Ω with Ω n×(r+p), r+p = 32),
small QRs and elementwise NF4 passes. Stacking alone does not make these cheaper at one thread (fp32 sketch: 1.0–1.1×,
benchmarks/moe_batch_kernel.py); what does is the bf16 range finder below and fewer passes (W − s·B·A in one
``baddbmm``, W − deq Q computed once for the error and the refit): 1.52× CPU for the kernel. Here a group of experts
(same block, same kind: same shape) is one (E, m, n) stack:

* randomized SVD (Halko et al. 2011, as :func:`qpissa.decompose.linalg.randomized_svd`, the same Ω drawn from
  the same seed) with ``torch.bmm`` and batched ``linalg.qr``/``linalg.svd``; the range-finder products W·Ω,
  Wᵀ·Q (the power iterations, most of the FLOPs) run in bfloat16 (:data:`SKETCH_DTYPE`; exact for a bf16
  checkpoint's W, fp32 accumulation, ≈4–5× faster than fp32 on an AVX512-BF16 CPU) and every QR, the projection
  B = QᵀW, the small SVD and every residual/error in fp32;
* NF4 of the whole stack in one call: blocks never straddle two experts (m·n is a multiple of the block size,
  checked), so the bytes of expert e are exactly those one call on expert e alone writes.

Tolerance (tests/test_moe_batch.py): only the sketch's rounding differs from the per-matrix path. Each expert's
reconstruction error ‖W − deq Q − s·B·A‖_F within 1% (measured ≤ 0.02% at Qwen3-30B-A3B's shapes), the QLoRA
baseline identical, the stored factors within 2% (relative, per fused adapter tensor, on decaying spectra; a flat
tail of near-equal σ's lets the rank-r subspace rotate without changing the error), NF4 bytes differing only where
W − s·B·A sits on a decision boundary (< 5% of bytes; 0.5% at the 30B-A3B shapes). With ``sketch=None`` (fp32) the
batch is the per-matrix arithmetic up to GEMM rounding. Everything else (QPiSSA's T iterations, best iterate,
refit, QLoRA baseline, part layout, metrics) is the same.
"""
from __future__ import annotations

from typing import Callable

import torch

from qpissa.decompose.config import DecomposeConfig
from qpissa.errors import UserError
from qpissa.decompose.experts import ExpertTarget, load_expert
from qpissa.decompose.linalg import seeded_draw
from qpissa.decompose.methods import adapter_scale
from qpissa.nf4_cpu import dequantize_nf4_cpu, nf4_code
from qpissa.quant import NF4Tensor, quantize_nf4

SKETCH_DTYPE = torch.bfloat16  # dtype of the range finder's products (None: fp32, the per-matrix arithmetic)
BATCH_WEIGHTS = 7 << 20  # weights per batch: each fp32 (E, m, n) buffer < 32 MiB, from the reused heap (qpissa.decompose.heap)


def batchable(cfg: DecomposeConfig, target: ExpertTarget, calibrated: bool) -> bool:
    """Whether ``target`` can run in a batch: the default expert path (uncalibrated QPiSSA, NF4, randomized SVD,
    Frobenius metrics only, no double quantization) and whole NF4 blocks per expert. Anything else: per matrix."""
    if not isinstance(target, ExpertTarget):
        return False
    m, n = target.shape
    return (cfg.expert_batch and cfg.method == "qpissa" and cfg.experts_dtype == "nf4" and not calibrated
            and cfg.svd == "randomized" and cfg.dtype == "float32" and not cfg.loftq_baseline
            and not cfg.spectral_norms and not cfg.balance_factors and not cfg.double_quant
            and (m * n) % cfg.blocksize == 0 and (m * n) % 2 == 0)


def jobs(targets: list, pending: list[int], config_of: Callable, calibrated: bool) -> list[list[int]]:
    """Pending target indices (in order) as jobs: consecutive experts of one block and kind that can run as one
    batch (:func:`groups`) together, every other target alone. ``config_of(target)``: its decompose config."""
    out: list[list[int]] = []
    for i in pending:
        t = targets[i]
        if out and batchable(config_of(t), t, calibrated):
            prev = targets[out[-1][-1]]
            if (batchable(config_of(prev), prev, calibrated)
                    and len(groups([*(targets[j] for j in out[-1]), t])) == 1):
                out[-1].append(i)
                continue
        out.append([i])
    return out


def groups(targets: list[ExpertTarget]) -> list[list[ExpertTarget]]:
    """Consecutive targets of one experts module and kind, split so a batch holds ≤ :data:`BATCH_WEIGHTS`."""
    out: list[list[ExpertTarget]] = []
    for t in targets:
        last = out[-1] if out else None
        if (last and (last[0].experts_module, last[0].kind) == (t.experts_module, t.kind)
                and (len(last) + 1) * t.shape[0] * t.shape[1] <= BATCH_WEIGHTS):
            last.append(t)
        else:
            out.append([t])
    return out


def _canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qpissa.decompose.linalg.canonical_signs` per batch member: u (E, m, r), vh (E, r, n)."""
    idx = u.abs().argmax(dim=1, keepdim=True)  # (E, 1, r)
    sign = torch.sign(torch.gather(u, 1, idx))  # (E, 1, r)
    sign[sign == 0] = 1
    return u * sign, vh * sign.transpose(1, 2)


def randomized_svd_batch(w: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int,
                         start: torch.Tensor | None = None, sketch: torch.dtype | None = SKETCH_DTYPE):
    """Top-``rank`` (U (E,m,r), S (E,r), Vh (E,r,n)) of each matrix of ``w`` (E, m, n) fp32; ``start`` (E, r', n):
    warm-start rows (then one power iteration), as :func:`qpissa.decompose.linalg.randomized_svd`."""
    e, m, n = w.shape
    k = min(rank + oversample, m, n)
    omega = seeded_draw(torch.randn, (n, k), seed, w.dtype, w.device).expand(e, n, k).clone()  # (E, n, k)
    if start is not None:
        omega[:, :, : start.shape[1]] = start.transpose(1, 2).to(omega)
        power_iters = min(power_iters, 1)
    lo = w if sketch is None else w.to(sketch)  # (E, m, n): exact for a bf16 checkpoint
    cast = (lambda t: t) if sketch is None else (lambda t: t.to(sketch))
    q, _ = torch.linalg.qr(torch.bmm(lo, cast(omega)).float())  # (E, m, k)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(torch.bmm(lo.transpose(1, 2), cast(q)).float())  # (E, n, k)
        q, _ = torch.linalg.qr(torch.bmm(lo, cast(z)).float())  # (E, m, k)
    del lo
    b = torch.bmm(q.transpose(1, 2), w)  # (E, k, n) fp32
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)  # (E,k,k) (E,k) (E,k,n)
    u = torch.bmm(q, ub[:, :, :rank])  # (E, m, r)
    u, vh = _canonical_signs(u, vh[:, :rank])
    return u, s[:, :rank], vh


class StackNF4:
    """NF4 of an (E, m, n) stack in one call: packed (E, m·n/2) uint8, absmax (E, m·n/blocksize) fp32."""

    def __init__(self, x: torch.Tensor, blocksize: int) -> None:
        e, m, n = x.shape
        q = quantize_nf4(x.reshape(e * m, n), _spec(blocksize))
        self.packed = q.packed.reshape(e, -1)
        self.absmax = q.state.absmax.float().reshape(e, -1)
        self.shape, self.blocksize = (e, m, n), blocksize

    def dequantize(self) -> torch.Tensor:
        """(E, m, n) fp32, ``code[q]·absmax`` as bitsandbytes computes it."""
        code = nf4_code(self.packed.device)
        return dequantize_nf4_cpu(self.packed.reshape(-1), self.absmax.reshape(-1), code, self.blocksize, self.shape)

    def select(self, keep: torch.Tensor, other: "StackNF4") -> None:
        """Take ``other``'s expert e where ``keep[e]`` (a bool (E,) tensor)."""
        self.packed = torch.where(keep[:, None], other.packed, self.packed)
        self.absmax = torch.where(keep[:, None], other.absmax, self.absmax)

    def expert(self, e: int) -> NF4Tensor:
        """Expert e as the NF4Tensor the per-matrix quantizer returns (own copies of its bytes)."""
        from qpissa.nf4_cpu import NF4State

        _, m, n = self.shape
        state = NF4State(absmax=self.absmax[e].clone(), shape=torch.Size((m, n)), code=nf4_code(self.packed.device),
                         blocksize=self.blocksize)
        return NF4Tensor(self.packed[e].reshape(-1, 1).clone(), state)


def _spec(blocksize: int):
    from qpissa.quant import NF4Spec

    return NF4Spec(blocksize, False)


def _norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=(1, 2))  # (E,)


def qpissa_batch(w: torch.Tensor, rank: int, scale: float, *, iters: int, blocksize: int, oversample: int,
                 power_iters: int, seed: int, adapter_dtype: torch.dtype, refit: bool,
                 sketch: torch.dtype | None = SKETCH_DTYPE) -> tuple[torch.Tensor, torch.Tensor, StackNF4, list[dict], torch.Tensor]:
    """:func:`qpissa.decompose.methods.qpissa` (uncalibrated) on every matrix of ``w`` (E, m, n) fp32 at once:
    (A (E,r,n), B (E,m,r) in ``adapter_dtype``, Q, per-expert info, per-expert ‖W − deq Q − s·B·A‖_F)."""

    def fit(target: torch.Tensor, start: torch.Tensor | None):
        u, s, vh = randomized_svd_batch(target, rank, oversample, power_iters, seed,
                                        None if start is None else start.float(), sketch)
        root = torch.sqrt(s / scale)  # (E, r)
        return (root[:, :, None] * vh).to(adapter_dtype), (u * root[:, None, :]).to(adapter_dtype)

    def minus(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(x, b.float(), a.float(), alpha=-scale)  # x − s·B·A (E, m, n), one pass

    d, a, history, best = None, None, [], None  # d = W − deq(Q): the refit's target and the error's start
    for _ in range(iters):
        a, b = fit(w if d is None else d, a)
        q = StackNF4(minus(w, a, b), blocksize)
        d = w - q.dequantize()
        err = _norms(minus(d, a, b))
        history.append(err)
        if best is None:
            best = [err.clone(), a, b, q]
        else:
            keep = err < best[0]
            best = [torch.where(keep, err, best[0]), torch.where(keep[:, None, None], a, best[1]),
                    torch.where(keep[:, None, None], b, best[2]), best[3]]
            best[3].select(keep, q)
    err, a, b, q = best
    hist = torch.stack(history, 1).tolist()  # (E, iters)
    infos = [{"iters": iters, "frobenius_by_iter": h, "best_iter": h.index(min(h)) + 1, "refit": False} for h in hist]
    if refit:
        d = d if iters == 1 else w - q.dequantize()
        a2, b2 = fit(d, a)
        err2 = _norms(minus(d, a2, b2))
        keep = err2 < err
        a, b = torch.where(keep[:, None, None], a2, a), torch.where(keep[:, None, None], b2, b)
        err = torch.where(keep, err2, err)
        for info, k in zip(infos, keep.tolist()):
            info["refit"] = bool(k)
    return a, b, q, infos, err


def decompose_group(group: list[ExpertTarget], cfg: DecomposeConfig) -> list[tuple[dict, dict]]:
    """(part tensors, metrics) per expert of ``group`` (one experts module and kind), as
    :func:`qpissa.decompose.experts.decompose_expert` writes them for the NF4 path."""
    w = torch.stack([load_expert(t) for t in group]).to(device=cfg.device, dtype=torch.float32)  # (E, m, n)
    finite = torch.isfinite(w.sum(dim=(1, 2)))
    if not bool(finite.all()):  # the per-matrix path's message, naming the first such expert
        t = group[int((~finite).nonzero()[0])]
        raise UserError(f"{t.weight.file}: tensor {t.weight.name} contains NaN or Inf; fix the checkpoint")
    scale = adapter_scale(cfg.rank, cfg.alpha, cfg.rslora)
    a, b, q, infos, err = qpissa_batch(w, cfg.rank, scale, iters=cfg.iters, blocksize=cfg.blocksize,
                                       oversample=cfg.oversample, power_iters=cfg.power_iters, seed=cfg.seed,
                                       adapter_dtype=getattr(torch, cfg.adapter_dtype), refit=cfg.refit)
    base = StackNF4(w, cfg.blocksize)  # the QLoRA baseline: NF4(W), B = 0
    qlora = _norms(w - base.dequantize()).tolist()
    del base, w
    out = []
    for i, t in enumerate(group):
        tensors = {t.residual_key + k[len("w"):]: v for k, v in q.expert(i).serialized("w").items()}
        tensors["__lora_A__"], tensors["__lora_B__"] = a[i].contiguous().cpu(), b[i].contiguous().cpu()
        frob = float(err[i])
        metrics = {"module": t.module, "tensor": ", ".join(s.name for s in t.sources) + (f"[{t.expert}]" if t.fused else ""),
                   "shape": list(t.shape), "rank": cfg.rank,
                   "method": {"nuclear": None, "frobenius": frob, "spectral": None},
                   "qlora": {"nuclear": None, "frobenius": qlora[i], "spectral": None}, "info": infos[i],
                   "expert": {"index": t.expert, "kind": t.kind, "module": t.experts_module, "method": cfg.method,
                              "calibrated": False, "fallback": False, "batch": len(group)}}
        out.append((tensors, metrics))
    return out
