"""NF4 MoE experts under ``train --fsdp``: 2 gloo ranks shard each block's experts along the expert axis and train
exactly as one process with the double batch (loss per step within 1e-4)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from moe_models import EXPERTS
from test_train_fsdp import ARGS, adapter, rows, torchrun

from qpissa.data import DataConfig
from qpissa.train import TrainConfig, train


@pytest.mark.slow
def test_two_ranks_shard_the_experts_and_match_one_process(moe_out, tiny_data, tmp_path):
    from safetensors import safe_open

    proc = torchrun(2, [str(moe_out), "--data", str(tiny_data), "-o", str(tmp_path / "fsdp"), *ARGS,
                        "--batch-size", "2", "--fsdp"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = tmp_path / "single"
    train(TrainConfig(model=str(moe_out), data=str(tiny_data), output=str(single), steps=2, lr=2e-5,
                      warmup_ratio=0.0, batch_size=4, precision="fp32", progress=False,
                      data_cfg=DataConfig(max_length=128, skip_long_prompts=True)))
    got, want = rows(tmp_path / "fsdp"), rows(single)
    assert [r["step"] for r in got] == [1, 2]
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    start, x, y = adapter(moe_out / "adapter"), adapter(tmp_path / "fsdp" / "adapter"), adapter(single / "adapter")
    assert x.keys() == y.keys() and any(".experts." in k for k in x)
    for key in y:
        moved = float((y[key] - start[key]).norm())
        assert moved > 0 and float((x[key] - y[key]).norm()) < 1e-2 * moved, key
    # each rank reports its share of the NF4 bytes, the experts' included: half of them, one shard per rank
    with safe_open(str(moe_out / "residual" / "nf4-experts.safetensors"), "pt") as f:
        expert_bytes = sum(f.get_slice(k).get_shape()[0] * (1 if k.endswith("weight") else 4)
                           for k in f.keys() if k.endswith((".weight", ".absmax")))
    shares = [tuple(map(lambda s: int(s.replace(",", "")), m)) for m in
              re.findall(r"rank \d/2 holds ([\d,]+) of ([\d,]+) bytes of the NF4 residual", proc.stderr)]
    assert len(shares) == 2 and shares[0][1] == shares[1][1] and shares[0][0] + shares[1][0] == shares[0][1]
    assert shares[0][1] > expert_bytes  # the total counts the experts' packed bytes and absmax
    assert EXPERTS % 2 == 0 and abs(shares[0][0] - shares[1][0]) < 0.1 * shares[0][1]
