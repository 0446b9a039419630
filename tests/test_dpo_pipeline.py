"""``--objective dpo`` through the rest of the pipeline: ``--fsdp`` (2 gloo ranks = one process with the double
batch), an MoE decompose output (expert adapters train, step 0 is log 2) and ``qpissa compare --objective dpo``
(held-out preference accuracy and reward margin in the study's tables)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_dpo import arithmetic_pairs, dpo_cfg, rows_of, write_jsonl
from test_train_fsdp import torchrun

from qpissa.train import train


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pairs")
    return {"train": write_jsonl(root / "train.jsonl", arithmetic_pairs(8)),
            "eval": write_jsonl(root / "eval.jsonl", arithmetic_pairs(4, offset=20))}


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process(smollm2_decomposed, pairs, tmp_path: Path) -> None:
    out = smollm2_decomposed["qpissa"]["out"]
    args = [str(out), "--objective", "dpo", "--data", str(pairs["train"]), "--steps", "2", "--lr", "1e-3",
            "--warmup-ratio", "0", "--max-length", "64", "--precision", "fp32", "--no-progress", "--device", "cpu"]
    proc = torchrun(2, [*args, "--batch-size", "1", "--fsdp", "-o", str(tmp_path / "fsdp")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(dpo_cfg(out, pairs, tmp_path / "single", eval_data=None, steps=2, batch_size=2))
    got, want = rows_of(tmp_path / "fsdp"), rows_of(tmp_path / "single")
    assert [r["step"] for r in got] == [1, 2]
    assert got[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for a, b in zip(got, want):
        for key in ("loss", "rewards_chosen", "rewards_margin", "rewards_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (key, a, b)  # summed over ranks, not one rank's
    assert got[1]["rewards_margin"] != 0.0


@pytest.mark.slow
def test_moe_output_trains_expert_adapters(smollm2_dir: Path, pairs, tmp_path: Path) -> None:
    from moe_models import build
    from safetensors.torch import load_file

    from qpissa.decompose import decompose

    src = build("qwen3_moe", tmp_path / "src", tokenizer=smollm2_dir)
    decompose(src, tmp_path / "out", rank=4, progress=False)
    summary = train(dpo_cfg(tmp_path / "out", pairs, tmp_path / "run", steps=2, eval_at_start=True))
    rows = rows_of(tmp_path / "run")
    assert rows[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    init = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(Path(summary["adapter"]) / "adapter_model.safetensors"))
    experts = [k for k in init if ".experts." in k]
    assert experts and all(not (final[k].float() == init[k].float()).all() for k in experts)


@pytest.mark.slow
def test_compare_objective_dpo(smollm2_dir: Path, pairs, tmp_path: Path) -> None:
    study = tmp_path / "study"
    cmd = [sys.executable, "-m", "qpissa", "compare", str(smollm2_dir), "--objective", "dpo", "--data",
           str(pairs["train"]), "--eval-data", str(pairs["eval"]), "--methods", "qlora,qpissa:2", "--seeds", "0,1",
           "--steps", "2", "--lr", "1e-3", "--eval-every", "2", "--eval-examples", "4", "--batch-size", "2",
           "--max-length", "64", "--targets",
           r"model\.layers\.0\.self_attn\.(q|v)_proj", "--device", "cpu", "--no-progress", "-o", str(study)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((study / "results.json").read_text())
    assert len(result["runs"]) == 4 and all(r["status"] == "complete" for r in result["runs"])
    for row in result["runs"]:
        metrics = rows_of(study / "runs" / row["method"].replace("(2)", "-T2") / f"seed{row['seed']}-lr0.001")
        assert row["accuracy"] == metrics[-1]["eval_rewards_accuracy"]
        assert row["margin"] == metrics[-1]["eval_rewards_margin"]
        assert row["init_eval_loss"] == pytest.approx(math.log(2), abs=1e-2)  # every start is its own reference
    summary = (study / "summary.md").read_text()
    assert "preference accuracy" in summary and "reward margin" in summary and "| qpissa(2) |" in summary
    assert not (study / "reference.json").exists()  # the SFT held-out loss of the original model does not apply
