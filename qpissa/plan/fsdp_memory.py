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


def per_block(s: ModelShapes, p: ParamGroup) -> int:
    """Copies of row ``p`` in the largest block (0: not in a block, the root unit's). MoE rows: an expert row
    (``{e}`` in its name) holds the block's E experts, E from the router row of the same blocks; a dense MLP row of
    an MoE model (fewer copies than blocks, no experts) sits in the smaller dense blocks, not the largest."""
    if "{i}" not in p.name:
        return 0
    if "{e}" in p.name:
        router = next((r for r in s.params if r.kind == "router" and r.name.rsplit(".", 1)[0] in p.name), None)
        return p.count // router.count if router is not None else p.count // s.layers
    if p.count == s.layers or p.kind == "router":
        return 1
    return 0 if any("{e}" in r.name for r in s.params) else p.count // s.layers


def unit_bytes(s: ModelShapes, c: int, ad: int, rank: int | Callable[[ParamGroup], int], targets: list[ParamGroup],
               quant: list[ParamGroup], nf4: Callable[[ParamGroup], int], full: bool) -> tuple[int, int, int]:
    """(one block's parameters, its trainable gradients, the root unit's parameters), unsharded bytes; the block is
    the largest one (an MoE block with all its experts: FSDP gathers a block's NF4 experts like its linears).
    ``rank``: the adapter rank, or a row → rank function (``--expert-rank``)."""
    rank_of = rank if callable(rank) else (lambda p: rank)
    block = root = grads = 0
    for p in s.params:
        size = nf4(p) if p in quant else c * (p.numel + p.bias)
        k = per_block(s, p)
        if k:
            block += size * k
            grads += c * (p.numel + p.bias) * k if full else 0
        elif "{i}" not in p.name:
            root += size * p.count
    lora = sum(ad * rank_of(p) * (p.shape[0] + p.shape[1]) * per_block(s, p) for p in targets)
    return block + lora, grads + lora, root


def fsdp_components(comps: list[Component], s: ModelShapes, gpus: int, offload: bool, c: int, ad: int,
                    rank: int | Callable[[ParamGroup], int],
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
            Component("fsdp block buffers", 2 * block, f"2 × largest block all-gathered ({block:,} B each"
                                                       f"{', its experts included' if experts_per_rank(s, gpus) else ''})"),
            Component("fsdp block gradients", grads, "one block's unsharded gradients before reduce-scatter")]
    return out


def experts_per_rank(s: ModelShapes, gpus: int) -> dict[str, float] | None:
    """How the routed experts split over ``gpus`` FSDP ranks (None without experts): FSDP2 shards each fused
    NF4 expert tensor along dim 0, the expert axis, so a rank stores ⌈E/N⌉ of each block's E experts (the last
    ranks fewer when N does not divide E; the padding FSDP adds is inside the last expert's bytes)."""
    rows = [p for p in s.params if "{e}" in p.name]
    if not rows:
        return None
    per = per_block(s, rows[0])
    blocks = rows[0].count // per
    return {"experts_per_block": per, "blocks_with_experts": blocks, "ranks": gpus,
            "experts_per_rank_per_block": -(-per // gpus), "experts_per_rank": -(-per // gpus) * blocks,
            "experts_total": per * blocks}
