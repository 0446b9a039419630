"""Data-parallel training under torchrun (2 CPU processes, gloo) equals one process on the same global batch.

``torchrun --nproc_per_node 2 --no-python qpissa train ... --batch-size 2`` splits every global batch of
4 examples into two shards of 2 and all-reduces the (globally token-normalised) gradients; the
reference is one process with ``--batch-size 4`` — same examples, same order, same padding.
Compute runs in fp32 here, so the only difference is the summation order of the two shards.

Why two steps: the gradients agree to ~1e-7 relative, but AdamW's first updates are ≈ η·sign(g),
so components whose gradient is at the fp32 noise level (|g| ≲ 1e-7) move by ±η in either run;
measured on this fixture, losses of steps 1–2 agree to 1e-7 while the loss of step 3 differs by
~3e-3 — for a split of the batch computed in one process just the same (not a DDP effect).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from qpissa.data import DataConfig
from qpissa.train import TrainConfig, train

STEPS, LR = 2, 2e-5


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(run / "adapter" / "adapter_model.safetensors")).items()}


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_double_batch(smollm2_decomposed, tiny_data: Path,
                                                            tmp_path: Path) -> None:
    out = smollm2_decomposed["qpissa"]["out"]
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "--no-python", "qpissa", "train", str(out),
           "--data", str(tiny_data), "-o", str(tmp_path / "ddp"), "--steps", str(STEPS), "--lr", str(LR),
           "--warmup-ratio", "0", "--max-length", "128", "--skip-long-prompts", "--precision", "fp32",
           "--batch-size", "2", "--save-every", "1", "--keep-last", "1", "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("qpissa train →") == 1  # only rank 0 prints the summary table

    single = tmp_path / "single"
    train(TrainConfig(model=str(out), data=str(tiny_data), output=str(single), steps=STEPS, lr=LR, warmup_ratio=0.0,
                      batch_size=4, precision="fp32", progress=False,
                      data_cfg=DataConfig(max_length=128, skip_long_prompts=True)))

    ddp, ref = rows(tmp_path / "ddp"), rows(single)
    assert [r["step"] for r in ddp] == list(range(1, STEPS + 1))  # one writer: no duplicated lines
    for a, b in zip(ddp, ref):
        assert a["tokens"] == b["tokens"]  # the same global batches
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)  # global token-weighted loss (measured ~1e-7)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"], (a, b)  # summed, not averaged
    assert sorted(p.name for p in (tmp_path / "ddp").glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]

    init = adapter(out)  # out/adapter: the decompose initialization
    got, want = adapter(tmp_path / "ddp"), adapter(single)
    assert got.keys() == want.keys() and len(got) == 10  # 5 modules × (A, B)
    for key in want:
        moved = float((want[key] - init[key]).norm())
        assert moved > 0, key  # training changed the adapter: the comparison is not vacuous
        assert float((got[key] - want[key]).norm()) < 0.02 * moved, key
