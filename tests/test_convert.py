"""PiSSA → LoRA conversion, checked against independent references on real SmolLM2 decompositions:
the factor layout, PEFT's own conversion, PEFT's delta weights and scaling on the ORIGINAL model,
logits, and the decomposition error that ``decompose`` reported.

What is exactly testable (fp32): W + s·B′A′ − (R + s·B·A) = W − R − s·B₀A₀ for every module, whatever
training did. For pissa the right side is only the bf16 rounding of the stored residual; for qpissa it is
the NF4 initialization error ‖W − deq(Q) − s·B₀A₀‖, the number decompose reports. So a converted QPiSSA
LoRA on the original W is *not* the trained QPiSSA model: it differs by exactly that error.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qpissa.adapters import module_scale
from qpissa.use.convert import ConvertConfig, convert_pissa_to_lora, converted_config
from helpers import lora_pairs
from qpissa.errors import UserError

METHODS = ["pissa", "qpissa"]


def _base_weight(model, module: str) -> torch.Tensor:
    """The weight a loaded (possibly NF4) layer multiplies with, in fp32, via bitsandbytes' own dequantizer."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    mod = model.get_submodule(module)
    if isinstance(mod, bnb.nn.Linear4bit):
        return bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
    return mod.weight.detach().float()


@pytest.fixture(scope="module")
def converted(smollm2_decomposed, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for method in METHODS:
        run = smollm2_decomposed[method]
        out[method] = root / method
        convert_pissa_to_lora(run["trained"], run["init"], out[method], ConvertConfig(dtype="float32"))
    return out


@pytest.mark.parametrize("method", METHODS)
def test_layout_and_config(smollm2_decomposed, converted, smollm2_dir, method):
    run = smollm2_decomposed[method]
    trained, init, conv = lora_pairs(run["trained"]), lora_pairs(run["init"]), lora_pairs(converted[method])
    assert set(conv) == set(trained) and len(conv) == 5
    for module, (a2, b2) in conv.items():
        (a, b), (a0, b0) = trained[module], init[module]
        assert a2.shape == (16, a.shape[1]) and b2.shape == (b.shape[0], 16)
        assert torch.equal(a2, torch.cat([a, a0])) and torch.equal(b2, torch.cat([b, -b0], dim=1))
    cfg = json.loads((converted[method] / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (16, 16.0, True)
    assert Path(cfg["base_model_name_or_path"]).resolve() == Path(smollm2_dir).resolve()  # the ORIGINAL model


def test_same_tensors_as_peft_conversion(smollm2_decomposed, load_fp32, tmp_path):
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=…) is the reference implementation."""
    run = smollm2_decomposed["pissa"]
    init_copy = tmp_path / "initial"  # PEFT rewrites the config in that folder: never hand it the original
    shutil.copytree(run["init"], init_copy)
    peft_model = load_fp32(run["residual"], run["trained"])
    peft_model.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(init_copy))
    ours = tmp_path / "ours"
    convert_pissa_to_lora(run["trained"], run["init"], ours)  # dtype "same": bf16 like the trained adapter
    theirs, mine = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(
        str(ours / "adapter_model.safetensors"))
    assert set(theirs) == set(mine)
    for key in theirs:
        assert torch.equal(theirs[key].to(mine[key].dtype), mine[key]), key
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_cfg = json.loads((ours / "adapter_config.json").read_text())
    assert (peft_cfg["r"], peft_cfg["lora_alpha"]) == (our_cfg["r"], our_cfg["lora_alpha"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_original_plus_lora_equals_residual_plus_trained(smollm2_decomposed, converted, smollm2_dir, load_fp32,
                                                         method):
    run = smollm2_decomposed[method]
    trained, init = lora_pairs(run["trained"]), lora_pairs(run["init"])
    s = 1.0  # decompose default: alpha = r = 8
    residual_model = load_fp32(run["residual"], run["trained"])  # the trained model, as training saw it
    original = load_fp32(smollm2_dir, converted[method])  # plain peft on the untouched original checkpoint
    report = {m["module"]: m for m in json.loads((run["out"] / "report.json").read_text())["modules"]}
    for module, (a, b) in trained.items():
        a0, b0 = init[module]
        w = original.base_model.model.get_submodule(module).base_layer.weight.detach().float()  # (m, n)
        r = _base_weight(residual_model.base_model.model, module + ".base_layer")  # R or deq(Q), (m, n)
        delta = original.base_model.model.get_submodule(module).get_delta_weight("default")  # PEFT: s'·B'A'
        torch.testing.assert_close(delta, s * (b @ a - b0 @ a0), rtol=1e-5, atol=1e-6)
        gap = (w + delta) - (r + s * b @ a)  # converted-on-original minus trained-on-residual
        init_error = w - r - s * b0 @ a0
        torch.testing.assert_close(gap, init_error, rtol=0, atol=1e-5)
        # …and that error is what decompose reported for this module (independent code path)
        assert math.isclose(float(init_error.norm()), report[module]["method"]["frobenius"], rel_tol=1e-3)
        if method == "pissa":  # only the bf16 rounding of the stored residual
            assert float(init_error.norm()) < 2e-3 * float(w.norm())

    # logits: the original model as the init represents it (W := R + s·B₀A₀ on the adapted modules) + the
    # converted LoRA gives the trained residual model's logits, in fp32.
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    base = original.base_model.model
    with torch.no_grad():
        for module in trained:
            a0, b0 = init[module]
            r = _base_weight(residual_model.base_model.model, module + ".base_layer")
            base.get_submodule(module).base_layer.weight.copy_(r + s * b0 @ a0)
        got, want = original(input_ids=ids).logits, residual_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


@pytest.mark.parametrize("rslora", [False, True])
def test_scale_kept_with_rslora_and_patterns(smollm2_decomposed, smollm2_dir, load_fp32, tmp_path, rslora):
    """α′ must keep s per module: ×2 (α/r) or ×√2 (α/√r), rank/alpha patterns included; PEFT's own scaling decides."""
    run = smollm2_decomposed["pissa"]
    variants = {}
    for name in ("trained", "init"):
        d = tmp_path / name
        shutil.copytree(run[name], d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(lora_alpha=16, use_rslora=rslora, rank_pattern={"v_proj": 8}, alpha_pattern={"down_proj": 4})
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        variants[name] = d
    convert_pissa_to_lora(variants["trained"], variants["init"], tmp_path / "lora", ConvertConfig(dtype="float32"))
    model = load_fp32(smollm2_dir, tmp_path / "lora")
    trained, init = lora_pairs(variants["trained"]), lora_pairs(variants["init"])
    for module, (a, b) in trained.items():
        alpha = 4 if module.endswith("down_proj") else 16
        s = alpha / math.sqrt(8) if rslora else alpha / 8  # the scale training used (r = 8)
        layer = model.base_model.model.get_submodule(module)
        assert math.isclose(layer.scaling["default"], s, rel_tol=1e-12), module
        a0, b0 = init[module]
        torch.testing.assert_close(layer.get_delta_weight("default"), s * (b @ a - b0 @ a0), rtol=1e-5, atol=1e-6)


def test_converted_config_pure():
    cfg = {"r": 8, "lora_alpha": 16, "use_rslora": True, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 2}}
    new = converted_config(cfg, "orig")
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        assert math.isclose(module_scale(new, module), module_scale(cfg, module), rel_tol=1e-12)
    assert module_scale(cfg, "x.q_proj") == 2 / 2.0 and new["rank_pattern"] == {"q_proj": 8}
    assert new["base_model_name_or_path"] == "orig" and new["init_lora_weights"] is True


def test_mismatched_init_and_overlapping_output_are_user_errors(smollm2_decomposed, tmp_path):
    run = smollm2_decomposed["pissa"]
    bad = tmp_path / "bad_init"
    shutil.copytree(run["init"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 16}))
    with pytest.raises(UserError, match="lora_alpha"):
        convert_pissa_to_lora(run["trained"], bad, tmp_path / "x")
    with pytest.raises(UserError, match="overlaps"):
        convert_pissa_to_lora(run["trained"], run["init"], run["trained"] / "sub")


@pytest.mark.slow
def test_cli_convert(smollm2_decomposed, tmp_path):
    run = smollm2_decomposed["qpissa"]
    cmd = [sys.executable, "-c", "from qpissa.cli import main; main()", "convert", str(run["trained"]), "--init", str(run["init"]),
           "--output", str(tmp_path / "lora")]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "converted adapter" in ok.stdout and "converted adapter" not in ok.stderr  # results on stdout
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 16
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)  # refuses to overwrite
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in again.stderr


def test_init_equal_to_the_trained_adapter_is_refused(smollm2_decomposed, tmp_path):
    run = smollm2_decomposed["qpissa"]
    with pytest.raises(UserError, match="is the trained adapter itself"):
        convert_pissa_to_lora(run["trained"], run["trained"], tmp_path / "a")
    twin = tmp_path / "twin"
    shutil.copytree(run["trained"], twin)  # another folder, identical tensors: the LoRA would be zero
    with pytest.raises(UserError, match="identical factors"):
        convert_pissa_to_lora(run["trained"], twin, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
