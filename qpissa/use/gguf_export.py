"""``qpissa export --format gguf``: a merged model, or the QPiSSA split (residual + f16 LoRA), for llama.cpp / Ollama.

Merged (``--split none``): every weight W = deq(R) + s·B·A, quantized with ``--quant`` into one GGUF.
Split (``--split adapter``): the residual deq(R) quantized with ``--quant`` into FILE.gguf and the adapter, as
trained, into FILE-lora.gguf (f16 ``blk.N.<tensor>.weight.lora_a`` (r×n) / ``.lora_b`` (m×r) pairs; llama.cpp
computes W·x + (α/r)·B·(A·x) with α = ``adapter.lora.alpha``) — the same split the adapter was trained on, so
the principal components are not quantized a second time. Both write FILE.Modelfile for ``ollama create``.

Written in one pass, one tensor at a time: the header and the tensor table are planned from shapes alone, then
each tensor is read, changed for llama.cpp's layout (:mod:`qpissa.use.gguf_arch`), quantized with the ``gguf``
package's quantizers and appended. 1-D tensors stay f32. Under a 4/5-bit ``--quant`` the embedding and output
matrices are q8_0 (llama.cpp's own quantizer also keeps them above the body's precision). A matrix whose row
length is not a multiple of the quant block (32) is written f16 and counted in the summary.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from qpissa.atomic import atomic_path, write_text
from qpissa.choices import check_choices
from qpissa.errors import UserError
from qpissa.formats import is_within
from qpissa.hub import REVISION_HELP
from qpissa.use.gguf_arch import Arch, extra_tensors, notes as arch_notes, resolve, write_hparams
from qpissa.use.gguf_source import TensorSource
from qpissa.use.gguf_vocab import write_vocab

Format = Literal["gguf"]
Quant = Literal["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
Split = Literal["none", "adapter"]
_LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")
_FILE_TYPE = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
              "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1"}


@dataclass
class ExportConfig:
    format: Format = field(default="gguf", metadata={"help": "gguf (llama.cpp, Ollama)"})
    quant: Quant = field(default="f16", metadata={"help": "f16 | bf16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 (the model, "
                                                           "or the residual with --split adapter)"})
    split: Split = field(default="none", metadata={"help": "none: one merged model | adapter: residual + f16 GGUF "
                                                           "LoRA (llama.cpp --lora, Ollama ADAPTER)"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing output files"})
    revision: str | None = field(default=None, metadata={"help": REVISION_HELP})

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class _Planned:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType


def outputs(output: Path, cfg: ExportConfig) -> dict[str, Path]:
    """The files an export writes: model, adapter (split only), Modelfile."""
    stem = output.name.removesuffix(".gguf")
    files = {"model": output.with_name(stem + ".gguf"), "modelfile": output.with_name(stem + ".Modelfile")}
    if cfg.split == "adapter":
        files["adapter"] = output.with_name(stem + "-lora.gguf")
    return files


def _qtype_for(gguf_name: str, shape: tuple[int, ...], quant: str) -> tuple[Any, bool]:
    """(GGML type, fell back to f16) for one tensor."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return T.F32, False
    if quant in _LOW_BIT and gguf_name in ("token_embd.weight", "output.weight"):
        quant = "q8_0"
    qtype = T[quant.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return T.F16, True
    return qtype, False


def _encode(x: np.ndarray, qtype: Any) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return x.astype(np.float32)
    if qtype == T.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def _open(path: Path, arch: Arch, tensors: list[tuple[str, tuple[int, ...], Any]], meta: Callable[[Any], None]):
    """A GGUFWriter with metadata and the full tensor table written; the caller appends the data in order."""
    import gguf

    writer = gguf.GGUFWriter(None, arch.name)
    meta(writer)
    for name, shape, qtype in tensors:
        writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    return writer


def export_gguf(model_or_run: str | Path, output: str | Path, cfg: ExportConfig = ExportConfig(),
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the GGUF file(s) of a merged checkpoint, a training run or a decompose output; returns the summary."""
    try:
        import gguf
    except ImportError:
        raise UserError("the gguf package is not installed: pip install 'qpissa[gguf]' (or pip install gguf)") from None

    from qpissa.use.evaluate import resolve_model

    t0 = time.perf_counter()
    output = Path(output)
    base, adapter_dir = resolve_model(model_or_run, None, cfg.revision)
    if cfg.split == "adapter" and adapter_dir is None:
        raise UserError(f"{model_or_run}: --split adapter needs an adapter (a training run or decompose output); "
                        "this is a plain model, export it with --split none")
    files = outputs(output, cfg)
    for path in files.values():
        if path.exists() and not cfg.overwrite:
            raise UserError(f"{path} exists; pass --overwrite or choose another --output")
        for src in (base, adapter_dir):
            if src is not None and is_within(path, src):
                raise UserError(f"--output {path} lies inside input {src}; choose a path outside it")
    source = TensorSource(base, adapter_dir)
    arch = resolve(source.config, f"{base}/config.json")  # before anything is written
    T = gguf.GGMLQuantizationType
    plan: list[_Planned] = []
    fallback: list[str] = []
    for name in source.names:
        gname = arch.gguf_name(name)
        if gname is None:
            if name == "lm_head.weight" and name not in source.modules:
                continue  # tied to the embedding
            raise UserError(f"{base}: tensor {name} has no {arch.name} GGUF name (an adapter on a tied lm_head, or "
                            "a layout llama.cpp does not load); nothing written")
        shape = source.shape(name)
        qtype, fell_back = _qtype_for(gname, shape, cfg.quant)
        if fell_back:
            fallback.append(gname)
        plan.append(_Planned(name, gname, shape, qtype))
    extras = extra_tensors(arch)
    plan += [_Planned("", k, v.shape, T.F32) for k, v in extras.items()]
    merge = cfg.split == "none"
    notes: list[str] = arch_notes(arch)

    def meta(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(base.parent.name if base.name in ("residual", "model") else base.name)
        write_hparams(writer, arch)
        writer.add_file_type(gguf.LlamaFileType[_FILE_TYPE[cfg.quant]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        notes.extend(write_vocab(writer, base, int(arch.config["vocab_size"])))

    with atomic_path(files["model"]) as tmp:
        writer = _open(tmp, arch, [(p.gguf_name, p.shape, p.qtype) for p in plan], meta)
        for p in plan:
            if progress is not None:
                progress(p.gguf_name)
            if p.hf_name:
                w = (source.merged(p.hf_name) if merge else source.weight(p.hf_name)).numpy()
                w = arch.transform(p.gguf_name)(w)
            else:
                w = extras[p.gguf_name]
            writer.write_tensor_data(_encode(w, p.qtype))
        writer.close()
    lora_info: dict[str, Any] = {}
    if cfg.split == "adapter":
        lora_info = _write_lora(files["adapter"], source, arch, {p.hf_name: p.gguf_name for p in plan if p.hf_name})
    _write_modelfile(files)
    return {"architecture": arch.name, "quant": cfg.quant, "split": cfg.split, "model": str(base),
            "adapter": str(adapter_dir) if adapter_dir else None,
            "merged_adapter": merge and adapter_dir is not None, "tensors": len(plan),
            "f16_fallback": len(fallback), "f16_fallback_tensors": fallback, **lora_info,
            "files": {k: str(v) for k, v in files.items()},
            "bytes": {k: v.stat().st_size for k, v in files.items()}, "notes": notes,
            "seconds": round(time.perf_counter() - t0, 2)}


def _write_lora(path: Path, source: TensorSource, arch: Arch, names: dict[str, str]) -> dict[str, Any]:
    """The adapter as a GGUF LoRA (f16). One α for the file: α = s·r when every module has the same s and r
    (llama.cpp then scales by α/r = s); otherwise s is folded into B and α = 0 (llama.cpp then scales by 1)."""
    import gguf

    T = gguf.GGMLQuantizationType
    pairs = {}
    if any(n in source.modules for members in source.experts.values() for n in members):
        raise UserError(f"{source.adapter.path}: an adapter on MoE experts cannot be a GGUF LoRA (llama.cpp applies "
                        "LoRA to 2-D weights); export it merged (--split none)")
    for name in source.modules:
        if name not in names:
            raise UserError(f"adapter module {source.modules[name]}: its weight {name} is not in the GGUF model "
                            "(tied lm_head?); GGUF LoRA cannot carry it")
        pairs[name] = source.lora(name)
    scales = {(s, r) for _, _, s, r in pairs.values()}
    uniform = len(scales) == 1
    alpha = (lambda s, r: s * r)(*next(iter(scales))) if uniform else 0.0
    table = []
    for name, (a, b, s, r) in pairs.items():
        g = names[name]
        table += [(g + ".lora_a", tuple(a.shape), T.F16), (g + ".lora_b", tuple(b.shape), T.F16)]

    def meta(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))

    with atomic_path(path) as tmp:
        writer = _open(tmp, arch, table, meta)
        for name, (a, b, s, r) in pairs.items():
            perm = arch.row_permutation(names[name])  # q/k rows reordered as in the model: B's rows (outputs)
            b = b if uniform else b * s
            b = b[perm] if perm is not None else b
            writer.write_tensor_data(a.numpy().astype(np.float16))
            writer.write_tensor_data(b.numpy().astype(np.float16))
        writer.close()
    return {"lora_modules": len(pairs), "lora_alpha": float(alpha), "lora_scale_folded": not uniform}


def _write_modelfile(files: dict[str, Path]) -> None:
    """Ollama's recipe: the model (+ the adapter); the chat template and stop tokens come from the GGUF metadata."""
    lines = [f"FROM ./{files['model'].name}"]
    if "adapter" in files:
        lines.append(f"ADAPTER ./{files['adapter'].name}")
    write_text(files["modelfile"], "# ollama create NAME -f " + files["modelfile"].name + "\n" + "\n".join(lines) + "\n")
