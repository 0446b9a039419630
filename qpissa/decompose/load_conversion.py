"""A model parameter that transformers builds at load from other checkpoint tensors (a fused q/k/v split, convolutions
concatenated, a transposed kernel), built the same way for the calibration walk, which loads one block at a time.

transformers renames every checkpoint key a conversion matches to the name of the conversion's *first* target
(``rename_source_key``) and then runs the conversion's operations on the collected sources; here the sources of one
parameter are the checkpoint tensors renamed to that first target's name, and the operations are transformers' own
(``Split``, ``Concatenate``, ``Transpose``, …), so the parameter is exactly what ``from_pretrained`` would hold.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from qpissa.formats import TensorInfo, load_tensor


def _target_regex(pattern: str) -> re.Pattern:
    return re.compile(r"(^|\.)(" + pattern.replace("*", r"\d+") + r")(\.weight)?$")


class ConversionBuilder:
    """Builds parameters by transformers' conversions of ``model_dir``'s family from the checkpoint ``tensors``
    (checkpoint name → info). The index of which tensors feed which parameter is made on first use, once."""

    def __init__(self, model_dir: Path, tensors: dict[str, TensorInfo]):
        self.model_dir, self.tensors = Path(model_dir), tensors
        self._converters: list | None = None
        self._sources: dict[tuple[int, str], dict[str, list[TensorInfo]]] = {}  # (converter, first target) → sources

    def _index(self) -> list:
        """The family's converters, and which checkpoint tensors each renames to which first-target name."""
        if self._converters is None:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

            from qpissa.decompose.roles import meta_model

            conversions = get_model_conversion_mapping(meta_model(str(self.model_dir))[0], add_legacy=False)
            renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
            self._converters = [c for c in conversions if isinstance(c, WeightConverter)]
            for k, conv in enumerate(self._converters):
                for key, info in self.tensors.items():
                    new, pattern = rename_source_key(key, renamings, [conv])
                    if pattern is not None:
                        feeds = self._sources.setdefault((k, new.removesuffix(".weight")), {})
                        feeds.setdefault(pattern, []).append(info)
        return self._converters

    def build(self, model: torch.nn.Module, name: str) -> torch.Tensor | None:
        """Parameter ``name`` of ``model`` (a skeleton with meta parameters: shapes only), or None when no conversion
        of the family makes it."""
        for k, conv in enumerate(self._index()):
            for target in conv.target_patterns:
                match = _target_regex(target.replace("\\", "")).search(name)
                if match is None:
                    continue
                first = name[:match.start(2)] + conv.target_patterns[0].replace("\\", "") + name[match.end(2):]
                if not first.endswith(".weight") and name.endswith(".weight"):
                    first += ".weight"
                found = self._sources.get((k, first.removesuffix(".weight")))
                if not found:
                    continue
                out: dict = {p: [load_tensor(i).float() for i in infos] for p, infos in found.items()}
                for op in conv.operations:
                    out = op.convert(out, conv.source_patterns, conv.target_patterns, full_layer_name=first,
                                     model=model, config=getattr(model, "config", None))
                value = out.get(target)
                if value is not None:
                    return value[0] if isinstance(value, list) else value
        return None
