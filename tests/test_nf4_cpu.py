"""The chunked CPU NF4 quantizer writes bitsandbytes' exact bytes and quant state."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from qpissa import nf4_cpu
from qpissa.nf4_cpu import quantize_nf4_cpu
from qpissa.quant import NF4Spec, dequantize_nf4, quantize_nf4

SPEC_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what NF4Spec accepts


def bnb_nf4(w: torch.Tensor, blocksize: int, double_quant: bool):
    """The reference: bitsandbytes' own quantize_4bit on w.float(), as quant.py called it before."""
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(w.float().contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                              quant_type="nf4")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor (NaN == NaN, −0 ≠ +0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_identical(w: torch.Tensor, blocksize: int, double_quant: bool) -> None:
    ref_packed, ref = bnb_nf4(w, blocksize, double_quant)
    packed, state = quantize_nf4_cpu(w, blocksize, double_quant)
    assert packed.dtype == ref_packed.dtype and packed.shape == ref_packed.shape
    assert torch.equal(bits(packed), bits(ref_packed)), "packed codes differ"
    assert (state.shape, state.dtype, state.blocksize, state.quant_type) == \
           (ref.shape, ref.dtype, ref.blocksize, ref.quant_type)
    for name in ("absmax", "code"):
        a, b = getattr(state, name), getattr(ref, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b)), name
    assert (state.state2 is None) == (ref.state2 is None) == (not double_quant)
    if double_quant:
        assert torch.equal(bits(state.offset), bits(ref.offset))
        for name in ("absmax", "code"):
            assert torch.equal(bits(getattr(state.state2, name)), bits(getattr(ref.state2, name))), f"state2.{name}"
        assert state.state2.blocksize == ref.state2.blocksize
    ours, theirs = state.as_dict(packed=True), ref.as_dict(packed=True)  # the serialized checkpoint entries
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(bits(ours[key]), bits(theirs[key])), key


def heavy_tailed(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Student-t(2) entries with per-row scales over 4 decades: outliers dominate some blocks."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn(shape + (2,), generator=g).square().sum(-1)  # χ²(2)
    rows = 10.0 ** (torch.rand(shape[0], 1, generator=g) * 4 - 3)  # (m, 1) in [1e-3, 10)
    return (z / (chi2 / 2).sqrt() * rows).to(dtype)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", (32,) + SPEC_BLOCKSIZES)
def test_heavy_tailed_random_identical(blocksize, double_quant):
    assert_identical(heavy_tailed((96, 640), seed=blocksize), blocksize, double_quant)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_input_dtypes_identical(dtype):
    for blocksize, dq in ((64, False), (128, True)):
        assert_identical(heavy_tailed((64, 200), seed=3, dtype=dtype), blocksize, dq)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (3, 65), (33, 97), (5, 4099), (2, 8191)])
def test_remainder_and_odd_shapes_identical(shape):
    """numel % blocksize ≠ 0 (a clamped, divided last block) and odd numel (one 0.0 pad, code 7)."""
    for blocksize in (64, 256, 4096):
        for dq in (False, True):
            assert_identical(heavy_tailed(shape, seed=shape[1]), blocksize, dq)


def test_chunk_boundaries_identical(monkeypatch):
    """Many chunks and a partial last chunk, each a whole number of blocks."""
    monkeypatch.setattr(nf4_cpu, "CHUNK_ELEMENTS", 3 * 64)
    w = heavy_tailed((37, 129), seed=7)  # 4773 = 74 blocks of 64 + 37
    for dq in (False, True):
        assert_identical(w, 64, dq)
    monkeypatch.setattr(nf4_cpu, "CHUNK_ELEMENTS", 1)  # below one block: one block per chunk
    assert_identical(w, 128, False)


def test_exact_ties_at_midpoints():
    """x̂ = mₖ exactly (absmax a power of two, so x·(1/a) = mₖ): bucketize's lower code k, as bitsandbytes."""
    import bitsandbytes.functional as bnbf

    code = bnbf.get_4bit_type("nf4", device="cpu")
    assert torch.equal(code, code.sort().values)  # NF4 is sorted: the midpoints are between neighbours
    mids = (code[:-1] + code[1:]) / 2  # (15,)
    blocks = []
    for a in (2.0, 0.5, 2.0 ** -20):
        below = torch.nextafter(mids, torch.tensor(-2.0))
        above = torch.nextafter(mids, torch.tensor(2.0))
        vals = torch.cat([mids, below, above, torch.tensor([1.0, -1.0, 0.0, -0.0])])  # 49 values
        block = torch.cat([vals, torch.zeros(64 - vals.numel())]) * a  # (64,), absmax = a
        blocks.append(block)
    w = torch.stack(blocks)  # (3, 64)
    assert_identical(w, 64, False)
    assert_identical(w, 64, True)
    packed, _ = quantize_nf4_cpu(w, 64)
    codes = torch.stack([packed[:, 0] >> 4, packed[:, 0] & 15], dim=1).reshape(3, 64)  # unpack
    assert torch.equal(codes[:, :15], torch.arange(15).expand(3, 15))  # a tie takes the lower code
    assert torch.equal(codes[:, 30:45], torch.arange(1, 16).expand(3, 15))  # just above → upper code


def test_table_lookup_equals_bucketize_near_bin_edges_and_midpoints():
    """The lookup (what finite chunks use) against torch.bucketize: values within 8 ulps of every bin edge and
    every midpoint, ±1 and slightly beyond (x·(1/a) can round above 1), and a dense sweep of [−1, 1]."""
    bounds = nf4_cpu.nf4_midpoints(nf4_cpu.nf4_code())
    half = nf4_cpu.LUT_BINS / 2
    marks = torch.cat([torch.arange(nf4_cpu.LUT_BINS + 1) / half - 1, torch.tensor(bounds)])  # edges, midpoints
    near = [marks]
    for direction in (-2.0, 2.0):
        x = marks
        for _ in range(8):
            x = torch.nextafter(x, torch.tensor(direction))
            near.append(x)
    x = torch.cat(near + [torch.linspace(-1, 1, 1_000_003)]).clamp(-1.0000002, 1.0000002)  # (n,)
    out = torch.empty(x.numel(), dtype=torch.uint8)
    nf4_cpu._codes_lut(x, bounds, out, torch.empty(x.numel(), dtype=torch.int32), torch.empty(x.numel()),
                       torch.empty(x.numel(), dtype=torch.bool))
    assert torch.equal(out.long(), torch.bucketize(x, torch.tensor(bounds)))


def test_all_zero_blocks_and_non_finite():
    """A zero block stores absmax 0 (codes 7); a zero last block stores 1e-38; NaN/Inf as bitsandbytes."""
    w = heavy_tailed((4, 100), seed=1)
    w[0] = 0.0  # block 0 and part of block 1
    w[3, 36:] = 0.0  # the 16-element remainder block (400 = 6·64 + 16) is all zero
    for dq in (False, True):
        assert_identical(w, 64, dq)
    _, state = quantize_nf4_cpu(w, 64)
    assert state.absmax[0] == 0.0 and state.absmax[-1] == torch.tensor(1e-38)
    w[1, 3], w[2, 5], w[2, 90] = float("nan"), float("inf"), float("-inf")
    assert_identical(w, 64, False)


@pytest.fixture(scope="module")
def smol_weights(smollm2_dir) -> dict[str, torch.Tensor]:
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.3.mlp.down_proj.weight", "model.layers.5.mlp.gate_proj.weight"]
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        return {n: f.get_tensor(n) for n in names}  # bf16 as stored


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_real_smollm2_weights_identical(smol_weights, blocksize, double_quant):
    for w in smol_weights.values():
        assert_identical(w, blocksize, double_quant)  # bf16 input
        assert_identical(w.float(), blocksize, double_quant)


def test_real_residual_identical_through_quant_module(smol_weights):
    """What decompose quantizes: a real fp32 residual W − [W]_r; quant.quantize_nf4 routes CPU tensors here."""
    w = smol_weights["model.layers.0.self_attn.q_proj.weight"].float()  # (576, 576)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    residual = w - (u[:, :16] * s[:16]) @ vh[:16]  # (576, 576)
    for spec in (NF4Spec(), NF4Spec(blocksize=128, double_quant=True)):
        ours = quantize_nf4(residual, spec)
        ref_packed, ref = bnb_nf4(residual, spec.blocksize, spec.double_quant)
        assert torch.equal(ours.packed, ref_packed)
        assert torch.equal(dequantize_nf4(ours), flat_dequantize(ref_packed, ref))


def bnb_dequantize(packed, state) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    state = state.to_bitsandbytes() if isinstance(state, nf4_cpu.NF4State) else state
    return bnbf.dequantize_4bit(packed, state).float()


def flat_dequantize(packed, state) -> torch.Tensor:
    """Reference deq(Q), written plainly: code[q_i]·absmax[i // blocksize] in flat order (high nibble first);
    bitsandbytes' formula, equal to its CPU dequantize wherever that one reads blocks right (n % blocksize = 0)."""
    import bitsandbytes.functional as bnbf

    shape = tuple(state.shape)
    n = shape[0] * shape[1]
    absmax = state.absmax.float()
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    q = packed.reshape(-1).long()
    codes = torch.stack([q >> 4, q & 15], 1).reshape(-1)[:n]  # (n,)
    return (state.code.float()[codes] * absmax.float()[torch.arange(n) // state.blocksize]).view(shape)


@pytest.mark.parametrize("shape,blocksize,double_quant", [((64, 128), 64, False), ((96, 256), 128, True),
                                                          ((576, 576), 64, False), ((33, 1024), 1024, True)])
def test_flat_reference_is_bitsandbytes_where_blocks_follow_rows(shape, blocksize, double_quant):
    w = heavy_tailed(shape, seed=3)
    packed, state = bnb_nf4(w, blocksize, double_quant)
    assert torch.equal(flat_dequantize(packed, state), bnb_dequantize(packed, state))


@pytest.mark.parametrize("shape", [(576, 576), (33, 97), (7, 64)])
@pytest.mark.parametrize("blocksize,double_quant", [(64, False), (128, False), (128, True), (4096, False)])
def test_dequantize_equals_flat_reference(shape, blocksize, double_quant):
    """quant.dequantize_nf4 on the CPU (our routine, no bitsandbytes kernel) = the flat formula, bit for bit,
    also where blocks straddle rows (bitsandbytes 0.50.2's CPU kernel misreads those)."""
    w = heavy_tailed(shape, seed=blocksize)
    q = quantize_nf4(w, NF4Spec(blocksize=blocksize, double_quant=double_quant))
    assert torch.equal(bits(dequantize_nf4(q)), bits(flat_dequantize(q.packed, q.state)))


def test_state_without_bitsandbytes_matches_its_quant_state():
    """The non-nested state (built without importing bitsandbytes) serializes exactly as bitsandbytes'
    QuantState.as_dict(packed=True), and its NF4 levels are get_4bit_type("nf4")."""
    from bitsandbytes.functional import get_4bit_type

    assert torch.equal(bits(nf4_cpu.nf4_code()), bits(get_4bit_type("nf4", device="cpu")))
    packed, state = quantize_nf4_cpu(heavy_tailed((96, 128), seed=1), 64)
    assert isinstance(state, nf4_cpu.NF4State)
    ours, ref = state.as_dict(packed=True), state.to_bitsandbytes().as_dict(packed=True)
    assert list(ours) == list(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and torch.equal(bits(ours[key]), bits(ref[key])), key
    assert {k: v for k, v in state.as_dict().items() if not isinstance(v, torch.Tensor)} == \
           {k: v for k, v in state.to_bitsandbytes().as_dict().items() if not isinstance(v, torch.Tensor)}


def test_cpu_decompose_path_does_not_import_bitsandbytes():
    """Quantize, dequantize and serialize a non-nested NF4 weight in a fresh interpreter: bitsandbytes (≈1 s of
    import: it torch.compiles kernels) stays unimported."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from qpissa.quant import quantize_nf4, dequantize_nf4, minus_dequantized\n"
            "w = torch.randn(64, 128)\n"
            "q = quantize_nf4(w)\n"
            "dequantize_nf4(q); minus_dequantized(w, q); q.serialized('x.weight')\n"
            "print('bitsandbytes' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_rejects_what_bitsandbytes_rejects():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4_cpu(torch.zeros(4, 64), 48)
    with pytest.raises(ValueError, match="float"):
        quantize_nf4_cpu(torch.zeros(4, 64, dtype=torch.int32), 64)


@pytest.mark.parametrize("shape", [(600, 576), (300, 4096), (33, 97), (576, 1536)])
def test_dequantized_rows_equal_whole_dequantize(shape):
    """quant.dequantized_rows / minus_dequantized (what decompose uses to avoid m×n temporaries) give exactly
    the whole-tensor dequantization (the flat formula), also where blocks straddle rows (n % blocksize ≠ 0)."""
    from qpissa.quant import dequantized_rows, minus_dequantized

    for blocksize, dq in ((64, False), (128, True), (256, False), (1024, True)):
        for dtype in (torch.float32, torch.float64):
            w = heavy_tailed(shape, seed=blocksize, dtype=dtype)
            q = quantize_nf4(w, NF4Spec(blocksize=blocksize, double_quant=dq))
            full = flat_dequantize(q.packed, q.state)
            chunks = list(dequantized_rows(q, rows=100))
            assert torch.equal(torch.cat([part for _, part in chunks]), full)
            assert [rows.start for rows, _ in chunks] == list(range(0, shape[0], 100 if len(chunks) > 1 else shape[0]))
            assert torch.equal(minus_dequantized(w, q), w - full.to(dtype))
            wt = w.T  # a Conv1D weight as decompose sees it: the result keeps W's (transposed) layout
            qt = quantize_nf4(wt, NF4Spec(blocksize=blocksize, double_quant=dq))
            expected = wt - flat_dequantize(qt.packed, qt.state).to(dtype)
            got = minus_dequantized(wt, qt)
            assert torch.equal(got, expected) and got.stride() == expected.stride()
