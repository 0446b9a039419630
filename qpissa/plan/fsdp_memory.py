"""Per-rank memory of ``qpissa train --fsdp`` on N devices, from the single-process components.

FSDP2 (``fully_shard`` per transformer block, then the root; :mod:`qpissa.train.fsdp`) keeps on each rank:
    state/N       every parameter sharded along dim 0 (NF4 packed bytes + absmax, unquantized tensors,
                  adapters) and what follows the trainable ones: gradients, fp32 masters, optimizer states
    root unit     embeddings, final norm and head, all-gathered for the whole forward + backward
                  (FSDP2 does not reshard the root after forward)
    2 blocks      the all-gathered parameters of the largest block, twice: the one computing and the one
                  prefetched (FSDP2 prefetches the next block in backward; on CUDA also in forward)
    block grads   the unsharded adapter (or full) gradients of one block before their reduce-scatter
    activations   as one process with the per-rank micro-batch (unchanged: FSDP shards no activations)
With ``--fsdp-offload`` (FSDP2's CPUOffloadPolicy) the state/N lives in CPU RAM (the optimizer steps
there); the device holds the gathered units, activations and transients only.
"""
from __future__ import annotations

from typing import Callable

from qpissa.plan.component import Component
from qpissa.plan.model_shapes import ModelShapes, ParamGroup

SHARDED = ("nf4 weights", "nf4 absmax+maps", "unquantized weights", "adapters", "adapter gradients",
           "fp32 master copy", "optimizer states", "gradients")


def unit_bytes(s: ModelShapes, c: int, ad: int, rank: int, targets: list[ParamGroup], quant: list[ParamGroup],
               nf4: Callable[[ParamGroup], int], full: bool) -> tuple[int, int, int]:
    """(one block's parameters, its trainable gradients, the root unit's parameters), unsharded bytes."""
    block = root = grads = 0
    for p in s.params:
        size = nf4(p) if p in quant else c * (p.numel + p.bias)
        if p.count == s.layers:
            block += size
            grads += c * (p.numel + p.bias) if full else 0
        else:
            root += size * p.count
    lora = sum(ad * rank * (p.shape[0] + p.shape[1]) for p in targets if p.count == s.layers)
    return block + lora, grads + lora, root


def fsdp_components(comps: list[Component], s: ModelShapes, gpus: int, offload: bool, c: int, ad: int, rank: int,
                    targets: list[ParamGroup], quant: list[ParamGroup], nf4: Callable[[ParamGroup], int]
                    ) -> list[Component]:
    """The single-process components turned per-rank: sharded state /N (or in CPU RAM), plus the
    all-gather buffers of the root unit and two blocks and one block's unsharded gradients."""
    full = any(x.name == "gradients" for x in comps)
    out: list[Component] = []
    for x in comps:
        if x.name not in SHARDED:
            out.append(x)
            continue
        share = -(-x.bytes // gpus)
        if offload:
            out.append(Component(x.name, 0, f"{share / 2**30:.3f} GiB/rank in CPU RAM (--fsdp-offload); {x.detail}"))
        else:
            out.append(Component(x.name, share, f"/{gpus} ranks: {x.detail}"))
    block, grads, root = unit_bytes(s, c, ad, rank, targets, quant, nf4, full)
    out += [Component("fsdp root unit", root, "embeddings, final norm, head all-gathered for the step"),
            Component("fsdp block buffers", 2 * block, f"2 × largest block all-gathered ({block:,} B each)"),
            Component("fsdp block gradients", grads, "one block's unsharded gradients before reduce-scatter")]
    return out
