"""``qpissa compare``: a tiny real grid (2 methods × 2 seeds × 3 steps on SmolLM2), kill-and-resume, --report,
the statistics against an independent computation, and bad input as one line without losing a study."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qpissa.compare.config import CompareConfig, MethodSpec, parse_methods
from qpissa.compare.stats import estimate, paired, t975
from qpissa.errors import UserError


def _args(model: Path, gsm8k: Path, out: Path) -> list[str]:
    return [str(model), "--data", str(gsm8k / "train.jsonl"), "--eval-data", str(gsm8k / "test.jsonl"),
            "--methods", "qlora,qpissa:2", "--seeds", "0,1", "--steps", "3", "--eval-every", "2",
            "--eval-examples", "4", "--batch-size", "1", "--max-length", "96", "--skip-long-prompts",
            "--targets", "q_proj", "--targets", "v_proj", "--init-kl", "2", "--calib-samples", "4",
            "--calib-seq-len", "64", "--no-progress", "-o", str(out)]


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", "from qpissa.cli import main; main()", "compare", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def _losses(study: Path) -> dict[str, list[tuple[int, float | None, float | None]]]:
    out = {}
    for path in sorted(study.glob("runs/*/*/metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        out[str(path.parent.relative_to(study))] = [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows]
    return out


@pytest.fixture(scope="module")
def uninterrupted(smollm2_dir, gsm8k_dir, tmp_path_factory) -> Path:
    study = tmp_path_factory.mktemp("compare") / "study"
    proc = _cli(_args(smollm2_dir, gsm8k_dir, study))
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert "| qpissa(2) |" in out  # the summary table is printed
    return study


@pytest.mark.slow
def test_grid_outputs(uninterrupted):
    study = uninterrupted
    results = json.loads((study / "results.json").read_text())
    runs = results["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("qlora", 0), ("qpissa(2)", 0), ("qlora", 1), ("qpissa(2)", 1)]
    assert all(r["status"] == "complete" and r["steps"] == 3 for r in runs)
    for r in runs:  # every figure is read back from the run's own files
        rows = [json.loads(x) for x in (study / "runs" / MethodSpec(*(("qlora",) if r["method"] == "qlora" else
                ("qpissa", 2))).key / f"seed{r['seed']}-lr0.0002" / "metrics.jsonl").read_text().splitlines()]
        assert r["eval_loss"] == rows[-1]["eval_loss"] and [s for s, _ in r["eval_curve"]] == [2, 3]
        assert r["train_loss_first"] == next(x["loss"] for x in rows if x["step"] == 1)
    # the init's held-out loss is measured once per method (step 0 of its first run) and shared
    assert (study / "runs/qlora/seed0-lr0.0002/metrics.jsonl").read_text().startswith('{"step": 0')
    assert not (study / "runs/qlora/seed1-lr0.0002/metrics.jsonl").read_text().startswith('{"step": 0')
    assert runs[0]["init_eval_loss"] == runs[2]["init_eval_loss"] is not None
    # init error from the decompose report: QLoRA is its own baseline, QPiSSA lowers it
    assert runs[0]["init_reduction_vs_qlora"] == 0.0 and runs[1]["init_reduction_vs_qlora"] > 0.05
    # init KL(original ‖ init) on the same held-out calibration sequences: QPiSSA starts closer than QLoRA
    assert 0 < runs[1]["init_kl"] < runs[0]["init_kl"] and runs[0]["init_kl"] == runs[2]["init_kl"]
    reference = json.loads((study / "reference.json").read_text())
    assert reference["examples"] == 4 and math.isfinite(reference["eval_loss"])
    # summary: mean ± CI and the paired difference, recomputed here from the rows
    q = {r["seed"]: r["eval_loss"] for r in runs if r["method"] == "qlora"}
    p = {r["seed"]: r["eval_loss"] for r in runs if r["method"] == "qpissa(2)"}
    d = [p[s] - q[s] for s in (0, 1)]
    mean = sum(d) / 2
    half = 12.706 * abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2)  # t(1) · s/√n with s = |d0 − d1|/√2
    row = next(g for g in results["summary"] if g["method"] == "qpissa(2)")
    assert row["eval_loss_vs_qlora"]["mean"] == pytest.approx(mean, abs=1e-12)
    assert row["eval_loss_vs_qlora"]["ci95"] == pytest.approx(half, rel=1e-9)
    md = (study / "summary.md").read_text()
    assert f"{mean:.4f} ± {half:.4f}" in md
    assert (study / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_rows = (study / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 5 and csv_rows[0].startswith("method,seed,lr,status")


@pytest.mark.slow
def test_kill_and_resume_finishes_only_what_is_missing(uninterrupted, smollm2_dir, gsm8k_dir, tmp_path):
    study = tmp_path / "study"
    args = _args(smollm2_dir, gsm8k_dir, study)
    proc = _cli(args)
    first_done = study / "runs/qlora/seed0-lr0.0002/summary.json"
    second_ckpt = study / "runs/qpissa-T2/seed0-lr0.0002/checkpoint-2"
    deadline = time.time() + 600
    while not second_ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-grid: one run complete, one at its step-2 checkpoint
    proc.wait()
    assert first_done.exists() and second_ckpt.exists()
    before = first_done.stat().st_mtime_ns

    again = _cli(args)  # without --resume: refused, nothing touched
    _, err = again.communicate(timeout=300)
    assert again.returncode == 2 and err.strip().splitlines()[-1].startswith("error:") and "--resume" in err
    assert first_done.stat().st_mtime_ns == before

    resumed = _cli(args + ["--resume"])
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    assert first_done.stat().st_mtime_ns == before  # the complete run was not redone
    assert "decompose qlora" in err  # listed in the grid's progress, but its output was complete
    got, want = _losses(study), _losses(uninterrupted)
    assert got.keys() == want.keys()
    for run in want:
        assert [s for s, _, _ in got[run]] == [s for s, _, _ in want[run]], run
        for (_, a, ea), (_, b, eb) in zip(got[run], want[run]):
            assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-5), run
            assert (ea is None) == (eb is None) and (ea is None or abs(ea - eb) < 1e-5), run


@pytest.mark.slow
def test_report_regenerates_from_stored_runs(uninterrupted, tmp_path):
    import shutil

    study = tmp_path / "copy"
    shutil.copytree(uninterrupted, study, ignore=shutil.ignore_patterns("checkpoint-*", "adapter", ".lock"))
    for name in ("results.json", "results.csv", "summary.md", "curves.png"):
        (study / name).unlink()
    proc = _cli(["--report", "-o", str(study)])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    for name in ("results.json", "results.csv"):  # the same figures, from the same files
        assert (study / name).read_text() == (uninterrupted / name).read_text()
    md, want = (study / "summary.md").read_text().splitlines(), (uninterrupted / "summary.md").read_text().splitlines()
    assert md[0] == "# Study copy" and md[1:] == want[1:]
    assert (study / "curves.png").exists()


@pytest.mark.slow
def test_bad_input_is_one_line_and_keeps_the_study(uninterrupted, smollm2_dir, minilm_dir, gsm8k_dir, tmp_path):
    args = _args(smollm2_dir, gsm8k_dir, uninterrupted)
    listing = sorted(str(p) for p in uninterrupted.rglob("*"))
    cases = [
        (["--methods", "qlora,qpisa"], "unknown method 'qpisa'"),
        (["--seeds", "0,one"], "--seeds '0,one'"),
        (["--seeds", "0,1,2"], "differs in: seeds"),  # a study folder from another configuration
        ([], "--resume"),
    ]
    for extra, needle in cases:
        proc = _cli(args + extra)
        _, err = proc.communicate(timeout=300)
        lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], (extra, err[-2000:])
        assert "Traceback" not in err
    assert sorted(str(p) for p in uninterrupted.rglob("*")) == listing
    encoder = _args(minilm_dir, gsm8k_dir, tmp_path / "enc")
    proc = _cli(encoder)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "causal" in err.lower() and "Traceback" not in err


def test_method_specs():
    specs = parse_methods("qlora,loftq,qpissa:3,qpissa-cal,cloq,lora", iters=5)
    assert [s.label for s in specs] == ["qlora", "loftq(5)", "qpissa(3)", "qpissa-cal-bal(5)", "cloq-bal", "lora"]
    assert [s.calibrated for s in specs] == [False, False, False, True, True, False]
    assert [s.balance for s in specs] == [False, False, False, True, True, False]  # calibrated: balanced by default
    assert specs[3].key == "qpissa-cal-bal-T5"
    # -nobal (or --no-balance-factors, as studies stored before balancing was the default) unbalances: no suffix
    old = parse_methods("qpissa-cal,cloq,qpissa-cal-bal", iters=5, balance=False)
    assert [(s.label, s.key, s.balance) for s in old] == [("qpissa-cal(5)", "qpissa-cal-T5", False),
                                                          ("cloq", "cloq", False),
                                                          ("qpissa-cal-bal(5)", "qpissa-cal-bal-T5", True)]
    assert [s.label for s in parse_methods("qpissa-cal-nobal,cloq-nobal,loftq-cal", iters=5)] == \
        ["qpissa-cal(5)", "cloq", "loftq-cal-bal(5)"]
    with pytest.raises(UserError, match="twice"):
        parse_methods("qpissa-cal,qpissa-cal-bal", iters=5)  # the same init under its old and new name
    for bad, needle in (("qlora:2", "only qpissa and loftq"), ("qpissa:x", "integer"), ("qlora,qlora", "twice"),
                        ("", "at least one")):
        with pytest.raises(UserError, match=needle):
            parse_methods(bad, iters=1)
    with pytest.raises(UserError, match="--lr-sweep"):
        CompareConfig(model="m", data="d", eval_data="e", output="o", lr_sweep="1e-4,x")
    # variants: -alloc (qpissa: --rank-allocation error), -bal (--balance-factors), after -cal
    alloc, bal, both = parse_methods("qpissa-alloc:5,qpissa-cal-bal,qpissa-cal-alloc-bal:3", iters=5)
    assert (alloc.label, alloc.key, alloc.allocation, alloc.balance, alloc.calibrated) == \
        ("qpissa-alloc(5)", "qpissa-alloc-T5", "error", False, False)
    assert (bal.label, bal.allocation, bal.balance, bal.calibrated) == ("qpissa-cal-bal(5)", "uniform", True, True)
    assert (both.label, both.iters) == ("qpissa-cal-alloc-bal(3)", 3)
    for bad in ("qlora-alloc", "loftq-alloc", "cloq-bal-alloc", "qpissa-nobal", "qlora-bal"):
        with pytest.raises(UserError, match="unknown method"):
            parse_methods(bad, iters=1)


def test_confidence_intervals_match_independent_values():
    # t quantiles: scipy.stats.t.ppf(0.975, df) for df 1, 2, 4, 30 (published table values)
    assert [t975(d) for d in (1, 2, 4, 30)] == [12.706, 4.303, 2.776, 2.042]
    e = estimate([1.0, 2.0, 4.0])
    s = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert e.mean == pytest.approx(7 / 3) and e.half_width == pytest.approx(4.303 * s / math.sqrt(3))
    assert estimate([2.5]).half_width is None and estimate([]) is None
    d = paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.5, 1: 2.5, 3: 9.0})  # only seeds 0 and 1 are shared
    assert d.n == 2 and d.mean == pytest.approx(0.0)


def test_committed_study_regenerates_from_its_stored_runs(tmp_path):
    """docs/study/*: the figures in docs/benchmarks.md are what --report computes from the committed run files."""
    import shutil

    from qpissa.compare.report import write_outputs

    for name in ("main", "lr", "minilm-pairs", "alloc", "lr-bal", "alloc-cal", "dpo"):
        committed = Path(__file__).resolve().parents[1] / "docs" / "study" / name
        study = tmp_path / name
        shutil.copytree(committed, study)
        result = write_outputs(study)
        assert result == json.loads((committed / "results.json").read_text())
        assert (study / "summary.md").read_text() == (committed / "summary.md").read_text()
        assert all(r["status"] == "complete" for r in result["runs"])
