"""SORSA regularizer: value and gradient against an independent float64 computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qpissa.train.sorsa import adapter_pairs, orthonormal_penalty, sorsa_regularizer, sorsa_step


def reference_penalty(a: np.ndarray, b: np.ndarray) -> float:
    """‖ÂÂᵀ − I‖_F + ‖B̂ᵀB̂ − I‖_F written with explicit loops over rows/columns (float64)."""
    r = a.shape[0]
    a_hat = np.stack([a[i] / np.sqrt(np.sum(a[i] ** 2)) for i in range(r)])
    b_hat = np.stack([b[:, j] / np.sqrt(np.sum(b[:, j] ** 2)) for j in range(r)], axis=1)
    ga = np.array([[a_hat[i] @ a_hat[j] - (i == j) for j in range(r)] for i in range(r)])
    gb = np.array([[b_hat[:, i] @ b_hat[:, j] - (i == j) for j in range(r)] for i in range(r)])
    return float(np.sqrt((ga ** 2).sum()) + np.sqrt((gb ** 2).sum()))


def factors(seed: int, m: int = 24, n: int = 20, r: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(m, r, generator=g, dtype=torch.float64)


def test_value_matches_reference() -> None:
    pairs = [factors(0), factors(1, m=10, n=30, r=3)]
    got = float(sorsa_regularizer(pairs))
    want = sum(reference_penalty(a.numpy(), b.numpy()) for a, b in pairs)
    assert got == pytest.approx(want, rel=1e-12)
    assert want > 0.5  # random factors are far from orthonormal: the test can fail


def test_zero_on_pissa_factors() -> None:
    """PiSSA factors A = diag(√S)Vᵀ, B = U diag(√S) have orthonormal directions: R = 0."""
    w = torch.randn(32, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    a, b = s[:5].sqrt()[:, None] * vh[:5], u[:, :5] * s[:5].sqrt()
    assert float(orthonormal_penalty(a, b)) < 1e-12
    assert float(orthonormal_penalty(a + 0.1 * torch.randn_like(a), b)) > 1e-3


@pytest.mark.slow
def test_gradient_matches_finite_differences() -> None:
    a, b = factors(2)
    a.requires_grad_(True), b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: orthonormal_penalty(x, y), (a, b), eps=1e-6, atol=1e-7)
    # and against the reference with central differences on a few coordinates
    ga, _ = torch.autograd.grad(orthonormal_penalty(a, b), (a, b))
    a0, b0 = a.detach().numpy(), b.detach().numpy()
    for i, j in [(0, 0), (1, 7), (3, 19)]:
        plus, minus = a0.copy(), a0.copy()
        plus[i, j] += 1e-6
        minus[i, j] -= 1e-6
        fd = (reference_penalty(plus, b0) - reference_penalty(minus, b0)) / 2e-6
        assert float(ga[i, j]) == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_step_is_scaled_gradient_descent() -> None:
    """θ ← θ − lr·(γ/peak)·∇R, applied to every factor, returning R before the step."""
    a, b = factors(4)
    a, b = a.float(), b.float()
    a_req, b_req = a.clone().requires_grad_(), b.clone().requires_grad_()
    ga, gb = torch.autograd.grad(orthonormal_penalty(a_req, b_req), (a_req, b_req))
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    value = sorsa_step([(pa, pb)], gamma=4e-4, lr=1e-5, peak_lr=2e-5)
    assert value == pytest.approx(float(orthonormal_penalty(a, b)), rel=1e-6)
    torch.testing.assert_close(pa.detach(), a - 1e-5 * (4e-4 / 2e-5) * ga)
    torch.testing.assert_close(pb.detach(), b - 1e-5 * (4e-4 / 2e-5) * gb)


def test_adapter_pairs_finds_peft_factors() -> None:
    from peft import LoraConfig, get_peft_model

    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"]))
    pairs = adapter_pairs(model)
    assert [(tuple(a.shape), tuple(b.shape)) for a, b in pairs] == [((2, 8), (6, 2)), ((2, 6), (4, 2))]
