"""``qpissa train --fsdp``: the model sharded across the ranks with PyTorch FSDP2 (``fully_shard``).

What is sharded (each rank keeps ≈1/N of each, along dim 0; FSDP2 pads uneven splits, so no world
size has to divide anything): the frozen NF4 residual (its packed bytes and absmax, moved unchanged
into :class:`qpissa.train.nf4_module.FrozenNF4Linear`), the other frozen tensors (norms, embeddings,
bf16 layers), the fp32 adapter masters, their gradients (reduce-scattered) and the AdamW states
(they follow the parameters), and MoE experts' NF4 bytes along the expert axis
(:mod:`qpissa.train.nf4_experts`). Each transformer block is one FSDP unit (all-gathered for its forward,
freed, gathered again for its backward); embeddings, final norm and head form the root unit.

Gradients are reduce-scattered as a SUM (divide factor 1): every rank scales its CE by the global
response-token count, as in data-parallel training, so one step equals one process with
``--batch-size B×N``. Checkpoints: rank 0 writes the plain PEFT adapter as before; the sharded
adapter + optimizer go through ``torch.distributed.checkpoint`` into ``checkpoint-STEP/dcp``, which
loads onto any number of ranks (``--resume`` after changing ``--nproc_per_node``).
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

from qpissa.distributed import Dist
from qpissa.errors import UserError

def require_launch() -> None:
    """--fsdp shards over a process group: without a torchrun/accelerate launch there is none (one line)."""
    if "MASTER_ADDR" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("--fsdp shards the model over the ranks of a multi-process launch: run it under "
                        "`torchrun --nproc_per_node N --no-python qpissa train ...` (N ≥ 1) or `accelerate launch`")


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules of the classes transformers never splits (``_no_split_modules``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(f"--fsdp: {type(base).__name__} declares no transformer block class (_no_split_modules); "
                        "it cannot be wrapped per block")
    return blocks


def shard(model: nn.Module, device: str, offload: bool = False) -> nn.Module:
    """Swap the NF4 layers for shardable ones and ``fully_shard`` every block, then the root; prints each
    rank's measured share of the frozen bytes (one line per rank, on stderr).

    The model comes loaded in CPU memory (:func:`qpissa.train.model.load_model` with ``--fsdp``): each
    ``fully_shard`` moves one unit to the rank's device and keeps its shard, so no device ever holds the
    whole model (with ``offload`` the shards stay in CPU memory)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from qpissa.train.nf4_experts import shardable_experts
    from qpissa.train.nf4_module import swap_linear4bit

    swap_linear4bit(model)
    ignored = shardable_experts(model, device) or None  # NF4 experts: sharded along the expert axis
    total = frozen_bytes(model, local=False)
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (dist.get_world_size(),))
    # pinned host memory needs CUDA; on CPU ranks the offload changes nothing (the shards are in RAM already)
    policy = CPUOffloadPolicy(pin_memory=device.startswith("cuda")) if offload else OffloadPolicy()
    units = [*_blocks(model), model]
    for unit in units:
        fully_shard(unit, mesh=mesh, offload_policy=policy, ignored_params=ignored)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # a SUM: the losses are already scaled by the global token count
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    local = frozen_bytes(model, local=True)
    print(f"fsdp: rank {dist.get_rank()}/{dist.get_world_size()} holds {local['nf4']:,} of {total['nf4']:,} bytes "
          f"of the NF4 residual ({local['nf4'] / max(1, total['nf4']):.1%}), {local['all']:,} of {total['all']:,} "
          f"frozen bytes in all ({local['all'] / max(1, total['all']):.1%})", file=sys.stderr)
    return model


def frozen_bytes(model: nn.Module, local: bool) -> dict[str, int]:
    """Bytes of the frozen parameters this rank stores (``local``: its shards) or of the whole model;
    ``nf4``: the packed NF4 bytes + absmax of the residual's quantized layers."""
    from qpissa.train.nf4_experts import expert_nf4_params
    from qpissa.train.nf4_module import FrozenNF4Linear

    nf4_ids = {id(p) for m in model.modules() if isinstance(m, FrozenNF4Linear) for p in m.parameters()}
    nf4_ids |= expert_nf4_params(model)  # MoE experts' NF4 bytes (qpissa.train.nf4_experts)
    out = {"nf4": 0, "all": 0}
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        t = p.to_local() if local and hasattr(p, "to_local") else p
        n = (t.numel() if local or not hasattr(p, "to_local") else p.numel()) * p.element_size()
        out["all"] += n
        if id(p) in nf4_ids:
            out["nf4"] += n
    return out


def reduce_loss(loss_sum: float, d: Dist) -> float:
    """Σ over ranks of the step loss (gradients were already reduce-scattered by FSDP)."""
    import torch.distributed as dist

    total = torch.tensor([loss_sum], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global ‖g‖₂ over all ranks' shards (clipped in place when max_norm > 0), as torch's clip does."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    sq = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) ** 2 for t in local]).sum()
    dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    norm = sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for t in local:
            t.mul_(coef.to(t.device))
    return norm


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors gathered whole (collective: every rank calls it); CPU copies, by FQN."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            out[name] = t.detach().cpu()
    return out


def barrier(d: Dist) -> None:
    if d.enabled or _initialized():
        import torch.distributed as dist

        dist.barrier()


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


__all__ = ["barrier", "clip_grad_norm", "frozen_bytes", "full_adapter_state", "reduce_loss", "require_launch",
           "shard"]
