"""Load an NF4-experts residual without ever holding its experts in bf16 (``qpissa.moe.load``'s peak).

transformers 5 builds the model on the meta device and loads every checkpoint tensor straight into its final form
(the NF4 linears as bitsandbytes' packed bytes), but the fused expert parameters are not in the residual's shards
(their NF4 bytes are in ``nf4-experts.safetensors``), so it first allocates them as *missing* keys
(``_move_missing_keys_from_meta_to_device``: ``torch.empty_like`` in the load dtype) and then writes a random init
over every byte (``_initialize_missing_keys``): the whole model in bf16 at once, ≈61 GB for Qwen3-30B-A3B, before
:func:`qpissa.moe.attach_nf4_experts` frees it. :func:`experts_stay_on_meta` hooks that one step for the fused
expert parameters: each becomes a zero-stride placeholder of its shape (one element of storage) marked
initialized, so transformers neither allocates nor initializes it, and the NF4 stacks are attached afterwards block
by block. Peak while loading: the 4-bit bytes + one block's stacked NF4 states, measured in tests/test_moe_load.py.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch



def placeholder(param: torch.Tensor, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """A zero-stride tensor of ``param``'s shape and dtype (or ``dtype``): 1 element of storage."""
    return torch.zeros((), dtype=dtype or param.dtype, device=device or param.device).expand(param.shape)


def _is_expert(model: torch.nn.Module, key: str) -> bool:
    """A missing 3-D parameter: in an NF4-experts residual only the fused experts (any family's names: Granite's
    ``input_linear``, Llama-4's, gpt-oss') are absent from the shards; their bytes are in the experts file."""
    return model.get_parameter(key).ndim == 3


@contextmanager
def experts_stay_on_meta():
    """While active, missing fused expert parameters of any transformers model being loaded become placeholders
    (on the device transformers would have used) instead of allocated, randomly initialized bf16 tensors."""
    from transformers import PreTrainedModel
    from transformers.integrations.accelerate import get_device

    original = PreTrainedModel._move_missing_keys_from_meta_to_device

    def move(self, missing_keys, device_map, device_mesh, hf_quantizer):
        experts = {k for k in missing_keys if _is_expert(self, k)}
        for key in experts:
            module, _, name = key.rpartition(".")
            param = self.get_parameter(key)
            device = get_device(device_map, key, valid_torch_device=True)
            value = torch.nn.Parameter(placeholder(param, device if device is not None else "cpu"), requires_grad=False)
            value._is_hf_initialized = True  # transformers' init skips it (it cannot write a zero-stride tensor)
            setattr(self.get_submodule(module), name, value)
        return original(self, set(missing_keys) - experts, device_map, device_mesh, hf_quantizer)

    PreTrainedModel._move_missing_keys_from_meta_to_device = move
    try:
        yield
    finally:
        PreTrainedModel._move_missing_keys_from_meta_to_device = original
