"""Cost model of ``qpissa decompose``, fit to timings of the shipped driver (not a copy of its algorithm).

Per target tensor (m×n) at rank r and T iterations, with k = r + oversample, the driver's seconds are

    t = m·n · (α + β·k + (T − 1)·γ)

(every stage is linear in m·n at fixed k: NF4 quantization and the residual/error passes cost α, the
randomized SVD's matmuls 2mnk per pass cost β·k, each further QPiSSA iteration γ), plus fixed costs:
imports + setup (``import_s``) and the stream over the checkpoint's bytes when assembling the residual
shards (``other_s_per_byte``). Peak memory above the import baseline is ``peak_bytes_per_weight`` times
the largest target's m·n. ``benchmarks/decompose_rehearsal.py`` measures α, β, γ by running
:func:`qpissa.decompose.decompose` on a synthetic Llama-3-8B-shaped checkpoint at (r, T) = (16, 1),
(128, 1), (16, 5) on one target and (16, 1) on a smaller one — CPU seconds with one torch thread, so a loaded
machine does not skew the fit — and writes them to ``decompose_rates.json`` beside this module.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

RATES_PATH = Path(__file__).with_name("decompose_rates.json")


def load_rates(path: Path = RATES_PATH) -> dict:
    """The packaged rates table (from the rehearsal benchmark on the machine named inside it)."""
    if not path.is_file():
        from qpissa.errors import UserError

        raise UserError(f"{path} is missing; measure it with `python benchmarks/decompose_rehearsal.py "
                        "--only-calibration --write-rates`")
    return json.loads(path.read_text())


def per_weight_seconds(rates: dict, rank: int, iters: int = 1) -> float:
    """α + β·(r + p) + (T − 1)·γ: driver seconds per target weight."""
    s = rates["s_per_weight"]
    return s["base"] + s["per_k"] * (rank + rates.get("oversample", 16)) + (iters - 1) * s["per_extra_iter"]


def fit_rates(runs: Sequence[dict], oversample: int = 16) -> tuple[dict[str, float], float]:
    """Least-squares α, β, γ and the per-run fixed seconds F from runs ``{"rank", "iters", "weights", "seconds"}``
    of ``decompose`` on one checkpoint: seconds = F + weights·(α + β·(r + p) + (T − 1)·γ). Needs two ranks,
    some T > 1 and two target sizes (four independent runs)."""
    import torch

    rows = [[1.0, r["weights"], r["weights"] * (r["rank"] + oversample), r["weights"] * (r["iters"] - 1)]
            for r in runs]  # (runs, 4)
    a = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor([[r["seconds"]] for r in runs], dtype=torch.float64)
    scale = a.abs().amax(dim=0).clamp(min=1e-30)  # columns span 1 … 1e10: normalize before lstsq
    x = (torch.linalg.lstsq(a / scale, y).solution[:, 0] / scale).tolist()
    return {"base": x[1], "per_k": x[2], "per_extra_iter": x[3]}, x[0]


def estimate_seconds(rates: dict, shapes: Sequence[tuple[int, int]], rank: int, iters: int = 1,
                     checkpoint_bytes: int = 0) -> float:
    """Wall seconds of one ``qpissa decompose`` over target ``shapes`` (one entry per tensor)."""
    weights = sum(m * n for m, n in shapes)
    return (rates["import_s"] + checkpoint_bytes * rates["other_s_per_byte"]
            + weights * per_weight_seconds(rates, rank, iters))


def estimate_peak_bytes(rates: dict, shapes: Sequence[tuple[int, int]], baseline: int) -> int:
    """Peak resident bytes: the import baseline plus the measured bytes per weight of the largest target."""
    return baseline + int(rates["peak_bytes_per_weight"] * max(m * n for m, n in shapes))
