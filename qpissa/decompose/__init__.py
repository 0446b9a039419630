"""Stage 1, decompose: a checkpoint → OUT/residual (NF4) + OUT/adapter (principal components) + reports.

``from qpissa.decompose import decompose, DecomposeConfig``. Inside: the driver (:mod:`.driver`), one
tensor (:mod:`.tensor`), the init methods (:mod:`.methods`, :mod:`.methods_calibrated`), their linear
algebra (:mod:`.linalg`, :mod:`.whitening`), targets, calibration, sharding, assembly and the report.
"""
from __future__ import annotations

from typing import Any

_API = {"decompose": "driver", "default_model_dir": "driver", "DecomposeConfig": "config",
        "decompose_tensor": "tensor"}


def __getattr__(name: str) -> Any:  # lazy: importing a submodule does not load the whole stage
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"qpissa.decompose.{_API[name]}"), name)
    raise AttributeError(f"module 'qpissa.decompose' has no attribute {name!r}")
