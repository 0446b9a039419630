"""Batched expert decompose (qpissa/decompose/experts_batch.py) against the per-matrix path, to its documented
tolerance: the same algorithm up to the range finder's bf16 sketch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moe_models import build
from safetensors import safe_open

from qpissa.decompose import decompose
from qpissa.decompose.experts_batch import StackNF4, qpissa_batch
from qpissa.decompose.methods import SvdOptions, qpissa
from qpissa.quant import NF4Spec, quantize_nf4


def stack(e: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """E matrices with decaying spectra (σ_k ∝ k^-0.6) + noise, rounded to bf16 as a checkpoint stores them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(e):
        u, _ = torch.linalg.qr(torch.randn(m, 32, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, 32, generator=g))
        s = torch.arange(1, 33, dtype=torch.float32) ** -0.6
        out.append(u @ torch.diag(s) @ v.T + 0.01 * torch.randn(m, n, generator=g))
    return torch.stack(out).bfloat16().float()


@pytest.mark.parametrize("iters", [1, 2])
def test_fp32_batch_is_the_per_matrix_algorithm(iters):
    """With the sketch in fp32 (sketch=None) the batch runs the per-matrix arithmetic: equal up to GEMM rounding."""
    w = stack(3, 96, 128)
    a, b, q, infos, err = qpissa_batch(w, 8, 1.0, iters=iters, blocksize=64, oversample=16, power_iters=4, seed=0,
                                       adapter_dtype=torch.float32, refit=True, sketch=None)
    for e in range(3):
        ref = qpissa(w[e], 8, 1.0, iters=iters, svd=SvdOptions("randomized"), adapter_dtype=torch.float32)
        assert torch.allclose(b[e] @ a[e], ref.b @ ref.a, rtol=0, atol=1e-4 * float((ref.b @ ref.a).abs().max()))
        assert abs(float(err[e]) - ref.frobenius) < 1e-4 * ref.frobenius
        assert infos[e]["refit"] == ref.info["refit"] and infos[e]["best_iter"] == ref.info["best_iter"]
        codes = (q.packed[e] != ref.quantized.packed.reshape(-1)).float().mean()
        assert codes < 1e-3  # a code flips only where W − s·B·A sits on a decision boundary to float rounding


def test_stack_nf4_is_per_expert_nf4_bytes():
    """One NF4 call over the stack writes each expert's own bytes (blocks never straddle two experts)."""
    w = stack(4, 64, 192)
    s = StackNF4(w, 64)
    for e in range(4):
        q = quantize_nf4(w[e], NF4Spec())
        assert torch.equal(s.packed[e], q.packed.reshape(-1)) and torch.equal(s.absmax[e], q.state.absmax)
        assert torch.equal(s.expert(e).packed, q.packed)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batch")
    src = build("mixtral", root / "src")  # w1/w3/w2 per expert on disk
    kw = dict(rank=4, progress=False, loftq_baseline=False, spectral_norms=False)  # the batchable metrics
    return {"batch": (decompose(src, root / "batch", **kw), root / "batch"),
            "per": (decompose(src, root / "per", expert_batch=False, **kw), root / "per")}


def test_batched_decompose_matches_per_matrix_within_tolerance(outputs):
    (rb, ob), (rp, op) = outputs["batch"], outputs["per"]
    mb, mp = ({m["module"]: m for m in r["modules"]} for r in (rb, rp))
    experts = [k for k in mp if ".experts." in k]
    assert len(experts) == 16 and all(mb[k]["expert"]["batch"] == 4 for k in experts)  # 4 experts per batch
    assert all("batch" not in (mp[k].get("expert") or {}) for k in experts)
    for k in experts:  # each expert's ‖W − Ŵ‖_F within 1%; QLoRA's baseline is the same computation
        assert abs(mb[k]["method"]["frobenius"] - mp[k]["method"]["frobenius"]) < 1e-2 * mp[k]["method"]["frobenius"]
        assert abs(mb[k]["qlora"]["frobenius"] - mp[k]["qlora"]["frobenius"]) < 1e-5 * mp[k]["qlora"]["frobenius"]
        assert mb[k]["method"]["frobenius"] < mb[k]["qlora"]["frobenius"]
    mean = lambda m: sum(m[k]["method"]["frobenius"] for k in experts) / len(experts)  # noqa: E731
    assert mean(mb) < 1.005 * mean(mp)
    load = lambda p: (lambda f: {k: f.get_tensor(k) for k in f.keys()})(safe_open(str(p), "pt"))  # noqa: E731
    ab, ap = load(ob / "adapter" / "adapter_model.safetensors"), load(op / "adapter" / "adapter_model.safetensors")
    assert ab.keys() == ap.keys()
    for k in ab:
        assert float((ab[k].float() - ap[k].float()).norm() / ap[k].float().norm()) < 2e-2, k
    nb, np_ = load(ob / "residual" / "nf4-experts.safetensors"), load(op / "residual" / "nf4-experts.safetensors")
    assert nb.keys() == np_.keys()
    packed = [k for k in nb if nb[k].dtype == torch.uint8 and nb[k].ndim == 2]
    differ = sum(int((nb[k] != np_[k]).sum()) for k in packed) / sum(nb[k].numel() for k in packed)
    assert differ < 0.05  # bytes (two codes each) that differ: codes on a decision boundary
    assert json.loads((ob / "residual" / "config.json").read_text()) == json.loads((op / "residual" / "config.json").read_text())
