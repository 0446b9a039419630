"""qpissa: quantization-aware fine-tuning built around QPiSSA (PiSSA adapters over an NF4 residual).

Python API mirrors the CLI: ``from qpissa.decompose import decompose``;
per-tensor functions live in :mod:`qpissa.decompose.linalg`, :mod:`qpissa.quant` and :mod:`qpissa.decompose.methods`.
"""
from __future__ import annotations

__version__ = "0.1.0"
