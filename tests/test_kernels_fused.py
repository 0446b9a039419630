"""Fused NF4 + low-rank linear: forward vs the reference, gradients vs torch.autograd on the reference.

Runs on CPU under Triton's interpreter: TRITON_INTERPRET=1 is set before triton is imported.
"""
from helpers import triton_interpreter

triton_interpreter()  # must precede any triton / qpissa.kernels import

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from qpissa.kernels.fused_linear import fused_nf4_lora_linear, nf4_matmul  # noqa: E402
from qpissa.kernels.reference import (  # noqa: E402
    fused_linear_backward_reference, fused_linear_reference, nf4_dequantize_reference)
from qpissa.quant import NF4Weight  # noqa: E402


def _weight(n, k, dtype=torch.float32, blocksize=64, nested=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    nf4 = NF4Weight.from_quant_state(packed, qs)
    return nf4, nf4_dequantize_reference(nf4, torch.float32)  # dense (N, K) fp32 oracle


def _inputs(m, n, k, r, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    a = (torch.randn(r, k, generator=g) / k**0.5).to(dtype)
    b = (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return x, a, b, bias


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


# (M, N, K, r, blocksize, nested): ragged M/N/K against the 16×32×32 interpreter tiles, nested stats;
# odd K takes the per-element path, even K the byte-pair path, K % blocksize == 0 the per-column scales
SHAPES = [(3, 24, 37, 2, 64, False), (5, 40, 70, 3, 64, False), (17, 33, 64, 4, 64, True), (9, 48, 96, 8, 128, True), (2, 64, 256, 16, 256, False)]


@pytest.mark.parametrize("m,n,k,r,bs,nested", SHAPES)
def test_nf4_matmul_both_orientations_vs_dense(m, n, k, r, bs, nested):
    nf4, w = _weight(n, k, blocksize=bs, nested=nested)
    x, _, _, _ = _inputs(m, n, k, r, torch.float32)
    dy = torch.randn(m, n)
    assert _rel(nf4_matmul(x, nf4, True), x @ w.t()) < 1e-5  # (M, N) = x·Wᵀ
    assert _rel(nf4_matmul(dy, nf4, False), dy @ w) < 1e-5  # (M, K) = dy·W
    xt = x.t().contiguous().t()  # same values, column-major strides
    assert _rel(nf4_matmul(xt, nf4, True), x @ w.t()) < 1e-5


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
def test_nf4_matmul_tiles_wider_than_a_block(nested):
    """128-wide tiles over 64-element blocks: per-(row, block) scales broadcast inside a tile."""
    nf4, w = _weight(160, 256, blocksize=64, nested=nested, seed=4)
    x = torch.randn(3, 256)
    dy = torch.randn(3, 160)
    tiles = (16, 128, 128)
    assert _rel(nf4_matmul(x, nf4, True, interpreter_tiles=tiles), x @ w.t()) < 1e-5
    assert _rel(nf4_matmul(dy, nf4, False, interpreter_tiles=tiles), dy @ w) < 1e-5


@pytest.mark.parametrize("dense_min_rows", [10**9, 0], ids=["fused", "dense"])  # kernel, dequantize+matmul
@pytest.mark.parametrize("m,n,k,r,bs,nested", SHAPES)
def test_fused_forward_and_grads_fp32(m, n, k, r, bs, nested, dense_min_rows):
    nf4, w = _weight(n, k, blocksize=bs, nested=nested)
    x, a, b, bias = _inputs(m, n, k, r, torch.float32)
    s = 0.75
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    refs = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    y = fused_nf4_lora_linear(leaves[0], nf4, leaves[1], leaves[2], s, leaves[3], dense_min_rows=dense_min_rows)
    y_ref = fused_linear_reference(refs[0], w, refs[1], refs[2], s, refs[3])
    assert y.shape == (m, n) and _rel(y, y_ref) < 1e-5
    dy = torch.randn(m, n)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want, name in zip(leaves, refs, ["x", "A", "B", "bias"]):
        assert _rel(got.grad, want.grad) < 1e-5, name
    # the closed form in the docstring agrees with autograd too
    dx, da, db = fused_linear_backward_reference(dy, x, w, a, b, s)
    assert _rel(dx, refs[0].grad) < 1e-5 and _rel(da, refs[1].grad) < 1e-5 and _rel(db, refs[2].grad) < 1e-5


@pytest.mark.parametrize("dense_min_rows", [10**9, 0], ids=["fused", "dense"])  # kernel, dequantize+matmul
def test_fused_separate_lora_input_and_batch_dims(dense_min_rows):
    """x_l ≠ x (PEFT's dropout path) and 3-D inputs (batch, seq, K)."""
    nf4, w = _weight(40, 64, nested=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, generator=g, requires_grad=True)
    xl = torch.randn(2, 3, 64, generator=g, requires_grad=True)
    a = torch.randn(4, 64, generator=g, requires_grad=True)
    b = torch.randn(40, 4, generator=g, requires_grad=True)
    y = fused_nf4_lora_linear(x, nf4, a, b, 2.0, x_lora=xl, dense_min_rows=dense_min_rows)
    refs = [t.detach().clone().requires_grad_() for t in (x, xl, a, b)]
    y_ref = fused_linear_reference(refs[0].reshape(6, 64), w, refs[2], refs[3], 2.0,
                                   x_lora=refs[1].reshape(6, 64)).reshape(2, 3, 40)
    assert y.shape == (2, 3, 40) and _rel(y, y_ref) < 1e-5
    dy = torch.randn(2, 3, 40)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want, name in zip((x, xl, a, b), refs, ["x", "x_lora", "A", "B"]):
        assert _rel(got.grad, want.grad) < 1e-5, name


@pytest.mark.parametrize("dense_min_rows", [10**9, 0], ids=["fused", "dense"])  # kernel, dequantize+matmul
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_half_precision_vs_fp32_reference(dtype, dense_min_rows):
    """bf16/fp16 compute: W rounded to dtype like bitsandbytes, fp32 accumulation, one final rounding."""
    nf4, _ = _weight(48, 96, dtype=dtype, nested=True)
    w_half = nf4_dequantize_reference(nf4, dtype).float()  # what bnb multiplies by
    x, a, b, bias = _inputs(9, 48, 96, 8, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    y = fused_nf4_lora_linear(leaves[0], nf4, leaves[1], leaves[2], 0.5, bias, dense_min_rows=dense_min_rows)
    assert y.dtype == dtype
    refs = [t.float().requires_grad_() for t in (x, a, b)]
    y_ref = fused_linear_reference(refs[0], w_half, refs[1], refs[2], 0.5, bias.float())
    assert _rel(y, y_ref) < 1e-2
    dy = torch.randn(9, 48)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    for got, want, name in zip(leaves, refs, ["x", "A", "B"]):
        assert _rel(got.grad, want.grad) < 2e-2, name


@pytest.mark.parametrize("dense_min_rows", [10**9, 0], ids=["fused", "dense"])  # kernel, dequantize+matmul
def test_backward_saves_no_dense_weight(dense_min_rows):
    """Frozen-base pattern: autograd saves activations and adapters, never an (N, K) weight."""
    n, k = 64, 128
    nf4, _ = _weight(n, k)
    x, a, b, _ = _inputs(4, n, k, 2, torch.float32)
    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fused_nf4_lora_linear(x.requires_grad_(), nf4, a.requires_grad_(), b.requires_grad_(), 1.0,
                                  dense_min_rows=dense_min_rows)
    y.sum().backward()
    assert saved and all(s.numel() < n * k for s in saved), saved
