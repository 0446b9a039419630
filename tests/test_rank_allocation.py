"""--rank-allocation error: measured curves, the greedy choice (checked by an independent computation), the
parameter budget, the error against uniform r, PEFT loading of rank_pattern, resume; --balance-factors."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from qpissa.decompose import DecomposeConfig, decompose
from qpissa.decompose.linalg import balance_factors
from qpissa.errors import UserError

MINILM_TARGETS = [r"encoder\.layer\.[01]\..*"]  # 12 modules: fast
SMOLLM2_TARGETS = [r"model\.layers\.(0|15)\.(self_attn\.(q|k|o)_proj|mlp\.(up|down)_proj)"]


def _run(model: Path, out: Path, **kw) -> dict:
    return decompose(model, out, DecomposeConfig(rank=8, progress=False, loftq_baseline=False, spectral_norms=False,
                                                 **kw))


def independent_greedy(curves: dict[str, dict], budget: int) -> dict[str, int]:
    """The greedy choice written out plainly: from the smallest ranks, repeatedly take the step (to any larger
    candidate) with the largest drop of err² per parameter over all modules (the farthest on ties); a module whose
    best step no longer fits stops growing."""
    pos = {m: 0 for m in curves}
    frozen: set[str] = set()
    spent = sum(c["ranks"][0] * c["width"] for c in curves.values())
    while True:
        best = None
        for order, (m, c) in enumerate(curves.items()):
            if m in frozen:
                continue
            i = pos[m]
            sq = [e * e for e in c["errors"]]
            steps = [((sq[i] - sq[j]) / ((c["ranks"][j] - c["ranks"][i]) * c["width"]), j)
                     for j in range(i + 1, len(sq)) if sq[j] < sq[i]]
            if not steps:
                continue
            top = max(s for s, _ in steps)
            j = max(j for s, j in steps if math.isclose(s, top, rel_tol=1e-12))
            if best is None or top > best[0]:
                best = (top, m, j)
        if best is None:
            break
        _, m, j = best
        extra = (curves[m]["ranks"][j] - curves[m]["ranks"][pos[m]]) * curves[m]["width"]
        if spent + extra > budget:
            frozen.add(m)
            continue
        spent += extra
        pos[m] = j
    return {m: c["ranks"][pos[m]] for m, c in curves.items()}


def _sum_sq(report: dict) -> float:
    return sum(m["method"]["frobenius"] ** 2 for m in report["modules"])


@pytest.mark.parametrize("which", ["minilm", "smollm2"])
@pytest.mark.slow
def test_error_allocation_beats_uniform_at_equal_params(which, minilm_dir, request, tmp_path):
    model, targets = (minilm_dir, MINILM_TARGETS) if which == "minilm" else \
        (request.getfixturevalue("smollm2_dir"), SMOLLM2_TARGETS)
    uniform = _run(model, tmp_path / "u", targets=targets)
    alloc = _run(model, tmp_path / "e", targets=targets, rank_allocation="error")
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    curves, a = manifest["curves"], manifest["allocation"]
    widths = {m["module"]: sum(m["shape"]) for m in uniform["modules"]}
    assert a["budget"] == 8 * sum(widths.values())
    # the stored ranks are the adapter's shapes, cost at most the uniform budget, and are the greedy choice
    config = json.loads((tmp_path / "e" / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {m["module"]: m["rank"] for m in alloc["modules"]}
    assert sum(config["rank_pattern"][m] * w for m, w in widths.items()) == a["params"] <= a["budget"]
    assert not a["kept_uniform"]
    assert config["rank_pattern"] == independent_greedy(curves, a["budget"])
    assert len(set(config["rank_pattern"].values())) > 1  # the modules really differ
    assert config["alpha_pattern"] == {m: float(k) for m, k in config["rank_pattern"].items()}  # s = α/r = 1
    # measured, not assumed: uniform r's point is qpissa's first iterate (fp32 factors there, bf16 in the method)
    for row in uniform["modules"]:
        c = curves[row["module"]]
        first = row["info"]["frobenius_by_iter"][0]
        assert c["errors"][c["ranks"].index(8)] == pytest.approx(first, rel=1e-2)  # method: bf16 factors
    # at equal parameter count the summed error (Σ‖E‖², the objective, and Σ‖E‖) is below uniform's
    assert a["sum_sq_error"] < a["uniform_sum_sq_error"]
    assert _sum_sq(alloc) < _sum_sq(uniform)
    assert alloc["overall"]["method"]["frobenius"] < uniform["overall"]["method"]["frobenius"]
    report_md = (tmp_path / "e" / "report.md").read_text()
    assert "## Rank allocation (error)" in report_md and "% lower" in report_md


def test_rank_pattern_loads_in_plain_peft(minilm_dir, tmp_path):
    """PeftModel.from_pretrained builds each module at its own rank with s = α/r = 1, and the loaded layer computes
    deq(Q)·x + s·B·A·x with the stored factors."""
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    _run(minilm_dir, tmp_path / "e", targets=MINILM_TARGETS, rank_allocation="error")
    pattern = json.loads((tmp_path / "e" / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    stored = load_file(str(tmp_path / "e" / "adapter" / "adapter_model.safetensors"))
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tmp_path / "e" / "residual"), tmp_path / "e" / "adapter")
    modules = dict(model.named_modules())
    torch.manual_seed(0)
    for name, k in pattern.items():
        layer = modules[f"base_model.model.{name}"]
        assert layer.r["default"] == k and layer.scaling["default"] == 1.0
        a = stored[f"base_model.model.{name}.lora_A.weight"].float()  # (k, n)
        b = stored[f"base_model.model.{name}.lora_B.weight"].float()  # (m, k)
        assert a.shape[0] == b.shape[1] == k
        base = layer.base_layer
        w = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()  # (m, n)
        x = torch.randn(3, w.shape[1])
        with torch.no_grad():
            got, frozen = layer(x).float(), base(x).float()
        want = x @ (b @ a).T  # s·B·A·x with s = 1: PEFT's fp32 adapter path, tight
        assert torch.allclose(got - frozen, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        ref = x @ w.T + base.bias.float()  # deq(Q)·x + bias: bitsandbytes computes it in bf16
        assert torch.allclose(frozen, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.slow
def test_resume_is_byte_identical(minilm_dir, tmp_path):
    """Interrupted during the curves (half measured, no allocation yet) or during the outputs: the same files."""
    full = tmp_path / "full"
    _run(minilm_dir, full, targets=MINILM_TARGETS, rank_allocation="error")
    for stage in ("curves", "outputs"):
        cut = tmp_path / stage
        shutil.copytree(full, cut)
        manifest = json.loads((cut / "manifest.json").read_text())
        manifest["status"] = "running"
        if stage == "curves":
            names = list(manifest["curves"])
            manifest["curves"] = {m: manifest["curves"][m] for m in names[:len(names) // 2]}
            del manifest["allocation"]
            manifest["tensors"] = {}
            shutil.rmtree(cut / ".parts")
        else:
            for m in list(manifest["tensors"])[len(manifest["tensors"]) // 2:]:
                (cut / ".parts" / manifest["tensors"].pop(m)["part"]).unlink()
        (cut / "manifest.json").write_text(json.dumps(manifest))
        for name in ("residual", "adapter", "report.json", "report.md"):
            p = cut / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        _run(minilm_dir, cut, targets=MINILM_TARGETS, rank_allocation="error", resume=True)
        for f in ("adapter/adapter_model.safetensors", "residual/model.safetensors"):
            assert (cut / f).read_bytes() == (full / f).read_bytes(), (stage, f)
        assert json.loads((cut / "adapter/adapter_config.json").read_text())["rank_pattern"] == \
            json.loads((full / "adapter/adapter_config.json").read_text())["rank_pattern"]


def test_adapter_params_budget_and_errors(minilm_dir, tmp_path):
    widths = 2 * (3 * (384 + 384) + 384 + 384 + (1536 + 384) + (384 + 1536))  # 2 layers × 6 modules
    budget = 4 * widths + 1000
    _run(minilm_dir, tmp_path / "e", targets=MINILM_TARGETS, rank_allocation="error", adapter_params=budget)
    a = json.loads((tmp_path / "e" / "manifest.json").read_text())["allocation"]
    assert a["budget"] == budget and a["params"] <= budget and a["uniform_sum_sq_error"] is None
    with pytest.raises(UserError, match="adapter-params"):
        _run(minilm_dir, tmp_path / "small", targets=MINILM_TARGETS, rank_allocation="error", adapter_params=10)
    assert not (tmp_path / "small" / "adapter").exists()
    with pytest.raises(UserError, match="rank-allocation"):
        DecomposeConfig(method="loftq", rank_allocation="error")
    with pytest.raises(UserError, match="adapter-params"):
        DecomposeConfig(adapter_params=1000)


def test_balance_factors_keeps_product_exactly():
    torch.manual_seed(0)
    a = (torch.randn(6, 40) * torch.logspace(-4, 0, 6)[:, None]).to(torch.bfloat16)  # tiny rows (A·H^-1/2)
    b = (torch.randn(30, 6) * torch.logspace(3, 1, 6)[None, :]).to(torch.bfloat16)  # huge columns
    a2, b2 = balance_factors(a, b)
    assert torch.equal(b2.float() @ a2.float(), b.float() @ a.float())
    ratio = torch.linalg.vector_norm(a2.float(), dim=1) / torch.linalg.vector_norm(b2.float(), dim=0)
    assert bool(((ratio >= 0.5) & (ratio <= 2)).all())
    before = torch.linalg.vector_norm(a.float(), dim=1) / torch.linalg.vector_norm(b.float(), dim=0)
    assert float(before.min()) < 1e-4  # it was badly unbalanced


@pytest.mark.slow
def test_calibrated_allocation_uses_output_error(smollm2_dir, gsm8k_dir, tmp_path):
    """With --calib-data the curves are output errors ‖E·H^½‖ (measured with the calibration H, two passes of the
    block walk), the greedy choice still matches, and the balanced calibrated factors keep B·A."""
    kw = dict(method="qpissa", rank=4, targets=[r"model\.layers\.[01]\.self_attn\.(q|o)_proj"],
              calib_data=str(gsm8k_dir / "train.jsonl"), calib_samples=4, calib_holdout=2, calib_seq_len=32,
              loftq_baseline=False, spectral_norms=False, progress=False)
    decompose(smollm2_dir, tmp_path / "u", **kw)
    report = decompose(smollm2_dir, tmp_path / "e", rank_allocation="error", balance_factors=True, **kw)
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    a, curves = manifest["allocation"], manifest["curves"]
    assert a["sum_sq_error"] <= a["uniform_sum_sq_error"] and a["params"] <= a["budget"]
    assert {r["module"]: r["rank"] for r in report["modules"]} == independent_greedy(curves, a["budget"]) == \
        json.loads((tmp_path / "e" / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    uniform = json.loads((tmp_path / "u" / "report.json").read_text())
    for row in uniform["modules"]:  # the curve at r is the output error of qpissa's first iterate (calibration H)
        c = curves[row["module"]]
        first = row["info"]["output_error_by_iter"][0]
        assert c["errors"][c["ranks"].index(4)] == pytest.approx(first, rel=2e-2)
    assert "output error" in (tmp_path / "e" / "report.md").read_text()
