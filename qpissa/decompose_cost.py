"""Cost model of ``qpissa decompose``, fit to timings of the shipped driver (not a copy of its algorithm).

Per target tensor (m×n) at rank r and T iterations, with k = r + oversample, the driver's seconds are

    t = m·n · (α + β·k + (T − 1)·γ)

(every stage is linear in m·n at fixed k: NF4 quantization and the residual/error passes cost α, the
randomized SVD's matmuls 2mnk per pass cost β·k, each further QPiSSA iteration γ), plus fixed costs:
imports + setup (``import_s``) and the stream over the checkpoint's bytes when assembling the residual
shards (``other_s_per_byte``). Peak memory above the import baseline is ``peak_bytes_per_weight`` times
the largest target's m·n. ``benchmarks/decompose_rehearsal.py`` measures α, β, γ by running
:func:`qpissa.decompose.decompose` on a synthetic Llama-3-8B-shaped checkpoint at (r, T) = (16, 1),
(128, 1) and (16, 5), and writes them to ``decompose_rates.json`` beside this module.
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


def fit_rates(runs: Sequence[dict], oversample: int = 16) -> dict[str, float]:
    """α, β, γ from runs ``{"rank", "iters", "weights", "tensor_seconds"}``: two ranks at T = 1, one T > 1."""
    spw = {(r["rank"], r["iters"]): r["tensor_seconds"] / r["weights"] for r in runs}
    (r1, _), (r2, _) = sorted(k for k in spw if k[1] == 1)[:2]
    beta = (spw[(r2, 1)] - spw[(r1, 1)]) / (r2 - r1)
    alpha = spw[(r1, 1)] - beta * (r1 + oversample)
    rt, t = next(k for k in spw if k[1] > 1)
    gamma = (spw[(rt, t)] - spw[(rt, 1)]) / (t - 1) if (rt, 1) in spw else 0.0
    return {"base": alpha, "per_k": beta, "per_extra_iter": gamma}


def estimate_seconds(rates: dict, shapes: Sequence[tuple[int, int]], rank: int, iters: int = 1,
                     checkpoint_bytes: int = 0) -> float:
    """Wall seconds of one ``qpissa decompose`` over target ``shapes`` (one entry per tensor)."""
    weights = sum(m * n for m, n in shapes)
    return (rates["import_s"] + checkpoint_bytes * rates["other_s_per_byte"]
            + weights * per_weight_seconds(rates, rank, iters))


def estimate_peak_bytes(rates: dict, shapes: Sequence[tuple[int, int]], baseline: int) -> int:
    """Peak resident bytes: the import baseline plus the measured bytes per weight of the largest target."""
    return baseline + int(rates["peak_bytes_per_weight"] * max(m * n for m, n in shapes))
