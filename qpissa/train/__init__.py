"""Stage 2, train: fine-tune the adapter of a decompose output (or a LoRA/full baseline) on local data.

``from qpissa.train import train, TrainConfig``; the loop is :mod:`qpissa.train.loop`.
"""
from __future__ import annotations

from typing import Any

_API = {"train": "loop", "fit": "loop", "TrainConfig": "config", "TrainingDiverged": "config",
        "load_model": "model", "evaluate_loss": "metrics"}


def __getattr__(name: str) -> Any:  # lazy: importing a submodule does not load the whole stage
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"qpissa.train.{_API[name]}"), name)
    raise AttributeError(f"module 'qpissa.train' has no attribute {name!r}")
