"""Fused NF4 linear with a low-rank adapter: y = x·deq(Q)ᵀ + s·(x·Aᵀ)·Bᵀ (+ bias), Q frozen.

QLoRA / PiSSA / QPiSSA layers all compute this (Hu et al. 2021 "LoRA"; Dettmers et al. 2023
"QLoRA"; Meng et al. 2024 "PiSSA"). Shapes: x (M, K), Q packs W = deq(Q) (N, K),
A = lora_A (r, K), B = lora_B (N, r), s = scaling, y (M, N).

Backward (Q frozen, so only x, A, B get gradients). With u = x·Aᵀ (M, r) and y = x·Wᵀ + s·u·Bᵀ:

    ∂L/∂x = dy·W + s·(dy·B)·A          since y depends on x through x·Wᵀ and (x·Aᵀ)·Bᵀ
    ∂L/∂A = s·(dy·B)ᵀ·x                since ∂L/∂u = s·dy·B and u = x·Aᵀ ⇒ ∂L/∂A = (∂L/∂u)ᵀ·x
    ∂L/∂B = s·dyᵀ·u = s·dyᵀ·(x·Aᵀ)     since y = s·u·Bᵀ ⇒ ∂L/∂Bᵀ = s·uᵀ·dy

When the adapter sees a different input (PEFT's lora_dropout: x_l = dropout(x)), the two paths
are separated: ∂L/∂x = dy·W and ∂L/∂x_l = s·(dy·B)·A; autograd then backpropagates through dropout.

What runs where (and why):
* From ``DENSE_MIN_ROWS`` rows on (training: M = batch·sequence tokens, thousands), the big products
  are deq(Q) once by the Triton dequantize kernel (bit-identical to bitsandbytes, 1.26× its speed on
  an H100) and one cuBLAS matmul, the way bitsandbytes does it. Measured on an H100 (benchmarks/
  kernels.py, M = 4096, r = 64): the fused in-register kernel below ran at 27–30 TFLOP/s, 0.05–0.12×
  bnb + PEFT (240–550 TFLOP/s), because each W tile is decoded once per M tile (a code-book gather
  per element, M/BLOCK_M times over) where cuBLAS multiplies a decoded W at tensor-core speed.
* Below it (decode-sized M), the two big products, x·deq(Q)ᵀ (forward) and dy·deq(Q) (backward for x), are one Triton
  kernel, :func:`nf4_matmul`. It reads the packed bytes and absmax inside the reduction loop and
  dequantizes each tile in registers (:func:`_nf4_tile`: a byte is loaded once and split into its
  two nibbles, one absmax per (row, block), then the tile is rounded to the compute dtype exactly
  as bitsandbytes rounds deq(Q)) before a tensor-core ``tl.dot`` with fp32 accumulation. So deq(Q)
  never exists in memory and backward re-dequantizes instead of saving the weight (the frozen-base
  pattern of torchao/bitsandbytes). Both orientations decode the same storage-order tile; the
  forward one feeds it transposed (``TRANS_W``).
* The low-rank terms cost O(M·r·(N+K)) flops, ≈ r/N of the base matmul, so they stay in torch
  (cuBLAS) — except the final rank-r update, which the kernel folds into its epilogue
  (acc += L·R with L = s·u or s·dy·B): that saves one write and one re-read of the (M, N) output.
* dA and dB are plain torch matmuls on (M, r) activations saved from forward.
"""
from __future__ import annotations

import torch

from .nf4_dequant import (interpreting, log2_blocksize, nested_args, nf4_dequantize, triton,
                          triton_unavailable_reason)
from qpissa.quant import NF4Weight

if triton is not None:
    import triton.language as tl

    from .nf4_dequant import _block_scale, _round_bf16, _to_bf16_bits

    @triton.jit
    def _nf4_tile(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, offs_n, k0, n_mask, K,
                  TN: tl.constexpr, TK: tl.constexpr, LOG2_BS: tl.constexpr, LOG2_BS2: tl.constexpr,
                  NESTED: tl.constexpr, PAIRS: tl.constexpr, ROW_BLOCKS: tl.constexpr):
        """deq(Q)[offs_n, k0:k0+TK] as an fp32 (TN, TK) tile in storage orientation; 0 outside W.

        PAIRS (K even): each packed byte is loaded once and split into its two neighbours along k.
        ROW_BLOCKS (K % blocksize == 0): a block never crosses a row, so scales are gathered per
        (row, block) — (TN, TK/blocksize) values — and broadcast, instead of once per element.
        """
        offs_k = k0 + tl.arange(0, TK)  # (TK,)
        mask = n_mask[:, None] & (offs_k < K)[None, :]  # (TN, TK)
        row = offs_n.to(tl.int64) * K  # (TN,) flat index of each row start
        if PAIRS:
            offs_h = k0 // 2 + tl.arange(0, TK // 2)  # (TK/2,) byte within the row
            byte = tl.load(q_ptr + (row // 2)[:, None] + offs_h[None, :],
                           mask=n_mask[:, None] & (offs_h * 2 < K)[None, :], other=0).to(tl.int32)  # (TN, TK/2)
            nib = tl.reshape(tl.join(byte >> 4, byte & 0xF), (TN, TK))  # (TN, TK) high nibble first
        else:
            flat = row[:, None] + offs_k[None, :]  # (TN, TK)
            byte = tl.load(q_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
            nib = (byte >> (((flat & 1) ^ 1) * 4).to(tl.int32)) & 0xF
        if ROW_BLOCKS:
            if TK <= (1 << LOG2_BS):  # the k-range sits inside one block of each row
                blk = (row + k0) >> LOG2_BS  # (TN,)
                scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, n_mask,
                                     NESTED, LOG2_BS2)[:, None]  # (TN, 1)
            else:
                NB: tl.constexpr = TK >> LOG2_BS
                offs_b = (k0 >> LOG2_BS) + tl.arange(0, NB)  # (NB,)
                blk = (row >> LOG2_BS)[:, None] + offs_b[None, :]  # (TN, NB)
                sb = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk,
                                  n_mask[:, None] & (offs_b < (K >> LOG2_BS))[None, :], NESTED, LOG2_BS2)
                scale = tl.reshape(tl.broadcast_to(sb[:, :, None], (TN, NB, 1 << LOG2_BS)), (TN, TK))
        else:
            flat_s = row[:, None] + offs_k[None, :]  # (TN, TK)
            scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, flat_s >> LOG2_BS, mask,
                                 NESTED, LOG2_BS2)
        return tl.where(mask, tl.load(code_ptr + nib) * scale, 0.0)  # (TN, TK) fp32

    @triton.jit
    def _nf4_matmul_kernel(
        x_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset,
        l_ptr, r_ptr, bias_ptr, out_ptr,
        M, P, R, K, RANK, M_BUCKET,
        stride_xm, stride_xr, stride_lm, stride_lk, stride_rk, stride_rp, stride_om, stride_op,
        LOG2_BS: tl.constexpr, LOG2_BS2: tl.constexpr, NESTED: tl.constexpr, TRANS_W: tl.constexpr,
        HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, IN_KIND: tl.constexpr, FP32_DOT: tl.constexpr,
        PAIRS: tl.constexpr, ROW_BLOCKS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RANK: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """out (M, P) = x (M, R) · op(W) (R, P) [+ L (M, rank) · Rm (rank, P)] [+ bias (P,)].

        W = deq(Q) is (N, K) row-major in packed storage. TRANS_W: op(W) = Wᵀ (forward, R = K,
        P = N); else op(W) = W (backward for x, R = N, P = K). IN_KIND: 0 fp32, 1 bf16, 2 fp16.
        M_BUCKET (unused in the body) is M rounded up to a power of two: the autotuning key, so
        varying sequence lengths do not re-tune on every new M.
        """
        pid = tl.program_id(0)
        n_pid_m = tl.cdiv(M, BLOCK_M)
        n_pid_p = tl.cdiv(P, BLOCK_P)
        group = GROUP_M * n_pid_p  # grouped ordering: neighbouring programs share W tiles in L2
        first_m = (pid // group) * GROUP_M
        group_m = min(n_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % group_m
        pid_p = (pid % group) // group_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BP,)
        m_mask = offs_m < M
        p_mask = offs_p < P
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)  # (BM, BP)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)  # (BR,)
            r_mask = offs_r < R
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_r[None, :] * stride_xr,
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # (BM, BR)
            if TRANS_W:  # storage tile W[p-range, r-range] (BP, BR), used transposed
                w = tl.trans(_nf4_tile(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, offs_p, r0,
                                       p_mask, K, BLOCK_P, BLOCK_R, LOG2_BS, LOG2_BS2, NESTED, PAIRS,
                                       ROW_BLOCKS))  # (BR, BP)
            else:  # storage tile W[r-range, p-range] (BR, BP)
                w = _nf4_tile(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, offs_r,
                              pid_p * BLOCK_P, r_mask, K, BLOCK_R, BLOCK_P, LOG2_BS, LOG2_BS2, NESTED, PAIRS,
                              ROW_BLOCKS)  # (BR, BP)
            if FP32_DOT:  # interpreter: round W like the GPU path would, multiply in fp32
                if IN_KIND == 1:
                    w = _round_bf16(w)
                elif IN_KIND == 2:
                    w = w.to(tl.float16).to(tl.float32)
                acc = tl.dot(x.to(tl.float32), w, acc)
            elif IN_KIND == 0:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
        if HAS_LORA:  # epilogue: acc += L (BM, rank) · Rm (rank, BP)
            for k0 in range(0, RANK, BLOCK_RANK):
                offs_k = k0 + tl.arange(0, BLOCK_RANK)
                k_mask = offs_k < RANK
                lt = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_k[None, :] * stride_lk,
                             mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
                rt = tl.load(r_ptr + offs_k[:, None] * stride_rk + offs_p[None, :] * stride_rp,
                             mask=k_mask[:, None] & p_mask[None, :], other=0.0)  # (BK, BP)
                if FP32_DOT or IN_KIND == 0:
                    acc = tl.dot(lt.to(tl.float32), rt.to(tl.float32), acc)
                else:
                    acc = tl.dot(lt, rt, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op
        o_mask = m_mask[:, None] & p_mask[None, :]
        if IN_KIND == 1:
            tl.store(o_ptrs, _to_bf16_bits(acc), mask=o_mask)
        else:
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)

    _GPU_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_R": br, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bp, br, w, s in [
            (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
            (64, 256, 32, 4, 4), (32, 128, 64, 4, 4),
            (64, 128, 32, 4, 2),  # ≤ 74 KB shared even with per-element scales (K % blocksize ≠ 0)
        ]
    ]
    _tuned_kernel = None

    def _launcher():
        """The autotuned kernel on GPU, built on first use (the interpreter uses fixed tiles)."""
        global _tuned_kernel
        if _tuned_kernel is None:
            _tuned_kernel = triton.autotune(configs=_GPU_CONFIGS, key=["M_BUCKET", "P", "R", "TRANS_W", "NESTED"])(
                _nf4_matmul_kernel)
        return _tuned_kernel


_IN_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def nf4_matmul(
    x: torch.Tensor, w: NF4Weight, transpose_w: bool = True, lora_left: torch.Tensor | None = None,
    lora_right: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    interpreter_tiles: tuple[int, int, int] = (16, 32, 32),
) -> torch.Tensor:
    """x·deq(Q)ᵀ (transpose_w) or x·deq(Q), plus an optional lora_left·lora_right and bias.

    x (M, R) with R = K (transpose_w) or N; lora_left (M, r); lora_right (r, P), any strides.
    The dequantized weight is never materialized. Output (M, P) in x.dtype.
    interpreter_tiles: (BLOCK_M, BLOCK_P, BLOCK_R) under TRITON_INTERPRET (GPU tiles are autotuned).
    """
    reason = triton_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"Triton fused NF4 linear unavailable: {reason}")
    if x.dtype not in _IN_KIND:
        raise ValueError(f"x must be fp32/bf16/fp16, got {x.dtype}")
    n, k = w.shape
    m, r_dim = x.shape
    p_dim = n if transpose_w else k
    if r_dim != (k if transpose_w else n):
        raise ValueError(f"x has {r_dim} features, weight {w.shape} (transpose_w={transpose_w}) needs "
                         f"{k if transpose_w else n}")
    out = torch.empty((m, p_dim), dtype=x.dtype, device=x.device)  # (M, P)
    out_view = out.view(torch.int16) if x.dtype == torch.bfloat16 else out
    has_lora = lora_left is not None
    if has_lora:
        lora_left = lora_left.to(x.dtype)
        lora_right = lora_right.to(x.dtype)
        rank = lora_left.shape[1]
        if lora_right.shape != (rank, p_dim):
            raise ValueError(f"lora_right must be ({rank}, {p_dim}), got {tuple(lora_right.shape)}")
    else:
        lora_left = lora_right = x  # dummies, never read
        rank = 0
    absmax2, code2, offset, log2_bs2 = nested_args(w)
    args = (x, w.packed, w.absmax, w.code, absmax2, code2, offset, lora_left, lora_right,
            bias if bias is not None else x, out_view, m, p_dim, r_dim, k, rank, 1 << max(0, m - 1).bit_length(),
            x.stride(0), x.stride(1), lora_left.stride(0), lora_left.stride(1),
            lora_right.stride(0), lora_right.stride(1), out.stride(0), out.stride(1))
    meta = dict(LOG2_BS=log2_blocksize(w), LOG2_BS2=log2_bs2, NESTED=w.nested, HAS_LORA=has_lora,
                HAS_BIAS=bias is not None, IN_KIND=_IN_KIND[x.dtype], BLOCK_RANK=16 if interpreting() else 32,
                TRANS_W=transpose_w, PAIRS=k % 2 == 0, ROW_BLOCKS=k % w.blocksize == 0)
    if interpreting():
        bm, bp, br = interpreter_tiles
        meta.update(BLOCK_M=bm, BLOCK_P=bp, BLOCK_R=br, GROUP_M=4, FP32_DOT=True)
        grid = (triton.cdiv(m, bm) * triton.cdiv(p_dim, bp),)
        _nf4_matmul_kernel[grid](*args, **meta)
    else:
        def grid(cfg):
            return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(p_dim, cfg["BLOCK_P"]),)
        _launcher()[grid](*args, FP32_DOT=False, **meta)
    return out


DENSE_MIN_ROWS = 64  # from this many rows of x on: dequantize once + cuBLAS (see the module docstring)


def _base_matmul(x: torch.Tensor, w: NF4Weight, transpose_w: bool, lora_left: torch.Tensor | None = None,
                 lora_right: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 dense: bool = False) -> torch.Tensor:
    """x·op(deq(Q)) [+ lora_left·lora_right] [+ bias]: the fused kernel, or (dense) deq(Q) + one matmul."""
    if not dense:
        return nf4_matmul(x, w, transpose_w, lora_left, lora_right, bias)
    deq = nf4_dequantize(w, x.dtype)  # (N, K), rounded to the compute dtype exactly as bitsandbytes does
    y = x @ (deq.t() if transpose_w else deq)  # (M, P)
    del deq
    if lora_left is not None:
        y.addmm_(lora_left.to(x.dtype), lora_right.to(x.dtype))
    if bias is not None:
        y += bias
    return y


class FusedNF4LoRALinear(torch.autograd.Function):
    """Autograd wrapper; saves x (or x_l), u = x_l·Aᵀ, A and B — never the dequantized weight."""

    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, bias, weight: NF4Weight, scaling: float, dense: bool = False):
        xl = x if x_lora is None else x_lora
        u = xl @ lora_a.t()  # (M, r)
        y = _base_matmul(x, weight, True, u * scaling, lora_b.t(), bias, dense)  # (M, N)
        ctx.weight, ctx.scaling, ctx.separate, ctx.dense = weight, scaling, x_lora is not None, dense
        ctx.save_for_backward(xl, u, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, dy):
        xl, u, lora_a, lora_b = ctx.saved_tensors
        s, w = ctx.scaling, ctx.weight
        dy = dy.contiguous()  # (M, N)
        dyb = dy @ lora_b  # (M, r)
        dx = dxl = None
        if ctx.needs_input_grad[0]:
            if ctx.separate:
                dx = _base_matmul(dy, w, False, dense=ctx.dense)  # (M, K) = dy·W
            else:  # (M, K) = dy·W + s·(dy·B)·A
                dx = _base_matmul(dy, w, False, dyb * s, lora_a, dense=ctx.dense)
        if ctx.separate and ctx.needs_input_grad[1]:
            dxl = (dyb * s) @ lora_a  # (M, K)
        da = (dyb.t() @ xl) * s if ctx.needs_input_grad[2] else None  # (r, K)
        db = (dy.t() @ u) * s if ctx.needs_input_grad[3] else None  # (N, r)
        dbias = dy.sum(0) if ctx.needs_input_grad[4] else None  # (N,)
        return dx, dxl, da, db, dbias, None, None, None


def fused_nf4_lora_linear(
    x: torch.Tensor, weight: NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
    bias: torch.Tensor | None = None, x_lora: torch.Tensor | None = None, dense_min_rows: int = DENSE_MIN_ROWS,
) -> torch.Tensor:
    """y = x·deq(Q)ᵀ + s·(x_l·Aᵀ)·Bᵀ + bias for x (..., K) → (..., N), differentiable in x, x_l, A, B, bias.

    A, B and bias are cast (differentiably) to x.dtype, the compute dtype of the whole layer. With at least
    ``dense_min_rows`` rows the base products dequantize once and use one matmul; below, the fused kernel.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    xl2 = None if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1]).to(x.dtype)  # (M, K)
    b = None if bias is None else bias.to(x.dtype)
    y = FusedNF4LoRALinear.apply(x2, xl2, lora_a.to(x.dtype), lora_b.to(x.dtype), b, weight, float(scaling),
                                 x2.shape[0] >= dense_min_rows)
    return y.reshape(*lead, y.shape[-1])  # (..., N)


__all__ = ["DENSE_MIN_ROWS", "nf4_matmul", "fused_nf4_lora_linear", "FusedNF4LoRALinear", "triton_unavailable_reason"]
