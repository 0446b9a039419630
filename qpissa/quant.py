"""NF4 quantization with bitsandbytes' exact bytes: the quantizer used at training time (on the CPU our
byte-identical :mod:`qpissa.nf4_cpu`, elsewhere bitsandbytes itself).

NF4 (Dettmers et al., "QLoRA", 2023): per block of ``blocksize`` weights, absmax scaling
and rounding to the nearest of 16 normal-quantile code values. Double quantization stores
the fp32 absmax as 8-bit with a second-level scale (≈ +2% error). We keep bitsandbytes'
packed bytes and quant state so what we measure is exactly what the model loads.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch


from qpissa import nf4_cpu

ComputeDtype = Literal["bfloat16", "float16", "float32"]
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # NF4 block sizes we write (the one declaration)


@dataclass(frozen=True)
class NF4Spec:
    """How a residual is quantized (mirrors transformers' BitsAndBytesConfig 4-bit fields)."""

    blocksize: int = field(default=64, metadata={"help": "weights per absmax block (64 as QLoRA)"})
    double_quant: bool = field(default=False, metadata={"help": "quantize absmax too (bnb_4bit_use_double_quant)"})
    compute_dtype: ComputeDtype = field(default="bfloat16", metadata={"help": "bnb_4bit_compute_dtype at load time"})

    def __post_init__(self) -> None:
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize {self.blocksize} unsupported: use 64, 128, 256, …, 4096")


@dataclass
class NF4Tensor:
    """Packed NF4 bytes plus bitsandbytes' quant state, for one (m×n) weight."""

    packed: torch.Tensor  # (m*n/2, 1) uint8
    state: "object"  # bitsandbytes.functional.QuantState, or nf4_cpu.NF4State (its fields, CPU, not nested)

    @property
    def shape(self) -> torch.Size:
        return self.state.shape

    def serialized(self, prefix: str) -> dict[str, torch.Tensor]:
        """bitsandbytes' checkpoint layout: ``prefix`` → packed, ``prefix.absmax``, ``prefix.quant_map``, …"""
        out = {prefix: self.packed.cpu()}
        for key, value in self.state.as_dict(packed=True).items():
            out[f"{prefix}.{key}"] = value.cpu()
        return out


@dataclass(frozen=True)
class NF4Weight:
    """A frozen NF4 weight in bitsandbytes' exact storage (no copies of the packed bytes).

    Fields mirror ``bitsandbytes.functional.QuantState``; ``absmax`` is fp32, or uint8 when
    ``nested`` (then ``absmax2``/``code2``/``blocksize2``/``offset`` hold the second level).
    """

    packed: torch.Tensor  # (ceil(numel/2),) uint8, two 4-bit codes per byte, high nibble first
    absmax: torch.Tensor  # (ceil(numel/blocksize),) fp32, or uint8 codes when nested
    code: torch.Tensor  # (16,) fp32 NF4 levels
    blocksize: int
    shape: tuple[int, int]  # (out_features, in_features) = (N, K)
    dtype: torch.dtype  # the dtype bitsandbytes dequantizes to
    nested: bool = False
    absmax2: torch.Tensor | None = None  # (ceil(n_blocks/blocksize2),) fp32
    code2: torch.Tensor | None = None  # (256,) fp32 dynamic-map code
    blocksize2: int = 256
    offset: float = 0.0

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, qs) -> "NF4Weight":
        """Wrap bitsandbytes' ``(packed, QuantState)`` pair (e.g. ``Params4bit.data, .quant_state``)."""
        if qs.quant_type != "nf4":
            raise ValueError(f"only NF4 is supported, got quant_type={qs.quant_type!r}")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("weight was repacked by bitsandbytes' CPU inference path; its layout is not NF4-packed")
        flat = packed.reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8)
        shape = tuple(int(d) for d in qs.shape)
        if len(shape) != 2:
            raise ValueError(f"expected a 2-D weight, got shape {shape}")
        if qs.nested:
            s2 = qs.state2
            return cls(flat, qs.absmax, qs.code.float(), int(qs.blocksize), shape, qs.dtype, True,
                       s2.absmax.float(), s2.code.float(), int(s2.blocksize), float(qs.offset))
        return cls(flat, qs.absmax.float(), qs.code.float(), int(qs.blocksize), shape, qs.dtype)


def quantize_nf4(w: torch.Tensor, spec: NF4Spec = NF4Spec()) -> NF4Tensor:
    """NF4-quantize ``w`` (m×n, any float dtype) with bitsandbytes; the state records fp32 as dtype.

    On the CPU :mod:`qpissa.nf4_cpu` writes the same bytes in chunks (faster, no full-size temporaries)."""
    if w.device.type == "cpu" and w.dtype in nf4_cpu.DTYPES:
        return NF4Tensor(*nf4_cpu.quantize_nf4_cpu(w, spec.blocksize, spec.double_quant))
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        w.float().contiguous(), blocksize=spec.blocksize, compress_statistics=spec.double_quant, quant_type="nf4"
    )
    return NF4Tensor(packed, state)


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    """Dequantize to fp32 exactly as the loaded Linear4bit does (on the CPU with
    :func:`qpissa.nf4_cpu.dequantize_nf4_cpu`: the same products, blocks read in flat order)."""
    if q.packed.device.type == "cpu":
        return nf4_cpu.dequantize_nf4_cpu(q.packed, absmax_fp32(q.state), q.state.code.float(), q.state.blocksize,
                                          tuple(q.shape))
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(q.packed, q.state).float()


def absmax_fp32(state) -> torch.Tensor:
    """The fp32 absmax of a quant state, the second level undone as bitsandbytes' ``dequantize_4bit`` does."""
    if not state.nested:
        return state.absmax.float()
    import bitsandbytes.functional as bnbf

    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.float()


@functools.cache
def cpu_dequantize_handles_blocks_across_rows() -> bool:
    """Does this bitsandbytes' CPU ``dequantize_4bit`` read blocks that straddle rows correctly?

    bitsandbytes 0.50.2 does not: for a 576-wide weight at blocksize 128 its CPU result is off by up to 2.1
    (flat-order reference: 0.0 at blocksize 64). A 2×96 probe at blocksize 64 against the flat formula
    code[q]·absmax decides it, so a fixed release is used as soon as it is installed.
    """
    import bitsandbytes.functional as bnbf

    w = torch.linspace(-1.0, 1.0, 192).reshape(2, 96)  # (2, 96): block 2 spans both rows
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q = packed.flatten()
    codes = torch.stack([q >> 4, q & 15], 1).flatten().long()  # (192,) high nibble first
    flat = (state.code[codes].view(-1, 64) * state.absmax.view(-1, 1)).view(2, 96)
    return torch.equal(bnbf.dequantize_4bit(packed, state).float(), flat)


def warn_cpu_blocksize(widths: dict[str, int], blocksize: int, device: str) -> str | None:
    """Warn (and return the line) when NF4 blocks would straddle rows on a CPU whose bitsandbytes dequantize misreads
    them: a model loaded on that CPU computes with wrong weights (the stored bytes, the decomposition's own errors
    and fits, which use :func:`dequantize_nf4`, and a GPU are right). Real widths are multiples of 64, so the
    default blocksize is never affected. ``widths``: tensor name → row length."""
    if device != "cpu" or all(n % blocksize == 0 for n in widths.values()):
        return None
    if cpu_dequantize_handles_blocks_across_rows():
        return None
    name, n = next((k, v) for k, v in widths.items() if v % blocksize)
    line = (f"qpissa: warning: {name}: rows of {n} weights are not a multiple of --blocksize {blocksize}, and this "
            "bitsandbytes' CPU dequantize reads such blocks wrongly: the output is right, but loaded on this CPU it "
            "computes with wrong weights; use a blocksize dividing every input width (64 for real models)")
    logging.getLogger("qpissa").warning(line)
    return line


CHUNK_ELEMENTS = 1 << 20  # weights of deq(Q) materialized at once by dequantized_rows: 4 MiB, not a weight


def dequantized_rows(q: NF4Tensor, rows: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """deq(Q) (fp32) as (row slice, chunk) pairs: the values of ``dequantize_nf4(q)[rows]`` without an m×n buffer.

    Chunked on the CPU when every chunk starts on a block boundary and a whole byte (n a multiple of the block
    size, n even); otherwise, and off the CPU, one chunk: the whole dequantize_nf4(q). ``rows`` per chunk
    defaults to :data:`CHUNK_ELEMENTS` weights."""
    m, n = q.shape
    bs = q.state.blocksize
    if q.packed.device.type != "cpu" or n % bs or n % 2:
        yield slice(0, m), dequantize_nf4(q)
        return
    absmax, code = absmax_fp32(q.state), q.state.code.float()  # (blocks,) fp32, (16,)
    per_row = n // bs  # blocks per row
    rows = rows or max(1, CHUNK_ELEMENTS // n)
    for i in range(0, m, rows):
        j = min(i + rows, m)
        part = nf4_cpu.dequantize_nf4_cpu(q.packed[i * n // 2:j * n // 2], absmax[i * per_row:j * per_row], code, bs,
                                          (j - i, n))  # (j − i, n)
        yield slice(i, j), part


def minus_dequantized(w: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """W − deq(Q) in W's dtype and layout: the values of ``w - dequantize_nf4(q).to(w.dtype)``, one m×n buffer."""
    out = torch.empty_like(w)  # (m, n)
    for rows, part in dequantized_rows(q):
        torch.sub(w[rows], part.to(w.dtype), out=out[rows])
    return out


def nf4_roundtrip(w: torch.Tensor, spec: NF4Spec = NF4Spec()) -> tuple[NF4Tensor, torch.Tensor]:
    """Quantize and dequantize in one call; returns (packed, deq) with deq in ``w``'s dtype."""
    q = quantize_nf4(w, spec)
    return q, dequantize_nf4(q).to(w.dtype)


# modules a ``…ForSequenceClassification`` adds on top of a checkpoint (BERT/RoBERTa/DeBERTa ``classifier``, Llama
# ``score``, DeBERTa's ``pooler.dense``, ModernBERT's ``head.dense``): listed in ``llm_int8_skip_modules`` so
# transformers keeps a new head full precision (a 4-bit new head cannot be initialized, nor trained)
HEAD_MODULES = ("classifier", "score", "pooler.dense", "head.dense")


def head_skip_modules(targets: list[str]) -> list[str]:
    """:data:`HEAD_MODULES` but those naming a quantized target (transformers matches a prefix or a suffix)."""
    return [h for h in HEAD_MODULES
            if not any(t == h or t.startswith(h + ".") or t.endswith("." + h) for t in targets)]


def quantization_config(spec: NF4Spec, skip_modules: list[str]) -> dict:
    """The ``quantization_config`` block transformers reads from config.json for pre-quantized NF4."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": spec.double_quant,
        "bnb_4bit_compute_dtype": spec.compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip_modules,
    }


# ----------------------------------------------------------------------------- loaded Linear4bit layers

def keep_4bit_layout_trainable(model) -> None:
    """Stop bitsandbytes' CPU eval-mode repacking of Linear4bit weights.

    bitsandbytes ≥0.49 on an AVX512-BF16 CPU rewrites ``weight.data`` into a CPU-specific packed
    layout the first time a Linear4bit runs in eval mode without grad, and from then on always calls
    ``gemv_4bit``, which has no autograd kernel: after one evaluation, training would silently
    backpropagate wrong gradients through the base layers and the stored NF4 bytes would change.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def compute_in_fp32(model) -> None:
    """Make ``--precision fp32`` mean fp32 for the frozen base too.

    transformers loads the non-quantized tensors of a pre-quantized NF4 checkpoint in bf16, and
    ``Linear4bit`` casts its input to ``bnb_4bit_compute_dtype`` (bf16 in our configs): without this,
    an "fp32" run computed the base in bf16, and its loss changed by ~1% with the CPU thread count
    and the batch composition (measured on SmolLM2: 1.3937 vs 1.4051 for one batch at 1 vs 2 threads).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32
    for p in model.parameters():
        if not isinstance(p, bnb.nn.Params4bit) and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
