"""Data-parallel training over the process group of :mod:`qpissa.distributed`: same start, summed gradients."""
from __future__ import annotations

import torch

from qpissa.distributed import Dist


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


def reduce_values(values: dict[str, float], d: Dist) -> dict[str, float]:
    """Σ over ranks of per-step metrics each rank weighted by its share of the global batch (e.g. DPO rewards)."""
    if not d.enabled or not values:
        return values
    import torch.distributed as dist

    from qpissa.distributed import rank_device

    keys = sorted(values)
    total = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                         device=rank_device("cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl"
                                            else "cpu", d))
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return dict(zip(keys, total.tolist()))
