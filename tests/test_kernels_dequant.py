"""Triton NF4 dequantize vs bitsandbytes (bit for bit) and vs the plain-torch reference.

Runs on CPU under Triton's interpreter: TRITON_INTERPRET=1 is set before triton is imported.
"""
from helpers import triton_interpreter

triton_interpreter()  # must precede any triton / qpissa.kernels import

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from qpissa.kernels.nf4_dequant import nf4_dequantize  # noqa: E402
from qpissa.kernels.reference import nf4_dequantize_reference  # noqa: E402
from qpissa.quant import NF4Weight  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _quantize(shape, dtype, blocksize, nested, seed=0, storage=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 2.5).to(dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested,
                                    quant_storage=storage)
    return w, packed, qs


def _assert_bits_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (a.view(INT_VIEW[a.dtype]) != b.view(INT_VIEW[b.dtype])).sum().item()
    assert diff == 0, f"{diff} of {a.numel()} elements differ in bits"


def test_nibble_order_high_first():
    """Independent check of the layout: levels (code[3], code[10]) with absmax 1 pack into byte 0x3A."""
    code = bnbf.get_4bit_type("nf4", device="cpu")
    w = torch.tensor([code[3], code[10]] + [code[15]] * 62).reshape(1, 64)  # absmax = 1
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert packed.reshape(-1)[0].item() == 0x3A
    nf4 = NF4Weight.from_quant_state(packed, qs)
    assert torch.equal(nf4_dequantize(nf4), w)
    assert torch.equal(nf4_dequantize_reference(nf4), w)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequant_bit_exact_vs_bitsandbytes(dtype, blocksize, nested):
    _, packed, qs = _quantize((6, 512), dtype, blocksize, nested)
    expected = bnbf.dequantize_4bit(packed, qs)  # (6, 512) in dtype
    nf4 = NF4Weight.from_quant_state(packed, qs)
    _assert_bits_equal(nf4_dequantize(nf4), expected)
    _assert_bits_equal(nf4_dequantize_reference(nf4), expected)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dequant_output_dtype_override(out_dtype):
    """Any output dtype equals bitsandbytes' fp32 result cast once (same as quant_state.dtype=out_dtype)."""
    _, packed, qs = _quantize((4, 256), torch.float32, 64, True, seed=1)
    expected = bnbf.dequantize_4bit(packed, qs).to(out_dtype)
    _assert_bits_equal(nf4_dequantize(NF4Weight.from_quant_state(packed, qs), dtype=out_dtype), expected)


@pytest.mark.parametrize("shape", [(5, 37), (7, 130), (3, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
def test_dequant_ragged_shapes_vs_bitsandbytes(shape, nested):
    """Odd element counts, partial last block, many small programs with a masked tail."""
    for dtype in (torch.bfloat16, torch.float32):
        _, packed, qs = _quantize(shape, dtype, 64, nested, seed=2)
        expected = bnbf.dequantize_4bit(packed, qs)
        _assert_bits_equal(nf4_dequantize(NF4Weight.from_quant_state(packed, qs), block_bytes=16), expected)


@pytest.mark.parametrize("shape,blocksize", [((9, 96), 64), ((5, 64), 128), ((3, 320), 256)])
def test_dequant_blocks_spanning_rows_match_quantizer(shape, blocksize):
    """in_features % blocksize != 0: blocks run across rows (flat layout, as quantize_4bit writes).

    bitsandbytes 0.50's CPU-native dequantizer indexes such blocks per row, so here we check the
    semantics directly: re-quantizing our fp32 output reproduces the packed bytes and absmax exactly,
    and bitsandbytes' pure-torch default implementation gives the same values.
    """
    _, packed, qs = _quantize(shape, torch.float32, blocksize, False, seed=3)
    nf4 = NF4Weight.from_quant_state(packed, qs)
    ours = nf4_dequantize(nf4)
    _assert_bits_equal(ours, nf4_dequantize_reference(nf4))
    packed2, qs2 = bnbf.quantize_4bit(ours, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(packed2, packed) and torch.equal(qs2.absmax, qs.absmax)
    from bitsandbytes.backends.default import ops as default_ops

    compute = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", None)
    if compute is not None:  # undecorated torch implementation (skip torch.compile on CPU)
        flat = compute(packed.reshape(-1), qs.absmax, qs.code, blocksize, qs.shape, torch.float32)
        _assert_bits_equal(ours, flat)


def test_dequant_non_uint8_storage():
    """quant_storage=bf16 (FSDP-QLoRA layout) holds the same bytes; we read them as uint8."""
    _, packed, qs = _quantize((4, 128), torch.bfloat16, 64, True, seed=4, storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    _assert_bits_equal(nf4_dequantize(NF4Weight.from_quant_state(packed, qs)), bnbf.dequantize_4bit(packed, qs))


def test_dequant_of_real_linear4bit_layer():
    """A bitsandbytes Linear4bit's own Params4bit (quantized by bnb when moved to a device)."""
    import bitsandbytes as bnb

    torch.manual_seed(5)
    dense = torch.nn.Linear(128, 24, bias=False)
    layer = bnb.nn.Linear4bit(128, 24, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.to("cpu")
    qs = layer.weight.quant_state
    expected = bnbf.dequantize_4bit(layer.weight.data, qs)  # (24, 128)
    _assert_bits_equal(nf4_dequantize(NF4Weight.from_quant_state(layer.weight.data, qs)), expected)
    rel = torch.linalg.norm(expected - dense.weight.detach()) / torch.linalg.norm(dense.weight.detach())
    assert rel < 0.15  # typical NF4 relative error is ≈ 0.1
