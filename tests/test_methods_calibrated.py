"""Calibrated init math: H-norm helpers vs explicit activations, CLoQ optimality, calibrated QPiSSA/LoftQ,
CorDA and OLoRA against PEFT's own inits, MiLoRA against an explicit SVD. Real MiniLM weights and
activations, real bitsandbytes NF4."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from qpissa.errors import UserError
from qpissa.decompose.methods import CALIBRATED_METHODS, METHODS, QUANTIZED_METHODS, loftq, milora, olora, qlora, qpissa
from qpissa.decompose.initialize import initialize
from qpissa.decompose.methods_calibrated import cloq, corda
from qpissa.quant import nf4_roundtrip, quantize_nf4
from qpissa.decompose.whitening import (Whitening, damped, output_error, sqrt_and_inv_sqrt, weighted_low_rank_factors,
                              whiten)

MODULE = "encoder.layer.1.attention.output.dense"  # (384, 384); its input is the attention context


def frob(e: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(e))


def out_err(e: torch.Tensor, x: torch.Tensor) -> float:
    """Direct output error ‖X·Eᵀ‖_F on explicit activations (the independent reference)."""
    return frob(x.double() @ e.double().T)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(minilm_dir), torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    return model, tok


@pytest.fixture(scope="module")
def acts(minilm, gsm8k_dir):
    """Real inputs of MODULE on GSM8K questions: (calibration X, held-out X), tokens×384, fp32."""
    import json

    model, tok = minilm
    lines = (gsm8k_dir / "train.jsonl").read_text().splitlines()[:48]
    texts = [json.loads(line)["question"] for line in lines]
    captured = []
    handle = model.get_submodule(MODULE).register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    with torch.no_grad():
        for i in range(0, len(texts), 8):
            batch = tok(texts[i:i + 8], return_tensors="pt", padding=True, truncation=True, max_length=128)
            model(**batch)
            mask = batch["attention_mask"].bool()
            captured[-1] = captured[-1][mask]  # (tokens, 384) real tokens only
    handle.remove()
    x = torch.cat(captured)
    half = x.shape[0] * 3 // 4
    return x[:half], x[half:]


@pytest.fixture(scope="module")
def w(minilm):
    return minilm[0].get_submodule(MODULE).weight.detach().clone()  # (384, 384)


@pytest.fixture(scope="module")
def h(acts):
    x = acts[0].double()
    return x.T @ x  # (384, 384) H = Σ x·xᵀ


@pytest.fixture(scope="module")
def h_out(acts):
    x = acts[1].double()
    return x.T @ x


# ---------------------------------------------------------------- helpers vs explicit activations

def test_damped_adds_a_relative_ridge_only_on_the_diagonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64)
    hm = x.T @ x
    d = damped(hm, 0.1)
    mean_diag = torch.diagonal(hm).mean()
    torch.testing.assert_close(d - hm, 0.1 * mean_diag * torch.eye(12, dtype=torch.float64))


def test_sqrt_and_inv_sqrt_are_roots_and_inverses_even_for_a_singular_h():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, 16, dtype=torch.float64)
    hm = x.T @ x
    half, inv_half = sqrt_and_inv_sqrt(hm)
    torch.testing.assert_close(half, half.T)
    torch.testing.assert_close(half @ half, hm, rtol=1e-9, atol=1e-9 * float(hm.abs().max()))
    torch.testing.assert_close(half @ inv_half, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-8)
    singular = x[:5].T @ x[:5]  # rank 5 of 16
    half_s, inv_s = sqrt_and_inv_sqrt(singular)
    assert torch.isfinite(inv_s).all()
    torch.testing.assert_close(half_s @ half_s, singular, rtol=1e-7, atol=1e-7 * float(singular.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_error_equals_the_direct_output_norm(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 24, generator=g) * torch.logspace(-1, 1, 24)  # (tokens, n) anisotropic
    e = torch.randn(37, 24, generator=g).to(dtype)  # (m, n)
    hm = x.double().T @ x.double()
    ref = out_err(e, x)
    assert output_error(e, hm) == pytest.approx(ref, rel=1e-6)
    assert output_error(e, hm, chunk_rows=5) == pytest.approx(ref, rel=1e-6)  # chunked rows
    assert output_error(e, whiten(hm, 0.5)) == pytest.approx(ref, rel=1e-6)  # raw H, not the damped one


def test_real_h_reproduces_the_layer_output_error(w, acts, h):
    e = w - nf4_roundtrip(w)[1]
    assert output_error(e, h) == pytest.approx(out_err(e, acts[0]), rel=1e-6)


# ---------------------------------------------------------------- the closed form is optimal

def test_weighted_fit_reaches_the_eckart_young_bound_and_beats_other_rank_r_corrections():
    """L* = [E·H^½]_r·H^{−½}: its output error equals √Σ_{i>r} σᵢ² of E·chol(H) (an independent
    factorization: E·H·Eᵀ = (E·C)(E·C)ᵀ); random and weight-space rank-r corrections do worse."""
    g = torch.Generator().manual_seed(3)
    m, n, r = 30, 20, 3
    x = torch.randn(200, n, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, n, dtype=torch.float64)
    e = torch.randn(m, n, generator=g, dtype=torch.float64)
    wh = whiten(x.T @ x, 1e-12)  # practically undamped: the bound is for the raw H
    a, b = weighted_low_rank_factors(e, r, 2.0, wh)
    best = output_error(e - 2.0 * b @ a, wh)
    sv = torch.linalg.svdvals(e @ torch.linalg.cholesky(x.T @ x))
    assert best == pytest.approx(float(sv[r:].square().sum().sqrt()), rel=1e-8)
    assert best == pytest.approx(out_err(e - 2.0 * b @ a, x), rel=1e-8)
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    assert best < output_error(e - u[:, :r] @ torch.diag(s[:r]) @ vh[:r], wh)  # weight-space SVD_r(E)
    for _ in range(20):
        rand = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
        assert best < output_error(e - 0.1 * rand, wh)


@pytest.mark.slow
def test_weighted_fit_matches_a_numerical_optimizer():
    """Gradient descent on (A, B) from a random start cannot beat the closed form and gets close to it."""
    g = torch.Generator().manual_seed(4)
    m, n, r = 16, 12, 2
    x = torch.randn(80, n, generator=g, dtype=torch.float64) * torch.logspace(-0.5, 0.5, n, dtype=torch.float64)
    e = torch.randn(m, n, generator=g, dtype=torch.float64)
    wh = whiten(x.T @ x, 1e-12)
    a, b = weighted_low_rank_factors(e, r, 1.0, wh)
    closed = out_err(e - b @ a, x)
    pa = (0.1 * torch.randn(r, n, generator=g, dtype=torch.float64)).requires_grad_()
    pb = (0.1 * torch.randn(m, r, generator=g, dtype=torch.float64)).requires_grad_()
    opt = torch.optim.Adam([pa, pb], lr=0.02)
    for _ in range(3000):
        opt.zero_grad()
        loss = (x @ (e - pb @ pa).T).square().sum()
        loss.backward()
        opt.step()
    numeric = out_err(e - (pb @ pa).detach(), x)
    assert closed <= numeric * (1 + 1e-9)
    assert numeric <= closed * 1.01


# ---------------------------------------------------------------- CLoQ

def test_cloq_keeps_qloras_q_and_adds_the_closed_form_correction(w, h):
    init = cloq(w, 16, 2.0, h, adapter_dtype=torch.float32)
    ref_q = quantize_nf4(w)
    assert torch.equal(init.quantized.packed, ref_q.packed)  # Q = NF4(W): QLoRA's Q
    e = w - nf4_roundtrip(w)[1]
    a, b = weighted_low_rank_factors(e, 16, 2.0, whiten(h, 1e-2))
    torch.testing.assert_close(2.0 * init.b @ init.a, 2.0 * b @ a, rtol=1e-4, atol=1e-6)


def test_cloq_lowers_calibration_and_held_out_output_error(w, acts, h, h_out):
    base = w - nf4_roundtrip(w)[1]
    init = cloq(w, 16, 2.0, h)
    e = w - init.reconstruction()
    assert init.info["output_error"] == pytest.approx(output_error(e, h), rel=1e-4)
    assert output_error(e, h) < 0.9 * output_error(base, h)
    assert output_error(e, h_out) < output_error(base, h_out)  # generalizes to held-out tokens
    # same Q as LoftQ(1) (NF4(W) from A = B = 0), but the correction is chosen in the output norm
    assert out_err(e, acts[0]) < out_err(w - loftq(w, 16, 2.0, iters=1).reconstruction(), acts[0])


# ---------------------------------------------------------------- calibrated QPiSSA and LoftQ

def test_calibrated_qpissa_t1_is_the_principal_part_in_the_h_norm(w, h):
    init = qpissa(w, 16, 1.0, iters=1, refit=False, h=h, adapter_dtype=torch.float32)
    wh = whiten(h, 1e-2)
    half, inv_half = wh.half.float(), wh.inv_half.float()
    u, s, vh = torch.linalg.svd(w @ half, full_matrices=False)
    principal = u[:, :16] @ torch.diag(s[:16]) @ vh[:16] @ inv_half  # [W·H^½]_r·H^{−½}
    torch.testing.assert_close(init.b @ init.a, principal, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(init.base(), nf4_roundtrip(w - init.b @ init.a)[1])


@pytest.mark.slow
def test_calibrated_qpissa_keeps_the_best_iterate_by_output_error_and_beats_the_rest(w, h, h_out):
    cal = qpissa(w, 16, 2.0, iters=5, h=h)
    hist = cal.info["output_error_by_iter"]
    assert cal.info["best_iter"] == hist.index(min(hist)) + 1
    assert output_error(w - cal.reconstruction(), h) <= min(hist) * (1 + 1e-6)
    err = {"qpissa_cal": cal, "qpissa": qpissa(w, 16, 2.0, iters=5), "cloq": cloq(w, 16, 2.0, h),
           "qlora": qlora(w, 16, 2.0), "loftq": loftq(w, 16, 2.0, iters=5)}
    on_calib = {k: output_error(w - v.reconstruction(), h) for k, v in err.items()}
    held_out = {k: output_error(w - v.reconstruction(), h_out) for k, v in err.items()}
    assert on_calib["qpissa_cal"] == min(on_calib.values()), on_calib
    assert held_out["qpissa_cal"] < held_out["qpissa"] < held_out["qlora"], held_out


def test_calibrated_loftq_one_step_is_cloq_and_more_steps_help(w, h):
    one = loftq(w, 16, 2.0, iters=1, h=h)
    ref = cloq(w, 16, 2.0, h)
    assert torch.equal(one.quantized.packed, ref.quantized.packed)
    assert torch.equal(one.a, ref.a) and torch.equal(one.b, ref.b)
    three = loftq(w, 16, 2.0, iters=3, h=h)
    plain = loftq(w, 16, 2.0, iters=3)
    assert output_error(w - three.reconstruction(), h) < output_error(w - one.reconstruction(), h)
    assert output_error(w - three.reconstruction(), h) < output_error(w - plain.reconstruction(), h)


def test_h_none_keeps_the_weight_space_methods(w):
    for method in ("qpissa", "loftq"):
        a = initialize(method, w, 8, 1.0, iters=2)
        b = initialize(method, w, 8, 1.0, iters=2, h=None)
        assert torch.equal(a.a, b.a) and torch.equal(a.quantized.packed, b.quantized.packed)
        assert "frobenius_by_iter" in b.info


def test_a_shared_whitening_gives_the_same_result_as_the_raw_h(w, h):
    wh = whiten(h, 1e-2)
    assert isinstance(wh, Whitening) and whiten(wh) is wh
    a = initialize("qpissa", w, 8, 1.0, iters=2, h=h)
    b = initialize("qpissa", w, 8, 1.0, iters=2, h=wh)
    assert torch.equal(a.a, b.a) and torch.equal(a.b, b.b)


# ---------------------------------------------------------------- CorDA, OLoRA vs PEFT; MiLoRA vs SVD

def _linear(weight: torch.Tensor) -> torch.nn.Module:
    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            self.lin.weight.data.copy_(weight)
    return One()


def _peft_layer(model, config):
    from peft import get_peft_model

    layer = get_peft_model(model, config).base_model.model.lin
    return (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(),
            layer.base_layer.weight.detach())


def _assert_factors_close(init, a_ref, b_ref, rtol, atol):
    sign = torch.sign((init.a * a_ref).sum(dim=1))  # (r,) per singular vector
    assert sign.abs().min() == 1
    torch.testing.assert_close(init.a * sign[:, None], a_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(init.b * sign[None, :], b_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("module", [MODULE, "encoder.layer.1.intermediate.dense"])
def test_corda_equals_peft_corda_on_the_same_covariance(minilm, acts, module, tmp_path):
    from peft import LoraConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.lora.config import CordaConfig

    weight = minilm[0].get_submodule(module).weight.detach().clone()  # (384,384) or (1536,384)
    x = acts[0] / acts[0].max().abs()  # PEFT's normalization
    cov = (x.T @ x).float()  # (384, 384)
    torch.save({"lin": cov}, tmp_path / "cov.pt")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], init_lora_weights="corda",
                        corda_config=CordaConfig(covariance_file=str(tmp_path / "cov.pt"), corda_method="ipm"))
    model = _linear(weight)
    preprocess_corda(model, config)
    a_ref, b_ref, residual_ref = _peft_layer(model, config)

    init = corda(weight, 8, 2.0, cov, adapter_dtype=torch.float32, quantize=False)
    _assert_factors_close(init, a_ref, b_ref, rtol=2e-3, atol=1e-5)
    # PEFT inverts C̃ in fp32, we solve in fp64: agree to fp32 round-off relative to the tensors
    assert frob(2.0 * (init.b @ init.a - b_ref @ a_ref)) < 1e-4 * frob(2.0 * b_ref @ a_ref)
    assert frob(init.residual - residual_ref) < 1e-4 * frob(residual_ref)
    quantized = corda(weight, 8, 2.0, cov, adapter_dtype=torch.float32)  # our NF4 of the same residual
    assert torch.equal(quantized.quantized.packed, quantize_nf4(init.residual).packed)
    # vs NF4 of PEFT's residual: only codes on a rounding boundary (fp32 vs fp64 round-off) may differ
    flips = ((quantized.base() - nf4_roundtrip(residual_ref)[1]).abs() > 1e-5).float().mean()
    assert flips < 1e-3, float(flips)


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536)])
def test_olora_equals_peft_olora(minilm, shape):
    from peft import LoraConfig

    weights = {(384, 384): MODULE, (1536, 384): "encoder.layer.1.intermediate.dense",
               (384, 1536): "encoder.layer.1.output.dense"}
    weight = minilm[0].get_submodule(weights[shape]).weight.detach().clone()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], init_lora_weights="olora")
    a_ref, b_ref, residual_ref = _peft_layer(_linear(weight), config)
    init = olora(weight, 8, 2.0, adapter_dtype=torch.float32, quantize=False)
    torch.testing.assert_close(init.a, a_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(init.b, b_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(init.residual, residual_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(olora(weight, 8, 2.0, adapter_dtype=torch.float32).base(),
                               nf4_roundtrip(residual_ref)[1], rtol=0, atol=1e-3)


def test_milora_takes_the_minor_singular_components(w):
    init = milora(w, 8, 2.0, adapter_dtype=torch.float32)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    minor = (u[:, -8:] @ torch.diag(s[-8:]) @ vh[-8:]).float()  # r smallest triplets
    torch.testing.assert_close(2.0 * init.b @ init.a, minor, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(2.0 * init.b.double() @ init.a.double())[:8],
                               s[-8:], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(init.base(), nf4_roundtrip(w - 2.0 * init.b @ init.a)[1])


# ---------------------------------------------------------------- dispatch

def test_dispatch_and_registries(w, h):
    assert {"cloq", "corda", "milora", "olora"} <= set(METHODS) <= set(QUANTIZED_METHODS) | {"lora", "pissa"}
    for method in CALIBRATED_METHODS:
        with pytest.raises(UserError, match="needs calibration statistics"):
            initialize(method, w, 4, 1.0)
    direct = {"cloq": cloq(w, 4, 1.0, h), "corda": corda(w, 4, 1.0, h), "milora": milora(w, 4, 1.0),
              "olora": olora(w, 4, 1.0)}
    for method, ref in direct.items():
        got = initialize(method, w, 4, 1.0, h=h)
        assert torch.equal(got.a, ref.a) and torch.equal(got.b, ref.b)
        assert torch.equal(got.quantized.packed, ref.quantized.packed)


def test_factors_do_not_depend_on_the_scale_of_h_but_the_output_error_does(w, h):
    """H summed or averaged over tokens gives the same init (the damping is relative to mean(diag H))."""
    a = cloq(w, 8, 1.0, h, adapter_dtype=torch.float32)
    b = cloq(w, 8, 1.0, h / 1000.0, adapter_dtype=torch.float32)
    torch.testing.assert_close(b.b @ b.a, a.b @ a.a, rtol=1e-4, atol=1e-6)
    e = w - a.reconstruction()
    assert output_error(e, h / 1000.0) == pytest.approx(output_error(e, h) / 1000.0 ** 0.5, rel=1e-9)
