"""``merge``: residual + adapter → one standalone checkpoint that plain transformers loads.

References are independent of qpissa: bitsandbytes' own dequantize/quantize on the loaded residual layers,
s·B·A from the adapter file by hand, and the PEFT model (residual + adapter) logits in fp32.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import lora_pairs
from qpissa.errors import UserError
from qpissa.use.merge import MergeConfig, merge

METHODS = ["pissa", "qpissa"]


def _layer_weight(layer) -> torch.Tensor:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    if isinstance(layer, bnb.nn.Linear4bit):
        return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.detach().float()


@pytest.fixture(scope="module")
def expected(smollm2_decomposed, load_fp32):
    """Per method: the PEFT model (residual + trained, fp32), and deq(R) + s·B·A per adapted module by hand."""
    out = {}
    for method in METHODS:
        run = smollm2_decomposed[method]
        peft_model = load_fp32(run["residual"], run["trained"])
        inner = peft_model.base_model.model
        weights = {m: _layer_weight(inner.get_submodule(m).base_layer) + 1.0 * b @ a  # s = α/r = 8/8
                   for m, (a, b) in lora_pairs(run["trained"]).items()}
        out[method] = (peft_model, weights)
    return out


IDS = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_merge_fp32_weights_and_logits(smollm2_decomposed, expected, tmp_path, method):
    from transformers import AutoModelForCausalLM

    run = smollm2_decomposed[method]
    report = merge(run["residual"], run["trained"], tmp_path / "m", MergeConfig(dtype="float32"))
    assert report["merged_modules"] == 5
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()  # plain HF
    peft_model, weights = expected[method]
    for module, w in weights.items():
        torch.testing.assert_close(model.get_submodule(module).weight.detach(), w, rtol=0, atol=1e-5)
    k = "model.layers.0.self_attn.k_proj"  # not adapted: copied (bf16 values, exactly representable in fp32)
    assert torch.equal(model.get_submodule(k).weight, peft_model.base_model.model.get_submodule(k).weight)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, peft_model(input_ids=IDS).logits, rtol=0, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_merge_requantized_nf4(smollm2_decomposed, expected, tmp_path, method):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    run = smollm2_decomposed[method]
    report = merge(run["residual"], run["trained"], tmp_path / "q",
                   MergeConfig(dtype="bfloat16", quantize="nf4", init_adapter=str(run["init"])))
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["load_in_4bit"] and qcfg["bnb_4bit_quant_type"] == "nf4"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))  # plain transformers, pre-quantized NF4
    _, weights = expected[method]
    rows = {r["module"]: r for r in report["modules"]}
    trained, init = lora_pairs(run["trained"]), lora_pairs(run["init"])
    for module, (a, b) in trained.items():  # what training changed: ‖s·(BA − B₀A₀)‖, s = 1
        a0, b0 = init[module]
        assert math.isclose(rows[module]["finetune_delta_fro"], float((b @ a - b0 @ a0).norm()), rel_tol=1e-4)
    err_sq = w_sq = 0.0
    for module, w in weights.items():
        layer = model.get_submodule(module)
        assert isinstance(layer, bnb.nn.Linear4bit), module
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")  # bnb on our fp32 merge
        want = bnbf.dequantize_4bit(packed, state)
        got = _layer_weight(layer)
        assert (got != want).float().mean() < 1e-3, module  # identical up to ties from the 1e-5 merge noise
        err = float((w - got).norm())
        assert math.isclose(rows[module]["requant_error_fro"], err, rel_tol=1e-3)
        err_sq, w_sq = err_sq + err ** 2, w_sq + float(w.norm()) ** 2
    assert math.isclose(report["requant_error_relative"], math.sqrt(err_sq / w_sq), rel_tol=1e-3)
    assert 0.01 < report["requant_error_relative"] < 0.2  # NF4's usual ~5-10% relative error per weight
    k = model.get_submodule("model.layers.0.self_attn.k_proj")  # not adapted: stays full precision
    assert type(k) is torch.nn.Linear
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()


@pytest.mark.slow
def test_cli_merge_default_bf16_and_refuses_existing(smollm2_decomposed, expected, tmp_path):
    run = smollm2_decomposed["qpissa"]
    cmd = [sys.executable, "-c", "from qpissa.cli import main; main()", "merge", str(run["residual"]),
           str(run["trained"]), "--output", str(tmp_path / "m")]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    for module, w in expected["qpissa"][1].items():
        got = merged[module + ".weight"]
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), w, rtol=2 ** -8, atol=1e-5)  # bf16 rounding of the fp32 merge
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 2 and "already holds a model" in again.stderr and "Traceback" not in again.stderr


def test_adapter_for_another_model_is_a_user_error(smollm2_decomposed, minilm_dir, tmp_path):
    run = smollm2_decomposed["pissa"]
    with pytest.raises(UserError, match="no unique weight|is ADAPTER for this RESIDUAL"):
        merge(minilm_dir, run["trained"], tmp_path / "x")


@pytest.mark.slow
def test_requantization_that_erases_the_finetuning_warns(smollm2_decomposed, tmp_path):
    """merge --quantize nf4 --init: a warning (stderr) exactly when ‖requant error‖ > ‖s·(BA − B₀A₀)‖; table on stdout."""
    run = smollm2_decomposed["qpissa"]
    cmd = [sys.executable, "-c", "from qpissa.cli import main; main()", "merge", str(run["residual"]), str(run["trained"]),
           "--output", str(tmp_path / "q"), "--quantize", "nf4", "--init", str(run["init"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "q" / "merge_report.json").read_text())
    ratio = report["requant_error_over_finetune_delta"]
    assert ratio > 1  # the fixture's 5% moves are smaller than NF4's rounding of the whole weight
    assert "merged model" in proc.stdout and "requant_error_over_finetune_delta" in proc.stdout
    assert "warning:" in proc.stderr and "erases the" in proc.stderr and "warning" not in proc.stdout
    # a large fine-tuning step (B moved by 3·B₀ on top) is not erased: no warning
    big = tmp_path / "big"
    big.mkdir()
    tensors = load_file(str(run["trained"] / "adapter_model.safetensors"))
    save_file({k: (v.float() * 4).to(v.dtype) if "lora_B" in k else v for k, v in tensors.items()},
              str(big / "adapter_model.safetensors"))
    shutil.copy(run["trained"] / "adapter_config.json", big / "adapter_config.json")
    quiet = merge(run["residual"], big, tmp_path / "q2", MergeConfig(quantize="nf4", init_adapter=str(run["init"])))
    assert quiet["requant_error_over_finetune_delta"] < 1 and "warning" not in quiet
