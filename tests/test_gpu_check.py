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
