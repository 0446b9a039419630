"""``--task classification``: an encoder (all-MiniLM-L6-v2, the default model) fine-tuned with a new head on its
4-bit decompose output; the head restored by plain transformers + peft; eval scores against scikit-learn/scipy;
GLUE by Hub id (offline, a hub-layout fixture); bad rows are one line naming file, row and field.

Data: ``tests/fixtures/gsm8k-pairs`` (a constructed task from the GSM8K fixture, not GLUE; see its SOURCE.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qpissa.classify import Labels, infer_labels
from qpissa.classify_metrics import classification_scores, regression_scores, task_metrics
from qpissa.errors import UserError

PAIRS = Path(__file__).parent / "fixtures" / "gsm8k-pairs"
CLI = [sys.executable, "-c", "from qpissa.cli import main; main()"]
FIELDS = ["--text-field", "question", "--text-pair-field", "step"]
QUIET = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}  # datasets' "Generating train split" bar on a new file


@pytest.fixture(scope="module")
def minilm_out(minilm_dir: Path, tmp_path_factory) -> Path:
    """The default model decomposed (QPiSSA, r=4, the q/v projections of two layers: fast)."""
    from qpissa.decompose import decompose

    out = tmp_path_factory.mktemp("minilm") / "out"
    decompose(minilm_dir, out, rank=4, targets=[r"encoder\.layer\.[01]\.attention\.self\.(query|value)"],
              svd="randomized", loftq_baseline=False, progress=False)
    return out


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def test_metrics_equal_scikit_learn_and_scipy() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        gold = rng.integers(0, k, 200)
        pred = np.where(rng.random(200) < 0.6, gold, rng.integers(0, k, 200))
        got = classification_scores(pred.tolist(), gold.tolist(), k)
        assert got["accuracy"] == pytest.approx(sk.accuracy_score(gold, pred))
        assert got["macro_f1"] == pytest.approx(sk.f1_score(gold, pred, average="macro", labels=list(range(k))))
        assert got["matthews"] == pytest.approx(sk.matthews_corrcoef(gold, pred))
        if k == 2:
            assert got["f1"] == pytest.approx(sk.f1_score(gold, pred))
    assert classification_scores([0, 0, 0], [0, 1, 1], 2)["matthews"] == 0.0  # constant prediction
    gold = rng.integers(0, 6, 100).astype(float)  # ties, as STS-B's 0..5 scores have
    pred = gold + rng.normal(0, 1.5, 100).round()
    got = regression_scores(pred.tolist(), gold.tolist())
    assert got["pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0])
    assert got["spearman"] == pytest.approx(stats.spearmanr(pred, gold)[0])
    assert got["mse"] == pytest.approx(float(((pred - gold) ** 2).mean()))


def test_glue_metric_names_and_label_maps() -> None:
    assert task_metrics("cola", False) == ("matthews",) and task_metrics("stsb", True) == ("pearson", "spearman")
    assert task_metrics("mrpc", False)[0] == "f1" and task_metrics(None, False) == ("accuracy",)
    labels = infer_labels([{"label": "pos"}, {"label": "neg"}, {"label": "pos"}], "label", None, "d.jsonl")
    assert labels.id2label == {0: "neg", 1: "pos"} and labels.from_strings and labels.label2id["pos"] == 1
    assert infer_labels([{"label": 0}, {"label": 2}], "label", None, "d").num_labels == 3
    assert infer_labels([{"y": 0.5}, {"y": 3}], "y", 1, "d") == Labels(1)


def test_gsm8k_pairs_fixture_is_what_the_builder_makes(gsm8k_dir: Path) -> None:
    from qpissa.gsm8k_pairs import build_pairs, final_answer

    for split in ("train", "test"):
        rows = [json.loads(x) for x in (gsm8k_dir / f"{split}.jsonl").read_text().splitlines()]
        built = build_pairs(rows)
        assert built == [json.loads(x) for x in (PAIRS / f"{split}.jsonl").read_text().splitlines()]
        assert [p["label"] for p in built] == [1, 0] * len(rows)  # balanced: one positive, one negative each
        for p in built[1::2]:  # a negative's step comes from a question with another final answer
            i = built.index(p) // 2
            assert p["source"] != i and final_answer(rows[p["source"]]["answer"]) != final_answer(rows[i]["answer"])


def test_head_and_adapter_restore_in_plain_transformers_and_peft(minilm_out: Path, tmp_path: Path) -> None:
    """Train 3 steps; ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(OUT/residual,
    num_labels=2), RUN/adapter)`` gives the trained model's logits; the head and the adapter both changed."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from qpissa.classify import collate, encode, infer_labels
    from qpissa.data import DataConfig, load_records
    from qpissa.train.loop import fit
    from qpissa.train.task import ClassificationTask
    from qpissa.train.classifier_model import load_classifier
    from qpissa.train.config import TrainConfig

    run = tmp_path / "run"
    cfg = TrainConfig(model=str(minilm_out), data=str(PAIRS / "train.jsonl"), output=str(run), task="classification",
                      text_field="question", text_pair_field="step", steps=3, batch_size=8, lr=1e-3,
                      data_cfg=DataConfig(max_length=64), device="cpu", progress=False)
    records = load_records(cfg.data, limit=24)
    labels = infer_labels(records, "label", None, cfg.data)
    torch.manual_seed(0)
    model, tok = load_classifier(cfg, labels)
    head0 = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    rows = encode(records, tok, "question", "step", "label", labels, 64, cfg.data)
    summary = fit(cfg, model, tok, [], [], task=ClassificationTask(rows, [], tok, labels, cfg.batch_size))
    assert summary["steps"] == 3 and (run / "adapter" / "adapter_model.safetensors").exists()
    batch = collate(rows[:8], tok, regression=False)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits  # (8, 2)

    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert "classifier" in saved["modules_to_save"] and saved["task_type"] == "SEQ_CLS"
    plain = AutoModelForSequenceClassification.from_pretrained(minilm_out / "residual", num_labels=2)
    plain = PeftModel.from_pretrained(plain, run / "adapter")
    plain.eval()
    with torch.no_grad():
        restored = plain(**batch).logits
    # bitsandbytes computes a Linear4bit in eval mode with another CPU kernel (qpissa.quant.keep_4bit_layout_trainable
    # keeps the training one): the same weights agree to ~3e-5, while 3 steps moved the logits by far more
    torch.testing.assert_close(restored, trained, rtol=1e-3, atol=1e-4)
    fresh = AutoModelForSequenceClassification.from_pretrained(minilm_out / "residual", num_labels=2).eval()
    with torch.no_grad():
        fresh = fresh(**batch).logits  # a new random head, no adapter
    assert (fresh - trained).abs().max() > 30 * (restored - trained).abs().max()  # without RUN/adapter: another head
    head = plain.base_model.model.classifier.modules_to_save["default"].weight
    assert not torch.equal(head, head0)  # the head was trained and saved
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    init = load_file(str(minilm_out / "adapter" / "adapter_model.safetensors"))
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"
    got = tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"]
    assert got.shape == init[key].shape and not torch.equal(got, init[key].to(got.dtype))


@pytest.mark.slow
def test_train_eval_cli_and_run_config_round_trip(minilm_out: Path, tmp_path: Path) -> None:
    """train → eval on the CLI: the summary's scores equal scikit-learn's on its own predictions; RUN/config.json
    and RUN/config.yaml both repeat the run."""
    sk = pytest.importorskip("sklearn.metrics")
    run, ev = tmp_path / "run", tmp_path / "ev"
    common = ["--steps", "2", "--batch-size", "8", "--max-length", "64", "--device", "cpu", "--no-progress"]
    proc = _cli("train", minilm_out, "--task", "classification", "--data", PAIRS / "train.jsonl", "--data-limit", "16",
                *FIELDS, *common, "-o", run, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _cli("eval", run, "--task", "classification", "--data", PAIRS / "test.jsonl", "--limit", "24", "-o", ev,
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((ev / "classification_summary.json").read_text())
    rows = [json.loads(x) for x in (ev / "classification_examples.jsonl").read_text().splitlines()]
    gold = [int(r["label"]) for r in rows]
    pred = [int(np.argmax(r["logits"])) for r in rows]
    assert [int(r["prediction"]) for r in rows] == pred and len(rows) == summary["examples"] == 24
    test = [json.loads(x) for x in (PAIRS / "test.jsonl").read_text().splitlines()][:24]
    assert gold == [r["label"] for r in test]
    assert summary["metric"] == "accuracy" and summary["value"] == pytest.approx(sk.accuracy_score(gold, pred))
    assert summary["macro_f1"] == pytest.approx(sk.f1_score(gold, pred, average="macro", labels=[0, 1]))
    assert summary["matthews"] == pytest.approx(sk.matthews_corrcoef(gold, pred))
    for source in ("config.json", "config.yaml"):
        again = tmp_path / f"again-{source}"
        proc = _cli("train", "--config", run / source, "-o", again, cwd=tmp_path)
        assert proc.returncode == 0, (source, proc.stderr[-3000:])
        assert [r["loss"] for r in map(json.loads, (again / "metrics.jsonl").read_text().splitlines())] == \
            pytest.approx([r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())])


@pytest.mark.slow
def test_checkpoint_resume_reproduces_the_losses(minilm_out: Path, tmp_path: Path) -> None:
    """The shared loop gives classification checkpoints: stopped after step 2 and resumed, the run logs the same
    losses and held-out accuracy as an uninterrupted one and ends with the same head; rerunning into a finished
    run without --resume is one line."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from qpissa.data import DataConfig
    from qpissa.train import TrainConfig, train

    cfg = TrainConfig(model=str(minilm_out), data=str(PAIRS / "train.jsonl"), output="", data_limit=32,
                      eval_data=str(PAIRS / "test.jsonl"), eval_examples=16, eval_every=2, task="classification",
                      text_field="question", text_pair_field="step", steps=4, batch_size=4, grad_accum=2, lr=1e-3,
                      save_every=2, data_cfg=DataConfig(max_length=64), device="cpu", progress=False)
    full = train(replace(cfg, output=str(tmp_path / "full")))
    cut = replace(cfg, output=str(tmp_path / "cut"), stop_after=2)
    train(cut)
    resumed = train(replace(cut, stop_after=None, resume=True))
    rows = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = rows("full"), rows("cut")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-6)
    assert [r.get("eval_accuracy") for r in b] == [r.get("eval_accuracy") for r in a]
    assert resumed["eval_accuracy"] == full["eval_accuracy"] and resumed["task"] == "classification"
    heads = [load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("full", "cut")]
    key = next(k for k in heads[0] if "classifier" in k and k.endswith("weight"))
    torch.testing.assert_close(heads[1][key], heads[0][key], rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="already holds checkpoint-4; pass --resume"):
        train(replace(cfg, output=str(tmp_path / "full")))


@pytest.mark.parametrize("rows, extra, needle", [
    ([{"question": "a", "step": "b", "y": 1}], [], ["row 0", "'label'", "no such label column"]),
    ([{"question": "a", "step": "b", "label": 0}, {"question": "c", "step": "d", "label": 3}], ["--num-labels", "2"],
     ["row 1", "'label'", "--num-labels 2"]),
    ([{"question": "a", "step": "b", "label": "x"}, {"question": "c", "step": "d", "label": "y"}],
     ["--num-labels", "3"], ["'label'", "--num-labels 3", "2 label names"]),
    ([{"question": "a", "step": "b", "label": 0}, {"question": "c", "step": " ", "label": 1}], [],
     ["row 1", "'step'", "empty"]),
    ([{"question": "a", "step": "b", "label": "high"}], ["--num-labels", "1"], ["row 0", "'label'", "not a number"]),
    ([{"question": "a", "step": "b", "label": -1}, {"question": "c", "step": "d", "label": 1}], [],
     ["row 0", "'label'", "negative"]),
])
def test_bad_rows_are_one_line_naming_file_row_and_field(minilm_out: Path, tmp_path: Path, rows, extra, needle) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _cli("train", minilm_out, "--task", "classification", "--data", data, *FIELDS, *extra, "--steps", "1",
                "--device", "cpu", "-o", tmp_path / "run", cwd=tmp_path, env={**os.environ, **QUIET})
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr  # refused before any weights are read
    assert "bad.jsonl" in lines[0] and all(n in lines[0] for n in needle), lines[0]
    assert not (tmp_path / "run").exists()  # nothing written


def test_eval_rejects_labels_the_head_cannot_take(minilm_out: Path, tmp_path: Path) -> None:
    from qpissa.classify import label_id

    labels = Labels(2, {0: "0", 1: "1"})
    with pytest.raises(UserError, match=r"x\.jsonl row 3 field 'label': label 2 is outside 0\.\.1"):
        label_id(2, labels, "x.jsonl row 3 field 'label'")
    named = Labels(2, {0: "neg", 1: "pos"}, from_strings=True)
    with pytest.raises(UserError, match="'meh' is not one the head was trained on"):
        label_id("meh", named, "x")


README = """---
configs:
- config_name: cola
  data_files:
  - split: train
    path: cola/train.jsonl
  - split: validation
    path: cola/validation.jsonl
---
A GLUE-layout fixture (rows from tests/fixtures/gsm8k-pairs, not GLUE).
"""


@pytest.mark.slow
def test_glue_by_hub_id_offline(minilm_out: Path, tmp_path: Path) -> None:
    """``--data nyu-mll/glue --data-config cola`` from a hub cache laid out as ``load_dataset`` leaves it, offline:
    the text column is found as run_glue.py finds it (``sentence``), and eval names CoLA's metric (Matthews)."""
    home = tmp_path / "hf"
    root = home / "hub" / "datasets--nyu-mll--glue"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("4" * 40)
    snap = root / "snapshots" / ("4" * 40)
    (snap / "cola").mkdir(parents=True)
    pairs = [json.loads(x) for x in (PAIRS / "train.jsonl").read_text().splitlines()]
    rows = [{"sentence": p["step"], "label": p["label"], "idx": i} for i, p in enumerate(pairs[:24])]
    (snap / "cola" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (snap / "cola" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    (snap / "README.md").write_text(README)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    run, ev = tmp_path / "run", tmp_path / "ev"
    proc = _cli("train", minilm_out, "--task", "classification", "--data", "nyu-mll/glue", "--data-config", "cola",
                "--steps", "1", "--batch-size", "8", "--max-length", "48", "--device", "cpu", "--no-progress",
                "-o", run, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "config.json").read_text())["text_field"] == "sentence"
    proc = _cli("eval", run, "--task", "classification", "--data", "nyu-mll/glue", "--data-config", "cola",
                "--data-split", "validation", "-o", ev, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((ev / "classification_summary.json").read_text())
    assert summary["glue_task"] == "cola" and summary["metric"] == "matthews" and summary["examples"] == 8
    assert summary["value"] == summary["matthews"]


@pytest.mark.slow
def test_compare_with_a_head_reports_the_task_metric(minilm_dir: Path, tmp_path: Path) -> None:
    """compare --task classification: decompose (qlora) and lora/full baselines train heads; each run is scored on
    --eval-data through the plain-loading path; summary.md's metric column is their mean, Δ paired with QLoRA."""
    study = tmp_path / "study"
    proc = _cli("compare", minilm_dir, "--task", "classification", "--data", PAIRS / "train.jsonl", "--eval-data",
                PAIRS / "test.jsonl", *FIELDS, "--methods", "qlora,lora,full", "--seeds", "0", "--steps", "2",
                "--batch-size", "8", "--max-length", "48", "--eval-every", "1", "--eval-examples", "8",
                "--task-limit", "16", "--targets", r"encoder\.layer\.0\.attention\.self\.query", "--device", "cpu",
                "--no-progress", "-o", study, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((study / "results.json").read_text())
    for row in result["runs"]:
        key = {"qlora": "qlora", "lora": "lora", "full": "full"}[row["method"]]
        scored = json.loads((study / "runs" / key / "seed0-lr0.0002" / "eval" / "classification_summary.json")
                            .read_text())
        assert row["status"] == "complete" and row["accuracy"] == scored["value"] == scored["accuracy"]
        assert scored["examples"] == 16 and row["metric"] == "accuracy" and len(row["task_curve"]) >= 2
    assert (study / "runs" / "full" / "seed0-lr0.0002" / "model" / "config.json").exists()  # full: a checkpoint
    table = (study / "summary.md").read_text()
    assert "| accuracy | Δ acc vs QLoRA |" in table


def test_epochs_count_the_rows_without_steps(minilm_out: Path, tmp_path: Path) -> None:
    """Without --steps, one epoch of 24 rows at batch 8 is 3 optimizer steps (the loop once took its length from the
    causal-LM examples, empty here, and trained a single step)."""
    from qpissa.classify import encode
    from qpissa.data import DataConfig, load_records
    from qpissa.train.classifier_model import load_classifier
    from qpissa.train.config import TrainConfig
    from qpissa.train.loop import fit
    from qpissa.train.task import ClassificationTask

    cfg = TrainConfig(model=str(minilm_out), data=str(PAIRS / "train.jsonl"), output=str(tmp_path / "run"),
                      task="classification", text_field="question", text_pair_field="step", epochs=1.0, batch_size=8,
                      lr=1e-3, data_cfg=DataConfig(max_length=64), device="cpu", progress=False)
    records = load_records(cfg.data, limit=24)
    labels = infer_labels(records, "label", None, cfg.data)
    model, tok = load_classifier(cfg, labels)
    rows = encode(records, tok, "question", "step", "label", labels, 64, cfg.data)
    summary = fit(cfg, model, tok, [], [], task=ClassificationTask(rows, [], tok, labels, cfg.batch_size))
    assert summary["steps"] == 3
