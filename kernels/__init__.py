"""Triton kernels for NF4 (installed as ``qpissa.kernels``; never importable as top-level ``kernels``)."""
