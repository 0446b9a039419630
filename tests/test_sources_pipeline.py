"""Quantized sources through the pipeline: decompose (report, manifest, residual), plan, merge, train.

Fast: decompose on tiny FP8 / GPTQ act-order sources and plan's download size. Slow: every format
decompose → train → merge → plain load (the bf16 numbers are checked against an independent computation).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import source_models as sm
from helpers import tree_digest
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
    before = tree_digest(tmp_path / "out")  # --resume after losing parts and outputs: byte-identical
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for entry in list(manifest["tensors"].values())[::3]:
        (tmp_path / "out" / ".parts" / entry["part"]).unlink()
    manifest["status"] = "running"
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(tmp_path / "out" / "residual")
    shutil.rmtree(tmp_path / "out" / "adapter")
    decompose(src, tmp_path / "out", rank=4, resume=True, progress=False)
    assert tree_digest(tmp_path / "out") == before


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
    from typer.testing import CliRunner

    from qpissa.cli.entry import app

    config = json.loads((Path(__file__).parent / "fixtures" / "configs" / "llama-3-70b.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = CliRunner().invoke(app, ["plan", str(tmp_path / "config.json"), "--json", str(tmp_path / "p.json")],
                             env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    src = json.loads((tmp_path / "p.json").read_text())["source"]
    # 68.5B weights in the blocks' linears at 0.5 + 1/64 + 4/16384 bytes, 2.1B embedding/head/norms at 2 bytes
    assert 37e9 < src["download_bytes"] < 40e9 and "source: bitsandbytes nf4" in " ".join(out.output.split())
    assert src["decompose_peak_bytes"] > 0


def test_mxfp4_gpt_oss_matches_transformers_dequantize_loader(tmp_path):
    """Every tensor of an MXFP4 gpt-oss reads as transformers' ``Mxfp4Config(dequantize=True)`` loads it."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    src = sm.to_mxfp4(sm.gpt_oss(tmp_path / "bf16"), tmp_path / "mxfp4")
    ref = AutoModelForCausalLM.from_pretrained(src, quantization_config=Mxfp4Config(dequantize=True),
                                               device_map="cpu").state_dict()
    ours = {t.name: load_tensor(t) for t in scan_source(src)}
    assert set(ours) == set(ref)
    for name, w in ours.items():
        assert torch.equal(w.to(ref[name].dtype), ref[name]), name
    up = "model.layers.1.mlp.experts.gate_up_proj"
    assert ours[up].shape == (4, 64, 192) and open_source(src).format.quantized == 4
    from qpissa.sources.load import load_decoded  # train --method lora|full's model: the same, key for key

    decoded = load_decoded(src).state_dict()
    assert set(decoded) == set(ref) and all(torch.equal(decoded[k], ref[k]) for k in ref)


@pytest.mark.slow
def test_gpt_oss_mxfp4_decompose_train_merge_plain_load(smollm2_dir, tiny_data, tmp_path):
    """MXFP4 gpt-oss → decompose (experts NF4 in the residual) → train → merge → plain from_pretrained, whose
    logits equal the trained model's (residual + RUN/adapter as qpissa.moe.load builds it)."""
    from transformers import AutoModelForCausalLM

    from qpissa.decompose import decompose
    from qpissa.moe import CONFIG_KEY, load
    from qpissa.train import train
    from qpissa.use.merge import MergeConfig, merge

    src = sm.to_mxfp4(sm.gpt_oss(tmp_path / "bf16", tokenizer=smollm2_dir), tmp_path / "mxfp4")
    out, run = tmp_path / "out", tmp_path / "run"
    report = decompose(src, out, rank=4, progress=False)
    assert report["source"]["format"] == "mxfp4" and report["experts"]["residual"] == "nf4"
    config = json.loads((out / "residual" / "config.json").read_text())
    assert CONFIG_KEY in config and config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert (out / "residual" / config[CONFIG_KEY]["file"]).is_file()  # the experts, NF4
    assert not any(k.endswith(("_blocks", "_scales")) for k in _residual(out))  # no MXFP4 left
    train(_train_cfg(out, tiny_data, run))
    merge(out / "residual", run / "adapter", tmp_path / "merged", MergeConfig(dtype="float32"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert "quantization_config" not in merged.config.to_dict()
    trained = load(out, adapter=run / "adapter", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 7, 9, 11, 3, 40, 2]])
    with torch.no_grad():
        a, b = merged(ids).logits, trained(ids).logits.float()
    assert torch.allclose(a, b, atol=2e-2 * float(b.abs().max())), float((a - b).abs().max())


def _train_cfg(out: Path, data: Path, run: Path, **kw):
    from qpissa.data import DataConfig
    from qpissa.train import TrainConfig

    base = dict(model=str(out), data=str(data), output=str(run), steps=2, batch_size=2, lr=1e-3, warmup_ratio=0.0,
                seed=0, progress=False, data_cfg=DataConfig(max_length=96, skip_long_prompts=True))
    return TrainConfig(**(base | kw))


FORMATS = {"fp8": lambda p, d: sm.to_fp8(p, d, (32, 32)),
           "bnb-fp4-double-quant": lambda p, d: sm.to_bnb(p, d, load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                                              bnb_4bit_use_double_quant=True),
           "bnb-int8": lambda p, d: sm.to_bnb(p, d, load_in_8bit=True),
           "gptq": lambda p, d: sm.to_gptq_awq(p, d, "gptq", act_order=True)[0],
           "awq": lambda p, d: sm.to_gptq_awq(p, d, "awq")[0],
           "compressed-w4a16": lambda p, d: sm.to_compressed(p, d, "w4a16"),
           "compressed-fp8": lambda p, d: sm.to_compressed(p, d, "fp8")}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_decompose_train_merge(fmt, smollm2_dir, tiny_data, tmp_path):
    """decompose → train (QPiSSA) → merge → plain load, and train --method lora on the source itself → merge
    onto the source (merge reads it through the decoder): its merged weights = dequantized source + s·B·A."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qpissa.decompose import decompose
    from qpissa.train import train
    from qpissa.use.merge import MergeConfig, merge

    plain = sm.tiny_llama(tmp_path / "plain", tokenizer=smollm2_dir)
    src = FORMATS[fmt](plain, tmp_path / "src")
    decompose(src, tmp_path / "out", rank=4, progress=False)
    train(_train_cfg(tmp_path / "out", tiny_data, tmp_path / "run"))
    merge(tmp_path / "out" / "residual", tmp_path / "run" / "adapter", tmp_path / "merged", MergeConfig())
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain bf16 checkpoint

    train(_train_cfg(src, tiny_data, tmp_path / "lora", method="lora", lora_rank=4))
    merge(src, tmp_path / "lora" / "adapter", tmp_path / "lora_merged", MergeConfig(dtype="float32"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora_merged", dtype=torch.float32)
    from qpissa.sources.load import load_decoded

    base = PeftModel.from_pretrained(load_decoded(src, torch.float32), str(tmp_path / "lora" / "adapter"))
    ids = torch.tensor([[1, 5, 7, 9, 11, 3, 40, 2]])
    with torch.no_grad():
        a, b = merged(ids).logits, base(ids).logits
    assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max())), float((a - b).abs().max())


@pytest.mark.slow
def test_calibrated_decompose_and_eval_kl_on_fp8_source(smollm2_dir, gsm8k_dir, tmp_path):
    """Calibration streams the decoded blocks, and --eval-kl loads the FP8 original through the decoder (transformers
    would need a GPU for it): KL of the decomposed model against the dequantized original is small."""
    from qpissa.decompose import decompose

    src = sm.to_fp8(sm.tiny_llama(tmp_path / "plain", tokenizer=smollm2_dir), tmp_path / "fp8", (32, 32))
    report = decompose(src, tmp_path / "out", method="cloq", rank=4, calib_data=str(gsm8k_dir / "train.jsonl"),
                       calib_samples=4, calib_holdout=2, calib_seq_len=32, eval_kl=2, loftq_baseline=False,
                       progress=False)
    assert report["source"]["format"] == "fp8" and report["overall"]["output"]["method"] > 0
    assert 0 <= report["model_fidelity"]["kl"] < 0.1, report["model_fidelity"]
