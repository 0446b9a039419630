"""benchmarks/gpu_check.py on a CPU machine: --help, and a failing stage is recorded while the next one runs."""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_help_runs_without_a_gpu():
    proc = subprocess.run([sys.executable, "-P", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" in proc.stdout and "--budget-s" in proc.stdout


def test_gpu_check_records_failures_and_keeps_going(tmp_path, monkeypatch):
    gc = _module()
    args = argparse.Namespace(dry_run=True, work=tmp_path, budget_s=60.0, steps=1)
    c = gc.Check(args)

    def boom(_c):
        raise RuntimeError("card on fire")

    def partial(_c):
        raise gc.StageFailed({"smollm2": {"seconds": 1.0}, "errors": ["synthetic: generator missing"]})

    def slow(_c):
        raise subprocess.TimeoutExpired(["python", "kernels.py"], 5)

    monkeypatch.setitem(gc.RUNNERS, "tests", boom)
    monkeypatch.setitem(gc.RUNNERS, "decompose", partial)
    monkeypatch.setitem(gc.RUNNERS, "train", slow)
    monkeypatch.setitem(gc.RUNNERS, "kernels", lambda _c: {"dequant": []})
    todo = list(gc.STAGES[:4])
    results = {name: gc.run_stage(c, name, todo[i:]) for i, name in enumerate(todo)}
    assert results["tests"]["status"] == "failed" and "card on fire" in results["tests"]["error"]
    assert results["decompose"]["status"] == "failed" and results["decompose"]["smollm2"] == {"seconds": 1.0}
    assert results["train"]["status"] == "timeout"
    assert results["kernels"]["status"] == "ok"
    c.start = time.monotonic() - 61  # the global budget is spent: later stages are skipped, not started
    assert gc.run_stage(c, "plan", ["plan"])["status"] == "skipped"


def test_synthetic_like_keeps_shapes_config_and_tokenizer(tmp_path):
    """write_synthetic_like: a real model's config + tokenizer files, synthetic weights that transformers loads."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    spec = importlib.util.spec_from_file_location("synthetic_under_test", ROOT / "benchmarks" / "synthetic_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    like = tmp_path / "like"
    like.mkdir()
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    (like / "config.json").write_text(json.dumps(cfg.to_dict()))
    (like / "tokenizer.json").write_text('{"stand-in": true}')
    out = mod.write_synthetic_like(tmp_path / "out", like)
    assert (out / "tokenizer.json").read_text() == '{"stand-in": true}'
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_config(cfg)
    assert {n: p.shape for n, p in model.state_dict().items()} == {n: p.shape for n, p in ref.state_dict().items()}
    w = model.model.layers[1].mlp.down_proj.weight  # (48, 96): decaying spectrum, not a flat one
    s = torch.linalg.svdvals(w)
    assert s[0] > 3 * s[len(s) // 2]
    from safetensors.torch import load_file

    first = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    again = load_file(mod.write_synthetic_like(out, like) / "model.safetensors")
    for name, t in first.items():  # seeded per tensor; BLAS rounding may flip a bf16 ulp between runs
        torch.testing.assert_close(again[name], t, rtol=1e-2, atol=1e-3)
