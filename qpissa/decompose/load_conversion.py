"""A model parameter that transformers builds at load from other checkpoint tensors (a fused q/k/v split, convolutions
concatenated, a transposed kernel), built the same way for the calibration walk, which loads one block at a time.

transformers renames every checkpoint key a conversion matches to the name of the conversion's *first* target
(``rename_source_key``) and then runs the conversion's operations on the collected sources; here the sources of one
parameter are the checkpoint tensors renamed to that first target's name, and the operations are transformers' own
(``Split``, ``Concatenate``, ``Transpose``, …), so the parameter is exactly what ``from_pretrained`` would hold.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from qpissa.formats import TensorInfo, load_tensor


@functools.cache
def _converters(model_dir: Path) -> tuple:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    from qpissa.decompose.roles import meta_model

    conversions = get_model_conversion_mapping(meta_model(str(model_dir))[0], add_legacy=False)
    return (tuple(c for c in conversions if isinstance(c, WeightRenaming)),
            tuple(c for c in conversions if isinstance(c, WeightConverter)))


def _target_regex(pattern: str) -> re.Pattern:
    return re.compile(r"(^|\.)(" + pattern.replace("*", r"\d+") + r")(\.weight)?$")


def built_parameter(model_dir: Path, model: torch.nn.Module, name: str,
                    tensors: dict[str, TensorInfo]) -> torch.Tensor | None:
    """Parameter ``name`` of ``model`` (a skeleton with meta parameters: shapes only) built from the checkpoint
    ``tensors`` (checkpoint name → info) by transformers' conversion that makes it; None when none does."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _converters(Path(model_dir))
    for conv in converters:
        for target in conv.target_patterns:
            match = _target_regex(target.replace("\\", "")).search(name)
            if match is None:
                continue
            first = name[:match.start(2)] + conv.target_patterns[0].replace("\\", "") + name[match.end(2):]
            if not first.endswith(".weight") and name.endswith(".weight"):
                first += ".weight"
            sources: dict[str, list[torch.Tensor]] = {}
            for key, info in tensors.items():
                new, pattern = rename_source_key(key, list(renamings), [conv])
                if pattern is not None and new.removesuffix(".weight") == first.removesuffix(".weight"):
                    sources.setdefault(pattern, []).append(load_tensor(info).float())
            if not sources:
                continue
            out: dict = sources
            for op in conv.operations:
                out = op.convert(out, conv.source_patterns, conv.target_patterns, full_layer_name=first, model=model,
                                 config=getattr(model, "config", None))
            value = out.get(target)
            if value is not None:
                return value[0] if isinstance(value, list) else value
    return None
