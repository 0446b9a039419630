"""The right Auto class for each output, and one clear line (pointing at --task classification) when train/eval
get an encoder without it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qpissa.errors import UserError
from qpissa.usage import is_causal_lm, load_snippet, require_causal_lm

CLI = [sys.executable, "-c", "from qpissa.cli import main; main()"]


@pytest.fixture(scope="module")
def minilm_out(minilm_dir: Path, tmp_path_factory) -> Path:
    """The default model's decompose output (one module: fast)."""
    from qpissa.decompose import decompose

    out = tmp_path_factory.mktemp("minilm") / "out"
    decompose(minilm_dir, out, rank=4, targets=[r"encoder\.layer\.0\.attention\.self\.query"], svd="randomized",
              loftq_baseline=False, progress=False)
    return out


def test_kinds(minilm_dir: Path, smollm2_dir: Path) -> None:
    assert is_causal_lm(smollm2_dir) and not is_causal_lm(minilm_dir)
    require_causal_lm(smollm2_dir, "train")
    with pytest.raises(UserError, match=r"BertModel \(bert\) has no causal language-model head.*AutoModel"):
        require_causal_lm(minilm_dir, "eval")


def test_causal_snippet_runs(smollm2_decomposed) -> None:
    out = smollm2_decomposed["qpissa"]["out"]
    snippet = load_snippet(out)
    assert "AutoModelForCausalLM.from_pretrained" in snippet and "# 4-bit NF4" in snippet
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the text decompose prints
    assert type(scope["model"].base_model.model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("command", ["train", "eval"])
def test_train_and_eval_on_an_encoder_are_one_line(minilm_out: Path, command: str, tmp_path: Path) -> None:
    data = Path(__file__).parent / "fixtures" / "gsm8k" / "train.jsonl"
    args = {"train": ["--data", str(data), "-o", str(tmp_path / "run"), "--steps", "1"],
            "eval": ["--task", "perplexity", "--data", str(data), "-o", str(tmp_path / "ev"), "--limit", "1"]}[command]
    proc = subprocess.run([*CLI, command, str(minilm_out), *args], capture_output=True, text=True, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and "BertModel (bert)" in lines[0] and "AutoModel" in lines[0]
    assert f"qpissa {command}" in lines[0] and "qpissa example smollm2" in lines[0]
    assert "--task classification" in lines[0]  # what an encoder is fine-tuned with


def test_train_help_lists_the_allowed_values(tmp_path: Path) -> None:
    import os

    proc = subprocess.run([*CLI, "train", "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    for values in ("cosine, linear, constant", "adamw, adamw8bit, paged_adamw8bit", "auto, cpu, cuda", "bf16, fp32"):
        assert f"(one of: {values})" in text, values
    bad = subprocess.run([*CLI, "train", "x", "--data", "d.jsonl", "-o", "r", "--schedule", "cos"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --schedule 'cos': choose one of cosine, linear, constant"
