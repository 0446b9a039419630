"""Triton kernels for NF4 (installed as ``qpissa.kernels``; never importable as top-level ``kernels``).

* ``nf4_dequant``  — NF4 → fp32/bf16/fp16, bit-exact to ``bitsandbytes.functional.dequantize_4bit``.
* ``fused_linear`` — y = x·deq(Q)ᵀ + s·(x·Aᵀ)·Bᵀ with its autograd backward; deq(Q) never hits memory.
* ``reference``    — plain-PyTorch references every kernel is tested against.

Importing this package does not import Triton; the submodules do (Triton is optional).
"""
