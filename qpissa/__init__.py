"""qpissa: quantization-aware fine-tuning built around QPiSSA (PiSSA adapters over an NF4 residual)."""
from __future__ import annotations

__version__ = "0.1.0"
