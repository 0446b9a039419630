"""Randomized SVD against LAPACK on a real weight; seeds make it reproducible."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from qpissa.decompose.linalg import error_norms, exact_svd, low_rank_factors, randomized_svd


@pytest.fixture(scope="module")
def weight(minilm_dir) -> torch.Tensor:
    with safe_open(str(minilm_dir / "model.safetensors"), "pt") as f:
        return f.get_tensor("encoder.layer.2.intermediate.dense.weight").float()  # (1536, 384)


def _tail_error(w: torch.Tensor, u, s, vh) -> float:
    return float(torch.linalg.vector_norm(w - u @ torch.diag(s) @ vh))


def test_randomized_svd_excess_error_matches_design_figures(weight):
    r = 16
    best = _tail_error(weight, *exact_svd(weight, r))
    # Eckart–Young: the exact optimum is the tail of the spectrum.
    s_all = torch.linalg.svdvals(weight)
    assert best == pytest.approx(float(torch.linalg.vector_norm(s_all[r:])), rel=1e-4)
    excess = {(p, q): _tail_error(weight, *randomized_svd(weight, r, oversample=p, power_iters=q, seed=0)) / best - 1
              for p, q in [(16, 4), (0, 4), (16, 0)]}
    assert 0 <= excess[(16, 4)] < 0.005  # measured: +0.14% (Halko et al. 2011 bound, p=16 q=4)
    assert excess[(16, 4)] <= excess[(0, 4)] + 1e-6  # oversampling helps
    assert excess[(16, 0)] > 5 * excess[(16, 4)]  # no power iterations: far worse


def test_randomized_svd_is_reproducible_with_a_seed(weight):
    u1, s1, v1 = randomized_svd(weight, 8, seed=3)
    u2, s2, v2 = randomized_svd(weight, 8, seed=3)
    assert torch.equal(u1, u2) and torch.equal(s1, s2) and torch.equal(v1, v2)
    _, s3, _ = randomized_svd(weight, 8, power_iters=0, seed=4)
    _, s4, _ = randomized_svd(weight, 8, power_iters=0, seed=5)
    assert not torch.equal(s3, s4)


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.25])
def test_low_rank_factors_reproduce_the_principal_part_for_any_scale(weight, scale):
    a, b = low_rank_factors(weight, 16, scale)
    u, s, vh = exact_svd(weight, 16)
    assert a.shape == (16, 384) and b.shape == (1536, 16)
    torch.testing.assert_close(scale * b @ a, u @ torch.diag(s) @ vh, rtol=1e-4, atol=1e-5)


def test_error_norms_against_definitions():
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    norms = error_norms(e)
    assert norms["nuclear"] == pytest.approx(float(torch.linalg.matrix_norm(e, "nuc")))
    assert norms["frobenius"] == pytest.approx(float(e.pow(2).sum().sqrt()))
    assert norms["spectral"] == pytest.approx(float(torch.linalg.matrix_norm(e, 2)))
