"""NF4 through bitsandbytes vs an independent plain-torch NF4 (16 code values, absmax per block)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from qpissa.decompose.linalg import error_norms
from qpissa.quant import NF4Spec, dequantize_nf4, nf4_roundtrip, quantize_nf4

# The 16 NF4 levels (Dettmers et al. 2023, Appendix E), written out independently of bitsandbytes.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


def reference_nf4(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Plain-torch NF4 round trip: row-major blocks, absmax scale, nearest level."""
    flat = w.reshape(-1, blocksize)  # (blocks, blocksize)
    absmax = flat.abs().amax(dim=1, keepdim=True)  # (blocks, 1)
    normed = flat / absmax
    idx = (normed[..., None] - NF4_LEVELS).abs().argmin(dim=-1)  # (blocks, blocksize)
    return (NF4_LEVELS[idx] * absmax).reshape(w.shape)


@pytest.fixture(scope="module")
def weights(minilm_dir) -> dict[str, torch.Tensor]:
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.4.output.dense.weight"]
    with safe_open(str(minilm_dir / "model.safetensors"), "pt") as f:
        return {n: f.get_tensor(n).float() for n in names}


@pytest.mark.parametrize("blocksize", [64, 128])
def test_error_equals_plain_torch_reference_on_real_weights(weights, blocksize):
    for name, w in weights.items():
        _, deq = nf4_roundtrip(w, NF4Spec(blocksize=blocksize))
        ref = reference_nf4(w, blocksize)
        agree = (deq == ref).float().mean().item()
        assert agree > 0.9999, f"{name}: only {agree:.5%} of values equal the reference"
        ours, theirs = error_norms(w - deq), error_norms(w - ref)
        for norm in ours:
            assert ours[norm] == pytest.approx(theirs[norm], rel=1e-4), (name, norm)


def test_requantizing_a_dequantized_tensor_is_bit_exact(weights):
    w = next(iter(weights.values()))
    q1, deq = nf4_roundtrip(w)
    q2 = quantize_nf4(deq)
    assert torch.equal(q1.packed, q2.packed)
    assert torch.equal(dequantize_nf4(q2), deq)


def test_double_quant_adds_a_little_error(weights):
    w = next(iter(weights.values()))
    plain = error_norms(w - nf4_roundtrip(w)[1])["frobenius"]
    double = error_norms(w - nf4_roundtrip(w, NF4Spec(double_quant=True))[1])["frobenius"]
    assert 1.0 < double / plain < 1.06  # measured ≈ +2.3% (QLoRA, Dettmers et al. 2023: double quant costs little error)


def test_serialized_layout_is_what_bitsandbytes_reads(weights):
    import bitsandbytes.functional as bnbf

    w = next(iter(weights.values()))
    q = quantize_nf4(w, NF4Spec(double_quant=True))
    ser = q.serialized("layer.weight")
    assert ser["layer.weight"].dtype == torch.uint8 and ser["layer.weight"].numel() == w.numel() // 2
    qs_dict = {k.removeprefix("layer.weight."): v for k, v in ser.items() if k != "layer.weight"}
    state = bnbf.QuantState.from_dict(qs_dict, device=torch.device("cpu"))
    assert torch.equal(bnbf.dequantize_4bit(ser["layer.weight"], state), dequantize_nf4(q))


def test_bad_blocksize_is_refused():
    with pytest.raises(ValueError, match="blocksize"):
        NF4Spec(blocksize=48)


def test_cpu_blocks_across_rows_probe_and_warning():
    """The probe agrees with a direct check on a real width (576 at blocksize 128); the warning names the tensor."""
    import bitsandbytes.functional as bnbf

    from qpissa.quant import cpu_dequantize_handles_blocks_across_rows, warn_cpu_blocksize

    w = torch.randn(8, 576, generator=torch.Generator().manual_seed(0))  # (8, 576): 4.5 blocks of 128 per row
    packed, state = bnbf.quantize_4bit(w, blocksize=128, quant_type="nf4")
    q = packed.flatten()
    codes = torch.stack([q >> 4, q & 15], 1).flatten().long()
    flat = (state.code[codes].view(-1, 128) * state.absmax.view(-1, 1)).view(8, 576)  # flat-order reference
    correct = torch.equal(bnbf.dequantize_4bit(packed, state).float(), flat)
    assert cpu_dequantize_handles_blocks_across_rows() == correct
    line = warn_cpu_blocksize({"layers.0.q.weight": 576}, 128, "cpu")
    assert (line is None) == correct
    if line:
        assert "layers.0.q.weight" in line and "576" in line and "--blocksize 128" in line
    assert warn_cpu_blocksize({"layers.0.q.weight": 576}, 64, "cpu") is None
    assert warn_cpu_blocksize({"layers.0.q.weight": 576}, 128, "cuda") is None
