"""qpissa: quantization-aware fine-tuning built around QPiSSA (PiSSA adapters over an NF4 residual).

One folder per stage: :mod:`qpissa.decompose`, :mod:`qpissa.train`, :mod:`qpissa.use`, :mod:`qpissa.plan`,
and :mod:`qpissa.cli` on top (see ARCHITECTURE.md). The Python API mirrors the CLI and takes the same
config dataclasses: ``from qpissa.decompose import decompose, DecomposeConfig``,
``from qpissa.train import train, TrainConfig``; per-tensor functions live in :mod:`qpissa.decompose.methods`,
:mod:`qpissa.decompose.linalg` and :mod:`qpissa.quant`.
"""
from __future__ import annotations

__version__ = "0.1.0"
