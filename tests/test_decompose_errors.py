"""Bad input: one clear line naming the file/tensor and what to do, exit code 2, input untouched."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qpissa.cli import main


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with random weights: fast, real transformers layout."""
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny") / "bert"
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=50, max_position_embeddings=16)
    cfg.architectures = ["BertModel"]
    BertModel(cfg).save_pretrained(d)
    return d


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["qpissa", "decompose", *args, "--quiet"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    return exc.value.code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_missing_model(monkeypatch, capsys, tmp_path):
    code, err = run_cli(monkeypatch, capsys, str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err, "nope", "does not exist")


def test_no_safetensors(monkeypatch, capsys, tiny_bert, tmp_path):
    m = copy_model(tiny_bert, tmp_path / "m")
    (m / "model.safetensors").unlink()
    code, err = run_cli(monkeypatch, capsys, str(m), "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err, "no *.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_safetensors(monkeypatch, capsys, tiny_bert, tmp_path, damage):
    m = copy_model(tiny_bert, tmp_path / "m")
    f = m / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    before = digest(m)
    code, err = run_cli(monkeypatch, capsys, str(m), "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err, "model.safetensors", "corrupt or truncated")
    assert digest(m) == before


@pytest.mark.parametrize("args,needles", [
    (["--rank", "32"], ["rank 32", "encoder.layer.0.attention.self.query.weight", "smaller --rank"]),
    (["--rank", "0"], ["--rank must be positive"]),
    (["--iters", "0"], ["--iters must be at least 1"]),
    (["--method", "dora"], ["unknown method 'dora'"]),
    (["--device", "cuda"], ["CUDA is not available"]),
    (["--targets", "no_such_layer"], ["no linear layer matches", "no_such_layer"]),
])
def test_bad_arguments(monkeypatch, capsys, tiny_bert, tmp_path, args, needles):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    before = digest(tiny_bert)
    code, err = run_cli(monkeypatch, capsys, str(tiny_bert), "-o", str(tmp_path / "o"), *args)
    assert_one_line_error(code, err, *needles)
    assert digest(tiny_bert) == before


def test_nan_in_a_target_weight(monkeypatch, capsys, tiny_bert, tmp_path):
    from safetensors import safe_open

    m = copy_model(tiny_bert, tmp_path / "m")
    with safe_open(str(m / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["encoder.layer.1.output.dense.weight"][3, 5] = float("nan")
    save_file(tensors, str(m / "model.safetensors"), metadata={"format": "pt"})
    code, err = run_cli(monkeypatch, capsys, str(m), "-o", str(tmp_path / "o"), "--rank", "4")
    assert_one_line_error(code, err, "encoder.layer.1.output.dense.weight", "NaN or Inf")


def test_output_inside_or_equal_to_model(monkeypatch, capsys, tiny_bert):
    before = digest(tiny_bert)
    for out in (tiny_bert, tiny_bert / "sub"):
        code, err = run_cli(monkeypatch, capsys, str(tiny_bert), "-o", str(out), "--rank", "4")
        assert_one_line_error(code, err, "inside")
    assert digest(tiny_bert) == before


def test_non_empty_output_and_resume_with_other_arguments(monkeypatch, capsys, tiny_bert, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(monkeypatch, capsys, str(tiny_bert), "-o", str(out), "--rank", "4")
    assert_one_line_error(code, err, "not empty", "--resume", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"

    out2 = tmp_path / "o2"
    assert run_cli(monkeypatch, capsys, str(tiny_bert), "-o", str(out2), "--rank", "4")[0] == 0
    code, err = run_cli(monkeypatch, capsys, str(tiny_bert), "-o", str(out2), "--rank", "2", "--resume")
    assert_one_line_error(code, err, "--resume with different arguments")
    # --overwrite replaces our outputs and leaves other files alone
    (out2 / "notes.txt").write_text("keep")
    assert run_cli(monkeypatch, capsys, str(tiny_bert), "-o", str(out2), "--rank", "2", "--overwrite")[0] == 0
    assert json.loads((out2 / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert (out2 / "notes.txt").read_text() == "keep"


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run(["qpissa", "decompose", str(tmp_path / "missing"), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")


def test_resume_into_a_foreign_folder_says_there_is_nothing_to_resume(monkeypatch, capsys, tiny_bert, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(monkeypatch, capsys, str(tiny_bert), "-o", str(out), "--rank", "4", "--resume")
    assert_one_line_error(code, err, "no manifest.json", "no interrupted run", "--overwrite")
    assert "pass --resume" not in err and (out / "keep.txt").read_text() == "mine"


def test_second_run_into_a_locked_folder_and_stale_lock(monkeypatch, capsys, tiny_bert, tmp_path):
    """A live lock holder stops a second run with one line; a dead one's lock (kill -9) is taken over."""
    import socket

    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "token": "x",
                                               "started": "now", "command": "qpissa decompose"}))
        code, err = run_cli(monkeypatch, capsys, str(tiny_bert), "-o", str(out), "--rank", "4", "--overwrite")
        assert_one_line_error(code, err, "in use by another qpissa decompose", f"pid {holder.pid}", ".lock")
        assert (out / ".lock").exists() and not (out / "residual").exists()
    finally:
        holder.kill()
        holder.wait()
    code, err = run_cli(monkeypatch, capsys, str(tiny_bert), "-o", str(out), "--rank", "4")  # stale now
    assert code == 0, err
    assert "stale lock" in err and not (out / ".lock").exists() and (out / "adapter" / "adapter_config.json").exists()


def test_bad_regex_among_good_targets_and_missing_target_weight(monkeypatch, capsys, tiny_bert, tmp_path):
    code, err = run_cli(monkeypatch, capsys, str(tiny_bert), "-o", str(tmp_path / "a"), "--rank", "4",
                        "--targets", "query", "--targets", "encoder.layer.(0")
    assert_one_line_error(code, err, "'encoder.layer.(0'", "not a valid regular expression")
    broken = copy_model(tiny_bert, tmp_path / "broken")
    from safetensors.torch import load_file
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["encoder.layer.1.attention.self.value.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    code, err = run_cli(monkeypatch, capsys, str(broken), "-o", str(tmp_path / "b"), "--rank", "4")
    assert_one_line_error(code, err, "encoder.layer.1.attention.self.value", "no tensor")


def test_side_folders_results_on_stdout_and_encoder_snippet(monkeypatch, capsys, tiny_bert, tmp_path):
    """OUT/residual gets the sentence-transformers folders modules.json names; table + load snippet on stdout,
    progress on stderr; the printed snippet (AutoModel for an encoder) runs."""
    model = copy_model(tiny_bert, tmp_path / "st")
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (model / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    out = tmp_path / "o"
    monkeypatch.setattr(sys, "argv", ["qpissa", "decompose", str(model), "-o", str(out), "--rank", "4"])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    assert exc.value.code in (0, None), captured.err
    assert (out / "residual" / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert (out / "residual" / "modules.json").exists() and not (out / "residual" / "2_Normalize").exists()
    assert "reduction" in captured.out and "reduction" not in captured.err  # the table: stdout only
    snippet = captured.out[captured.out.index("from transformers import"):]
    assert "AutoModel.from_pretrained" in snippet and "AutoModelForCausalLM" not in snippet
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the exact text we print
    assert type(scope["model"]).__name__ == "PeftModel"
    assert scope["model"].base_model.model.encoder.layer[0].attention.self.query.base_layer.weight.dtype == torch.uint8


KILLED_MID_WRITE = '''
import os, signal, sys
from qpissa.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a part")
    os.kill(os.getpid(), signal.SIGKILL)  # the finally clause never runs, as in a real kill -9
'''


def test_resume_removes_the_temp_file_a_killed_write_left(monkeypatch, capsys, tiny_bert, tmp_path):
    """A kill -9 inside an atomic write leaves ``.NAME.XXXX.tmp``; --resume deletes it (and keeps the rest)."""
    files = lambda root: {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                          if p.is_file() and p.name != "manifest.json" and "lock" not in p.name}
    cut = tmp_path / "o"
    assert run_cli(monkeypatch, capsys, str(tiny_bert), "-o", str(cut), "--rank", "4")[0] == 0
    full = files(cut)
    for name in ("adapter", "residual", "report.json"):  # as if killed before assembling
        p = cut / name
        __import__("shutil").rmtree(p) if p.is_dir() else p.unlink()
    manifest = json.loads((cut / "manifest.json").read_text())
    manifest["status"] = "running"
    (cut / "manifest.json").write_text(json.dumps(manifest))
    for dest in (cut / ".parts" / "00001.safetensors", cut / "report.md"):
        proc = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(dest)], cwd=tmp_path)
        assert proc.returncode == -9
    stale = sorted(p.name for p in cut.rglob(".*.tmp"))
    assert len(stale) == 2, stale
    assert run_cli(monkeypatch, capsys, str(tiny_bert), "-o", str(cut), "--rank", "4", "--resume")[0] == 0
    assert not list(cut.rglob("*.tmp"))
    a, b = full, files(cut)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
