"""The process group of a multi-process launch (``torchrun`` / ``accelerate launch``), shared by the stages.

Rank and world size come from the environment that torchrun and accelerate set: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT``). The group is gloo on CPU and
nccl with ``--device cuda`` (each rank on ``cuda:LOCAL_RANK``). Ranks talk through two collectives:
:func:`agree` (the barrier, carrying any rank's user error to all) and :func:`broadcast` (rank 0's
result). What each stage shares over it lives with the stage: :mod:`qpissa.decompose.sharding`
(who decomposes which tensor) and :mod:`qpissa.train.gradsync` (gradient sums).
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from qpissa.errors import UserError

# A rank that finishes early waits at the barrier for the slowest one; large checkpoints on CPU
# can leave it waiting for hours, far past torch's 30-minute default. A crashed rank does not
# leave the others hanging: torchrun stops the whole group when one worker exits non-zero.
TIMEOUT = datetime.timedelta(hours=48)


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
def session(device: str = "cpu", always: bool = False) -> Iterator[Dist]:
    """Join the process group for the duration (gloo on CPU, nccl on CUDA); leave one we did not create alone.

    ``always``: create it for a launch of one rank too (FSDP shards over a group, even of one)."""
    import torch.distributed as dist

    d = detect()
    created = False
    if (d.enabled or always) and not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    if (d.enabled or always) and not dist.is_initialized():
        if device.startswith("cuda"):
            gpu = torch.device("cuda", d.local_rank)  # a one-rank group too (rank_device says plain "cuda" there)
            torch.cuda.set_device(gpu)
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=gpu)
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
