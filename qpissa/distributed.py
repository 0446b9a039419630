"""Decomposition over several processes (``torchrun`` / ``accelerate launch``): who owns which tensor.

Decomposing a checkpoint is embarrassingly parallel over target weights. Each rank runs the
method on the targets it owns and writes their part files ``OUT/.parts/NNNNN.safetensors`` (the
same names a single process writes) plus its own manifest fragment
``OUT/.parts/manifest-rank{r}.json``; no two processes ever write the same file. After a
barrier, rank 0 merges the fragments into ``manifest.json`` and alone assembles residual/,
adapter/ and the reports from the parts, so the output is byte-identical to a single process.

Ranks talk only through files plus two collectives, :func:`agree` (the barrier, carrying any
rank's user error to all) and :func:`broadcast` (rank 0's final report); the process group is gloo
on CPU and nccl with ``--device cuda`` (each rank on ``cuda:LOCAL_RANK``). Rank and world size come from the environment that torchrun and
accelerate set: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT``).
"""
from __future__ import annotations

import datetime
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from qpissa.atomic import write_json
from qpissa.errors import UserError

# A rank that finishes early waits at the barrier for the slowest one; large checkpoints on CPU
# can leave it waiting for hours, far past torch's 30-minute default. A crashed rank does not
# leave the others hanging: torchrun stops the whole group when one worker exits non-zero.
TIMEOUT = datetime.timedelta(hours=48)
FRAGMENT_GLOB = "manifest-rank*.json"


@dataclass(frozen=True)
class Dist:
    """This process's place in the group; ``world_size == 1`` means a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def detect() -> Dist:
    """Rank/world from an initialized process group, else from RANK/WORLD_SIZE/LOCAL_RANK (default: 1 process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        local = _env_int("LOCAL_RANK", dist.get_rank())
        return Dist(dist.get_rank(), dist.get_world_size(), local)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} / WORLD_SIZE={world} are inconsistent; launch with torchrun")
    return Dist(rank, world, _env_int("LOCAL_RANK", rank))


def rank_device(device: str, d: Dist) -> str:
    """``cuda`` under a multi-process launch means this rank's GPU, ``cuda:LOCAL_RANK``."""
    if not (d.enabled and device == "cuda"):
        return device
    if d.local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK={d.local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                        "visible; use --nproc_per_node ≤ the number of GPUs")
    return f"cuda:{d.local_rank}"


@contextmanager
def session(device: str = "cpu") -> Iterator[Dist]:
    """Join the process group for the duration (gloo on CPU, nccl on CUDA); leave one we did not create alone."""
    import torch.distributed as dist

    d = detect()
    created = False
    if d.enabled and not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    if d.enabled and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(rank_device("cuda", d)))
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device(rank_device("cuda", d)))
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        created = True
    try:
        yield d
    finally:
        if created:
            dist.destroy_process_group()


def agree(d: Dist, error: str | None) -> None:
    """Collective barrier: if any rank failed with a user error, raise it on every rank (none waits forever).

    Every rank must call this at the same point, with ``error=None`` when it succeeded. A single
    process returns at once (the caller re-raises its own error).
    """
    if not d.enabled:
        return
    import torch.distributed as dist

    errors: list[str | None] = [None] * d.world_size
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = next(((r, e) for r, e in failed if r == d.rank), failed[0])
        raise UserError(message if rank == d.rank else f"{message} (reported by rank {rank})")


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def sync_from_rank0(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Every rank starts from rank 0's trainable weights (they load the same files; this makes it certain)."""
    if not d.enabled:
        return
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


def all_reduce_sum(params: list[torch.nn.Parameter], loss_sum: float, d: Dist) -> float:
    """Sum gradients and the step loss over ranks, in place; returns the global step loss.

    Each rank's loss is Σ_its-tokens CE / N_global, so Σ_ranks ∇ = ∇(Σ_all-tokens CE / N_global):
    exactly the single-process gradient of the global batch (no division by the world size).
    """
    if not d.enabled:
        return loss_sum
    import torch.distributed as dist

    for p in params:
        if p.grad is None:  # a rank whose rows held no response token
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    total = torch.tensor([loss_sum], dtype=torch.float64, device=params[0].device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total)
