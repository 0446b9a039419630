"""Balanced factors are the default of calibrated inits (the measured winner, docs/benchmarks.md): B·A, the residual
and every error are those of the unbalanced run bit for bit; only the split of each pair's scale changes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import helpers
from qpissa.decompose import DecomposeConfig, decompose


def test_default_resolves_per_init():
    assert DecomposeConfig(method="qpissa", calib_data="d.jsonl").balances()
    assert DecomposeConfig(method="cloq", calib_data="d.jsonl").identity()["balance_factors"] is True
    assert not DecomposeConfig(method="qpissa").balances()  # uncalibrated: as before
    assert not DecomposeConfig(method="pissa", calib_data="d.jsonl").balances()  # pissa ignores H
    assert not DecomposeConfig(method="qpissa", calib_data="d.jsonl").balances(calibrated=False)  # MoE fallback
    assert not DecomposeConfig(method="cloq", calib_data="d.jsonl", balance_factors=False).balances()
    assert DecomposeConfig(method="qlora", balance_factors=True).balances()


@pytest.fixture(scope="module")
def calibrated_runs(smollm2_dir, gsm8k_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("balance")
    model = helpers.tiny_llama(root / "model", tokenizer=smollm2_dir)
    kw = dict(method="qpissa", rank=4, calib_data=str(gsm8k_dir / "train.jsonl"), calib_samples=4, calib_holdout=2,
              calib_seq_len=32, loftq_baseline=False, spectral_norms=False, progress=False)
    decompose(model, root / "default", **kw)
    decompose(model, root / "unbalanced", **kw, balance_factors=False)
    return {"default": root / "default", "unbalanced": root / "unbalanced"}


def test_calibrated_default_is_balanced_with_the_same_product_and_residual(calibrated_runs):
    import json

    bal, raw = (helpers.lora_pairs(calibrated_runs[k] / "adapter") for k in ("default", "unbalanced"))
    assert json.loads((calibrated_runs["default"] / "report.json").read_text())["arguments"]["balance_factors"]
    assert sorted(bal) == sorted(raw) and len(bal) == 14
    worst_raw = 0.0
    for module, (a, b) in bal.items():
        a0, b0 = raw[module]
        assert torch.equal(b @ a, b0 @ a0), module  # powers of two: the product is the same bit for bit
        ratio = b.norm(dim=0) / a.norm(dim=1)  # ‖B_:,i‖ / ‖A_i,:‖ per rank-1 pair
        assert float(ratio.max()) <= 2.0 and float(ratio.min()) >= 0.5, (module, ratio)
        worst_raw = max(worst_raw, float((b0.norm(dim=0) / a0.norm(dim=1)).log2().abs().max()))
    assert worst_raw > 2.0  # the calibrated factors were unbalanced (A carries H^-1/2): the default changed them
    for name in ("residual/model.safetensors",):
        assert (calibrated_runs["default"] / name).read_bytes() == (calibrated_runs["unbalanced"] / name).read_bytes()
