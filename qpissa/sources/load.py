"""A whole model from a quantized source, decoded by :mod:`qpissa.sources` (``train --method lora|full``, ``merge``).

transformers loads some of these formats only with their kernels (GPTQ/AWQ need gptqmodel, FP8 a recent GPU)
or keeps them quantized (bitsandbytes); full fine-tuning and a LoRA on the original weights need the weights
themselves. So the model is built from its config without ``quantization_config`` and given the decoded
tensors as its state dict (transformers' own key conversions still apply). Peak memory: the model plus one
copy of its weights in ``dtype`` (the state dict), about twice the bf16 model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qpissa.formats import load_tensor
from qpissa.sources import open_source
from qpissa.sources.base import residual_dtype

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def load_decoded(model_dir: str | Path, dtype: torch.dtype | str = "auto", **kwargs: Any):
    """The model at ``model_dir`` (a quantized release) with every tensor dequantized; ``dtype`` "auto": the
    config's float dtype. ``kwargs`` go to ``from_pretrained`` (``device_map``)."""
    import json

    import transformers

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    dtype = TORCH_DTYPES[residual_dtype(raw)] if dtype == "auto" else dtype
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    source = open_source(model_dir)
    state = {t.name: load_tensor(t).to(dtype) if t.dtype in ("BF16", "F16", "F32") else load_tensor(t)
             for t in source.tensors}
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, **kwargs)
    model.name_or_path = model.config._name_or_path = str(model_dir)  # PEFT records it as the adapter's base
    return model
