"""Stage 5, compare: methods × seeds × learning rates on the same data → one table with error bars.

``from qpissa.compare import compare, CompareConfig``. :mod:`.config` declares the options and parses the
grid, :mod:`.study` runs it through the decompose/train/eval stages (resumable), :mod:`.report` turns the
stored runs into results.json/csv, summary.md and curves.png, :mod:`.stats` holds the confidence intervals.
"""
from __future__ import annotations

from typing import Any

_API = {"compare": "study", "CompareConfig": "config"}


def __getattr__(name: str) -> Any:  # lazy, as qpissa.decompose
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"qpissa.compare.{_API[name]}"), name)
    raise AttributeError(f"module 'qpissa.compare' has no attribute {name!r}")
