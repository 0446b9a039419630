"""Decomposition over several processes (``torchrun`` / ``accelerate launch``): who owns which tensor.

Decomposing a checkpoint is embarrassingly parallel over target weights. Each rank runs the
method on the targets it owns and writes their part files ``OUT/.parts/NNNNN.safetensors`` (the
same names a single process writes) plus its own manifest fragment
``OUT/.parts/manifest-rank{r}.json``; no two processes ever write the same file. After a
barrier, rank 0 merges the fragments into ``manifest.json`` and alone assembles residual/,
adapter/ and the reports from the parts, so the output is byte-identical to a single process.

Ranks talk only through these files plus the collectives of :mod:`qpissa.distributed`
(``agree``, the barrier, and ``broadcast`` of rank 0's final report).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from qpissa.atomic import write_json
from qpissa.distributed import Dist
from qpissa.errors import UserError

FRAGMENT_GLOB = "manifest-rank*.json"


def assign(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each tensor: greedy longest-processing-time on element counts, deterministic.

    Tensors are taken largest first (ties by index) and each goes to the rank with the least
    total so far (ties by lower rank). The result depends only on ``sizes`` and ``world_size``,
    so every rank computes the same split without talking. Max load ≤ 4/3 of optimal (Graham 1969).
    """
    load = [0] * world_size
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += sizes[index]
    return owner


def owned(shapes: Sequence[Sequence[int]], d: Dist) -> list[int]:
    """Indices (into the target list) that rank ``d.rank`` processes, in target order."""
    owner = assign([math.prod(s) for s in shapes], d.world_size)
    return [i for i, r in enumerate(owner) if r == d.rank]


def fragment_path(parts_dir: Path, rank: int) -> Path:
    return parts_dir / f"manifest-rank{rank}.json"


def known_parts(out_dir: Path) -> dict[str, dict]:
    """Per-module manifest entries from manifest.json and any rank fragments (newest file wins).

    An entry only names a part and its checksum; the caller re-hashes the part before trusting
    it, so a stale entry costs a recomputation, never a wrong output. This lets a run resume
    from one with a different number of processes (or a single process).
    """
    sources = [p for p in [out_dir / "manifest.json", *(out_dir / ".parts").glob(FRAGMENT_GLOB)] if p.is_file()]
    entries: dict[str, dict] = {}
    for path in sorted(sources, key=lambda p: p.stat().st_mtime_ns):
        try:
            entries.update(json.loads(path.read_text()).get("tensors", {}))
        except (json.JSONDecodeError, AttributeError):
            continue  # atomic writes make this unlikely; a bad file only means recomputation
    return entries


def merge_fragments(parts_dir: Path, world_size: int, modules: Sequence[str]) -> dict[str, dict]:
    """Rank 0, after the barrier: the entries of every rank's fragment, in target order."""
    merged: dict[str, dict] = {}
    for rank in range(world_size):
        path = fragment_path(parts_dir, rank)
        if not path.is_file():
            raise UserError(f"{path} is missing after all ranks finished; re-run with --resume")
        merged.update(json.loads(path.read_text())["tensors"])
    missing = [m for m in modules if m not in merged]
    if missing:
        raise UserError(f"{parts_dir}: no part recorded for {missing[0]} (and {len(missing) - 1} more); "
                        "re-run with --resume")
    return {m: merged[m] for m in modules}


def remove_fragments(parts_dir: Path) -> None:
    """Drop rank fragments once manifest.json holds their entries (the output then matches a single process)."""
    for path in parts_dir.glob(FRAGMENT_GLOB):
        path.unlink(missing_ok=True)


def write_fragment(parts_dir: Path, d: Dist, tensors: dict[str, dict]) -> None:
    write_json(fragment_path(parts_dir, d.rank), {"rank": d.rank, "world_size": d.world_size, "tensors": tensors})
