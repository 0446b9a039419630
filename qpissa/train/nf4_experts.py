"""NF4 MoE experts under ``--fsdp``: their bytes sharded per block like the NF4 linears' (:mod:`nf4_module`).

:class:`qpissa.moe.NF4ExpertStack` keeps a fused expert parameter's NF4 storage as buffers (``packed`` (E, ⌈o·i/2⌉)
uint8, ``absmax`` (E, o·i/blocksize) fp32), and FSDP shards parameters only: every rank would hold every expert.
:func:`shardable_experts` re-registers the same two tensors as frozen parameters (no copy, no re-quantization), so
the block's ``fully_shard`` splits them along dim 0 — the expert axis: with N ranks each stores ⌈E/N⌉ experts of
every block — and all-gathers them when the block runs, before the MoE block's pre-hook dequantizes them. The
experts' fused parameters themselves are one-element placeholders between forwards (refilled by that hook), so
they are returned to be left out of FSDP (``ignored_params``): sharding a placeholder would materialize it.
"""
from __future__ import annotations

import torch
from torch import nn


def shardable_experts(model: nn.Module, device: str | torch.device | None = None) -> set[nn.Parameter]:
    """Make every NF4 expert stack's bytes frozen parameters; return the experts' placeholder parameters (moved to
    ``device`` when given: FSDP does not move ignored parameters)."""
    from qpissa.moe import NF4ExpertStack
    from qpissa.moe_meta import placeholder

    ignored: set[nn.Parameter] = set()
    for module in list(model.modules()):
        for child_name, stack in list(module.named_children()):
            if not isinstance(stack, NF4ExpertStack):
                continue
            for name in ("packed", "absmax"):
                tensor = stack._buffers.pop(name)
                stack.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            param = getattr(module, child_name.removeprefix("nf4_"))
            if device is not None and param.device != torch.device(device):
                param.data = placeholder(param, device)
            ignored.add(param)
    return ignored


def expert_nf4_params(model: nn.Module) -> set[int]:
    """ids of the NF4 expert stacks' parameters (for the frozen-bytes report)."""
    from qpissa.moe import NF4ExpertStack

    return {id(p) for m in model.modules() if isinstance(m, NF4ExpertStack) for p in m.parameters(recurse=False)}
