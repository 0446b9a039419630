"""Block-wise calibration statistics, calibrated decompose (CLI), output-error report and --eval-kl.

References are independent: H from hooks on the whole model loaded by plain ``from_pretrained``;
KL from ``torch.nn.functional.kl_div``; the Done-when ordering from plain transformers + peft loads.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qpissa.decompose.calibration import BlockwiseCalibrator, accumulate_gram, load_calibration
from qpissa.errors import UserError
from qpissa.formats import scan_checkpoint
from qpissa.decompose.targets import find_targets

QPISSA = str(Path(sys.executable).with_name("qpissa"))
SMOL_TARGETS = [r"model\.layers\.[01]\.(self_attn\.(q|v|o)_proj|mlp\.down_proj)"]  # 8 modules, 2 blocks


def _reference_grams(model, modules, seqs) -> dict[str, torch.Tensor]:
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name in modules:
        def hook(_m, inputs, name=name):
            grams[name] = accumulate_gram(grams.get(name), inputs[0])
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in seqs:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    return grams


@pytest.mark.parametrize("which", ["smollm2", "minilm"])
@pytest.mark.slow
def test_blockwise_h_equals_whole_model_hooks(which, request, gsm8k_dir):
    """H of every target of blocks 0 and 2, collected block by block, equals hooks on the whole model; inputs
    shared by q/k/v (and gate/up) give one H object; the held-out split has its own H."""
    if which == "smollm2":
        from transformers import AutoModelForCausalLM as Auto
        model_dir, pattern, template = request.getfixturevalue("smollm2_dir"), [r"model\.layers\.[02]\..*"], "gsm8k"
        shared = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")]
    else:
        from transformers import AutoModel as Auto
        model_dir, pattern, template = request.getfixturevalue("minilm_dir"), [r"encoder\.layer\.[02]\..*"], "{question}"
        shared = [("attention.self.query", "attention.self.key", "attention.self.value")]
    tensors = scan_checkpoint(model_dir)
    targets = find_targets(model_dir, tensors, pattern)[0]
    data = load_calibration(model_dir, gsm8k_dir / "train.jsonl", samples=3, held_out=2, seq_len=48, template=template)
    cal = BlockwiseCalibrator(model_dir, tensors, targets, data)
    got = {t.module: cal.stats(t.module) for t in targets}
    model = Auto.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ref = _reference_grams(model, [t.module for t in targets], data.calib)
    ref_eval = _reference_grams(model, [t.module for t in targets], data.held_out)
    for name, (h, h_eval) in got.items():
        assert h.dtype == torch.float64
        torch.testing.assert_close(h, ref[name], rtol=1e-6, atol=1e-6 * float(ref[name].abs().max()))
        torch.testing.assert_close(h_eval, ref_eval[name], rtol=1e-6, atol=1e-6 * float(ref_eval[name].abs().max()))
    prefix = targets[0].module.rsplit(".", 2)[0] if which == "minilm" else "model.layers.0"
    block = "encoder.layer.0" if which == "minilm" else prefix
    for group in shared:
        objs = {id(got[f"{block}.{m}"][0]) for m in group}
        assert len(objs) == 1, group
    assert len({id(h) for h, _ in got.values()}) < len(got)


def test_gram_stays_on_the_input_device():
    """accumulate_gram creates H on x's device in fp64 (FakeTensorMode: cuda tensors without a GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 5, 8, device="cuda", dtype=torch.bfloat16)
        h = accumulate_gram(None, x)
        h = accumulate_gram(h, x)
        assert h.device.type == "cuda" and h.dtype == torch.float64 and tuple(h.shape) == (8, 8)


def test_token_kl_matches_torch():
    from qpissa.decompose.fidelity import token_kl

    gen = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    ref = torch.nn.functional.kl_div(torch.log_softmax(q, -1), torch.log_softmax(p, -1), log_target=True,
                                     reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(p, q), ref)


def test_calibration_user_errors(smollm2_dir, gsm8k_dir, tmp_path):
    from qpissa.decompose import decompose

    with pytest.raises(UserError, match="--calib-data"):
        decompose(smollm2_dir, tmp_path / "a", method="cloq", targets=SMOL_TARGETS, progress=False)
    with pytest.raises(UserError, match="--calib-holdout"):
        decompose(smollm2_dir, tmp_path / "b", calib_data=str(gsm8k_dir / "train.jsonl"), eval_kl=8, calib_holdout=4,
                  targets=SMOL_TARGETS, progress=False)
    short = tmp_path / "short.txt"
    short.write_text("one line\n")
    with pytest.raises(UserError, match="short.txt has 1 examples"):
        load_calibration(smollm2_dir, short, samples=2, held_out=1, seq_len=16)


def _run(args: list[str]) -> None:
    proc = subprocess.run([QPISSA, "decompose", *args], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_done_when_calibrated_qpissa_kl_below_plain_below_qlora(smollm2_dir, gsm8k_dir, tmp_path):
    """`qpissa decompose SMOLLM2 --method qpissa --iters 5 --calib-data train.jsonl` starts closer to the original
    (mean token KL on held-out GSM8K, plain transformers + peft) than plain QPiSSA(5), which beats QLoRA;
    the report carries held-out output errors for the method and the QLoRA/LoftQ/QPiSSA baselines."""
    from qpissa.decompose.fidelity import model_fidelity

    data = gsm8k_dir / "train.jsonl"
    common = [str(smollm2_dir), "--rank", "8", "--svd", "randomized", "--quiet", "--device", "cpu",
              "--no-spectral-norms", *[a for t in SMOL_TARGETS for a in ("--targets", t)]]
    calib = ["--calib-data", str(data), "--calib-samples", "16", "--calib-holdout", "8", "--calib-seq-len", "64"]
    _run([*common, "-o", str(tmp_path / "cal"), "--method", "qpissa", "--iters", "5", *calib, "--eval-kl", "8"])
    _run([*common, "-o", str(tmp_path / "plain"), "--method", "qpissa", "--iters", "5", "--no-loftq-baseline"])
    _run([*common, "-o", str(tmp_path / "qlora"), "--method", "qlora", "--no-loftq-baseline"])
    report = json.loads((tmp_path / "cal" / "report.json").read_text())
    held = load_calibration(smollm2_dir, data, samples=16, held_out=8, seq_len=64).held_out
    kl = {name: model_fidelity(smollm2_dir, tmp_path / name, held)["kl"] for name in ("cal", "plain", "qlora")}
    assert report["model_fidelity"]["kl"] == pytest.approx(kl["cal"], rel=1e-4)
    assert kl["cal"] < kl["plain"] < kl["qlora"], kl
    out = report["overall"]["output"]
    assert out["method"] < out["qpissa"] < out["qlora"] and out["method"] < out["loftq"], out
    assert all(m["output_split"] == "held_out" for m in report["modules"])
    assert "Output error" in (tmp_path / "cal" / "report.md").read_text()
    assert "output_qpissa" in (tmp_path / "cal" / "report.csv").read_text().splitlines()[0]


def test_calibrated_resume_reproduces_the_run(smollm2_dir, gsm8k_dir, tmp_path):
    """A run missing its last part (killed) resumes with the same H (block walk restarted lazily) and writes
    the same adapter bytes."""
    from qpissa.decompose import decompose

    kw = dict(method="cloq", rank=4, targets=[r"model\.layers\.[01]\.self_attn\.(q|o)_proj"], svd="randomized",
              calib_data=str(gsm8k_dir / "train.jsonl"), calib_samples=4, calib_holdout=2, calib_seq_len=32,
              loftq_baseline=False, spectral_norms=False, progress=False)
    first = decompose(smollm2_dir, tmp_path / "out", **kw)
    adapter = (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    last = max(manifest["tensors"].values(), key=lambda e: e["part"])
    (tmp_path / "out" / ".parts" / last["part"]).unlink()
    manifest["status"] = "running"
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "out" / "adapter" / "adapter_model.safetensors").unlink()
    second = decompose(smollm2_dir, tmp_path / "out", resume=True, **kw)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert second["overall"]["output"] == pytest.approx(first["overall"]["output"])
