"""The grid of a study and where each of its parts lives in STUDY (one place, read by the driver and the report)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qpissa.compare.config import CompareConfig, MethodSpec


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    spec: MethodSpec
    seed: int
    lr: float

    @property
    def name(self) -> str:
        return f"seed{self.seed}-lr{self.lr:g}"


def cells(cfg: CompareConfig) -> list[Cell]:
    """The grid, seed-major within each lr so an interrupted study has whole seeds of every method first."""
    return [Cell(spec, seed, lr) for lr in cfg.lrs() for seed in cfg.seed_list() for spec in cfg.specs()]


def decompose_dir(study: Path, spec: MethodSpec) -> Path:
    return study / "decompose" / spec.key


def run_dir(study: Path, cell: Cell) -> Path:
    return study / "runs" / cell.spec.key / cell.name
