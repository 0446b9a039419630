"""Models and datasets by Hub id (``org/name``), offline: the commands run against a Hugging Face cache laid
out as ``snapshot_download`` / ``load_dataset`` leave it (``models--org--name/snapshots/<commit>`` + ``refs/main``,
``datasets--org--name/...``), built in a temp ``HF_HOME`` from the test fixtures, with ``HF_HUB_OFFLINE=1``.

The CLI runs in subprocesses: huggingface_hub and datasets read HF_HOME / HF_HUB_OFFLINE when imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qpissa.data import load_records
from qpissa.errors import UserError
from qpissa.hub import is_hub_id, resolve_model

CLI = [sys.executable, "-c", "from qpissa.cli import main; main()"]
COMMIT = {"acme/minilm": "1" * 40, "acme/smollm2": "2" * 40, "acme/gsm8k": "3" * 40}
README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train.jsonl
  - split: test
    path: main/test.jsonl
---
GSM8K rows from the qpissa test fixtures.
"""


def _snapshot(hub: Path, kind: str, repo: str) -> Path:
    """``<kind>s--org--name/snapshots/<commit>`` with ``refs/main`` pointing at it, as the Hub cache holds it."""
    root = hub / f"{kind}s--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT[repo])
    snap = root / "snapshots" / COMMIT[repo]
    snap.mkdir(parents=True)
    return snap


def _link_tree(src: Path, dest: Path) -> None:
    """Symlink every file of ``src`` into ``dest`` (the Hub cache links snapshot files to blobs the same way)."""
    for path in src.rglob("*"):
        if path.is_file():
            (dest / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dest / path.relative_to(src)).symlink_to(path.resolve())


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, minilm_dir: Path, smollm2_dir: Path, tiny_data: Path, gsm8k_dir: Path) -> Path:
    """An HF_HOME whose hub cache holds acme/minilm, acme/smollm2 and the dataset acme/gsm8k (subset main:
    train = the 8 short training rows, test = 4 test rows)."""
    home = tmp_path_factory.mktemp("hf_home")
    hub = home / "hub"
    _link_tree(minilm_dir, _snapshot(hub, "model", "acme/minilm"))
    _link_tree(smollm2_dir, _snapshot(hub, "model", "acme/smollm2"))
    data = _snapshot(hub, "dataset", "acme/gsm8k")
    (data / "main").mkdir()
    (data / "main" / "train.jsonl").write_text(tiny_data.read_text())
    test_rows = (gsm8k_dir / "test.jsonl").read_text().splitlines()[:4]
    (data / "main" / "test.jsonl").write_text("\n".join(test_rows) + "\n")
    (data / "README.md").write_text(README)
    return home


def _run(args: list[str], home: Path, cwd: Path, command: list[str] = CLI) -> subprocess.CompletedProcess:
    """``qpissa ARGS`` (or ``command``) against the cache in ``home``, offline, no other HF setting inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, env=env)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_hub_id_or_path(tmp_path, monkeypatch):
    """What counts as a Hub id, and a local path always wins (no Hub access at all)."""
    assert is_hub_id("openai/gsm8k") and is_hub_id("gpt2") and is_hub_id("HuggingFaceTB/SmolLM2-135M")
    for not_id in ("./model", "/abs/model", "runs/a/b", "data/train.jsonl", "~/x", "a//b", "bad id"):
        assert not is_hub_id(not_id), not_id
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "acme" / "gsm8k"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    assert resolve_model("acme/gsm8k") == Path("acme/gsm8k")
    with pytest.raises(UserError, match="--revision v1 applies to a Hub id"):
        resolve_model("acme/gsm8k", revision="v1")
    with pytest.raises(UserError, match="does not exist: no such local file or folder"):
        resolve_model("./missing")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i}", "answer": "#### 1"}) + "\n" for i in range(5)))
    assert [r["question"] for r in load_records(rows, limit=2)] == ["q0", "q1"]
    with pytest.raises(UserError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")


@pytest.mark.slow
def test_decompose_and_plan_by_hub_id(hf_home: Path, tmp_path: Path) -> None:
    """decompose org/name (calibrated on a Hub dataset subset) and plan org/name (config.json, pinned commit)."""
    out = tmp_path / "out"
    proc = _run(["decompose", "acme/minilm", "-o", str(out), "--rank", "4", "--quiet", "--no-loftq-baseline",
                 "--no-spectral-norms", "--targets", r"encoder\.layer\.0\.attention\.self\.(query|value)",
                 "--calib-data", "acme/gsm8k", "--calib-config", "main", "--calib-samples", "4",
                 "--calib-holdout", "2", "--calib-seq-len", "32"], hf_home, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"].endswith(f"models--acme--minilm/snapshots/{COMMIT['acme/minilm']}")
    assert manifest["arguments"]["calib_config"] == "main" and (out / "adapter" / "adapter_config.json").exists()
    plan_json = tmp_path / "plan.json"
    proc = _run(["plan", "acme/minilm", "--revision", COMMIT["acme/minilm"], "--rank", "8", "--seq-len", "128",
                 "--device", "cpu", "--no-decompose", "--json", str(plan_json)], hf_home, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(plan_json.read_text())["model_type"] == "bert"


@pytest.mark.slow
def test_train_and_eval_by_hub_id(hf_home: Path, tmp_path: Path) -> None:
    """train --method lora org/name --data org/name (train split; --eval-data: its test split), eval org/name with
    the run's adapter on a Hub dataset; the adapter names the Hub id as its base (portable, as PEFT records org/name),
    so RUN alone resolves to the cached snapshot."""
    run = tmp_path / "run"
    proc = _run(["train", "acme/smollm2", "--method", "lora", "--lora-rank", "2", "--data", "acme/gsm8k",
                 "--data-config", "main", "--data-limit", "4", "--eval-data", "acme/gsm8k", "--eval-examples", "2",
                 "--steps", "1", "--batch-size", "2", "--max-length", "128", "--no-progress", "-o", str(run)],
                hf_home, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "acme/smollm2"
    assert json.loads((run / "config.json").read_text())["data_limit"] == 4
    assert any("eval_loss" in json.loads(row) for row in (run / "metrics.jsonl").read_text().splitlines())
    ev = tmp_path / "ev"
    proc = _run(["eval", "acme/smollm2", "--adapter", str(run / "adapter"), "--task", "gsm8k", "--data", "acme/gsm8k",
                 "--data-config", "main", "--limit", "2", "--max-new-tokens", "2", "--batch-size", "2",
                 "--device", "cpu", "-o", str(ev)], hf_home, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((ev / "gsm8k_summary.json").read_text())
    assert summary["n"] == 2 and summary["model"].endswith(f"models--acme--smollm2/snapshots/{COMMIT['acme/smollm2']}")
    script = ("import json, sys; from qpissa.use.evaluate import resolve_model; "
              "print(json.dumps([str(p) for p in resolve_model(sys.argv[1])]))")
    proc = _run([], hf_home, tmp_path, [sys.executable, "-c", script, str(run)])  # RUN → its adapter on the Hub base
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, adapter = json.loads(proc.stdout)
    assert base == summary["model"] and adapter == str(run / "adapter")


@pytest.mark.slow
def test_unresolvable_ids_are_one_line(hf_home: Path, tmp_path: Path) -> None:
    """Neither a folder nor in reach: one line naming the local path and the Hub id tried, and the fixes."""
    line = _one_error_line(_run(["decompose", "acme/missing", "-o", str(tmp_path / "o")], hf_home, tmp_path))
    assert "acme/missing: no such local folder, and the Hub model acme/missing" in line
    assert "HF_HUB_OFFLINE" in line and "HF_TOKEN" in line and "spelling" in line
    line = _one_error_line(_run(["train", "acme/smollm2", "--method", "lora", "--data", "acme/no-data", "-o",
                                 str(tmp_path / "r")], hf_home, tmp_path))
    assert "Hub dataset acme/no-data" in line and "HF_HUB_OFFLINE" in line
    line = _one_error_line(_run(["train", "acme/smollm2", "--method", "lora", "--data", "acme/gsm8k",
                                 "--data-config", "main", "--data-split", "validation", "-o", str(tmp_path / "r")],
                                hf_home, tmp_path))
    assert "'validation'" in line and "--data-split" in line
