"""Quantized sources through the pipeline: decompose (report, manifest, residual), plan, merge, train.

Fast: decompose on tiny FP8 / GPTQ act-order sources and plan's download size. Slow: every format
decompose → train → merge → plain load (the bf16 numbers are checked against an independent computation).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import source_models as sm
from qpissa.formats import load_tensor
from qpissa.sources import open_source, scan_source


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return sm.tiny_llama(tmp_path_factory.mktemp("plain") / "m")


def _residual(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "residual" / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_decompose_fp8_pissa_residual_plus_adapter_is_the_dequantized_source(plain, tmp_path):
    from qpissa.decompose import decompose

    src = sm.to_fp8(plain, tmp_path / "fp8", (32, 32))
    report = decompose(src, tmp_path / "out", method="pissa", rank=4, targets=["q_proj", "k_proj"], progress=False)
    deq = {t.name: load_tensor(t) for t in scan_source(src)}
    res = _residual(tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        factors = {k: f.get_tensor(k) for k in f.keys()}
    q = "model.layers.0.self_attn.q_proj"
    a, b = factors[f"base_model.model.{q}.lora_A.weight"], factors[f"base_model.model.{q}.lora_B.weight"]
    principal = b.float() @ a.float()  # PiSSA: s = 1 at alpha = r
    w = deq[q + ".weight"]
    assert res[q + ".weight"].dtype == torch.bfloat16  # the residual in the config's dtype, not the source's fp8
    assert (res[q + ".weight"].float() + principal - w).abs().max() < 2 * w.abs().max() * 2**-8  # bf16 rounding
    v = "model.layers.1.self_attn.v_proj.weight"  # not a target: written back dequantized, bf16
    assert res[v].dtype == torch.bfloat16 and torch.equal(res[v], deq[v].bfloat16())
    assert not any(k.endswith("_scale_inv") for k in res)
    config = json.loads((tmp_path / "out" / "residual" / "config.json").read_text())
    assert "quantization_config" not in config  # pissa: a plain residual, not the source's FP8
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["format"] == "fp8" and manifest["source"]["block"] == [32, 32]
    assert report["source"]["errors_against"] == "the dequantized source weights"


def test_decompose_gptq_act_order_report_names_source_and_requant_baseline(plain, tmp_path):
    from transformers import AutoModelForCausalLM

    from qpissa.decompose import decompose

    src, _ = sm.to_gptq_awq(plain, tmp_path / "gptq", "gptq", group=32, act_order=True)
    report = decompose(src, tmp_path / "out", rank=4, progress=False)
    s = report["source"]
    assert s["format"] == "gptq" and s["block"] == 32 and "act-order" in s["detail"] and s["bits"] == 4.0
    assert s["source_error"].startswith("unknown")
    assert s["qpissa_error_fro"] == report["overall"]["method"]["frobenius"]
    assert s["nf4_requant_error_fro"] == report["overall"]["qlora"]["frobenius"]  # QLoRA = NF4(dequantized source)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Source: gptq" in md and "re-quantizing it to NF4 (QLoRA)" in md
    config = json.loads((tmp_path / "out" / "residual" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "residual")  # plain load: NF4 residual


def test_plan_download_size_matches_the_files(plain, tmp_path):
    from qpissa.plan.model_shapes import load_config, shapes_from_config
    from qpissa.plan.source_size import source_plan

    for src in (sm.to_fp8(plain, tmp_path / "fp8", (32, 32)), sm.to_gptq_awq(plain, tmp_path / "awq", "awq")[0],
                sm.to_bnb(plain, tmp_path / "nf4", load_in_4bit=True, bnb_4bit_quant_type="nf4")):
        config = load_config(src)
        est = source_plan(config, shapes_from_config(config))  # from config.json alone
        stored = sum(t.file.stat().st_size for t in {t.file: t for t in open_source(src).stored}.values())
        assert est is not None and not est["download_exact"]
        # within 10%: the tiny files' fixed costs (headers, bitsandbytes' quant-state JSON, g_idx) are not counted
        assert abs(est["download_bytes"] - stored) < 0.1 * stored, (src.name, est["download_bytes"], stored)
        assert source_plan(config, shapes_from_config(config), str(src))["download_bytes"] == stored


def test_plan_prints_source_line_for_70b_bnb_config(tmp_path):
    import subprocess
    import sys

    config = json.loads((Path(__file__).parent / "fixtures" / "configs" / "llama-3-70b.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-c", "from qpissa.cli import main; main()", "plan", str(tmp_path / "config.json"),
                          "--json", str(tmp_path / "p.json")], capture_output=True, text=True, env={
                              **__import__("os").environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    src = json.loads((tmp_path / "p.json").read_text())["source"]
    # 68.5B weights in the blocks' linears at 0.5 + 1/64 + 4/16384 bytes, 2.1B embedding/head/norms at 2 bytes
    assert 37e9 < src["download_bytes"] < 40e9 and "source: bitsandbytes nf4" in " ".join(out.stdout.split())
    assert src["decompose_peak_bytes"] > 0
