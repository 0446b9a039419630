"""``qpissa train --fsdp`` (FSDP2 over 2 gloo ranks on CPU) equals one process with the double batch.

Reference: one plain process with ``--batch-size 4`` (bitsandbytes' own Linear4bit, no FSDP); the FSDP
run: ``torchrun --nproc_per_node 2 ... --fsdp --batch-size 2``. fp32 compute, 2 steps (why 2: see
tests/test_train_ddp.py — AdamW's first updates ≈ η·sign(g) amplify fp32 noise after that).
Measured here: losses equal to 3e-7, adapters to ≈4e-5 of how far training moved them.
Then ``--resume`` of the 2-rank run's step-1 checkpoint on ONE rank must land on the same step 2.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from qpissa.data import DataConfig
from qpissa.train import TrainConfig, train

STEPS, LR = 2, 2e-5
ARGS = ["--steps", str(STEPS), "--lr", str(LR), "--warmup-ratio", "0", "--max-length", "128", "--skip-long-prompts",
        "--precision", "fp32", "--no-progress", "--device", "cpu"]


def torchrun(n: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = ["torchrun", "--standalone", "--nproc_per_node", str(n), "--no-python", "qpissa", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(run / "adapter_model.safetensors")).items()}


@pytest.fixture(scope="module")
def runs(smollm2_decomposed, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The 2-rank FSDP run (checkpoints at steps 1 and 2) and the single-process reference."""
    out = smollm2_decomposed["qpissa"]["out"]
    root = tmp_path_factory.mktemp("fsdp")
    proc = torchrun(2, [str(out), "--data", str(tiny_data), "-o", str(root / "fsdp"), *ARGS, "--batch-size", "2",
                        "--save-every", "1", "--keep-last", "2", "--fsdp"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = root / "single"
    train(TrainConfig(model=str(out), data=str(tiny_data), output=str(single), steps=STEPS, lr=LR, warmup_ratio=0.0,
                      batch_size=4, precision="fp32", progress=False,
                      data_cfg=DataConfig(max_length=128, skip_long_prompts=True)))
    return {"out": out, "root": root, "fsdp": root / "fsdp", "single": single, "proc": proc, "data": tiny_data}


def assert_same_training(run: Path, ref: Path, init: Path) -> None:
    got_rows, want_rows = rows(run), rows(ref)
    assert [r["step"] for r in got_rows] == list(range(1, STEPS + 1))  # one writer, no duplicated lines
    for a, b in zip(got_rows, want_rows):
        assert a["tokens"] == b["tokens"]  # the same global batches
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"], (a, b)  # summed, not averaged
    start, got, want = adapter(init), adapter(run / "adapter"), adapter(ref / "adapter")
    assert got.keys() == want.keys() and len(got) == 10  # 5 modules × (A, B), PEFT's key names
    for key in want:
        moved = float((want[key] - start[key]).norm())
        assert moved > 0, key  # training changed the adapter: the comparison is not vacuous
        assert float((got[key] - want[key]).norm()) < 1e-3 * moved, key  # measured ≈4e-5


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_with_double_batch(runs: dict) -> None:
    run, ref = runs["fsdp"], runs["single"]
    assert_same_training(run, ref, runs["out"] / "adapter")
    # RUN/adapter in exactly the single-process format: same config, same tensor names and dtypes
    config = lambda r: {k: sorted(v) if k == "target_modules" else v  # noqa: E731  (PEFT writes a set's order)
                        for k, v in json.loads((r / "adapter" / "adapter_config.json").read_text()).items()}
    assert config(run) == config(ref)
    assert {k: v.dtype for k, v in adapter(run / "adapter").items()} == \
        {k: v.dtype for k, v in adapter(ref / "adapter").items()}
    assert runs["proc"].stdout.count("qpissa train →") == 1  # one summary table (rank 0)
    # each rank's local share of the frozen bytes, measured from its FSDP shards (DTensor.to_local())
    shares = re.findall(r"fsdp: rank (\d)/2 holds ([\d,]+) of ([\d,]+) bytes of the NF4 residual .*?, "
                        r"([\d,]+) of ([\d,]+) frozen bytes", runs["proc"].stderr)
    assert sorted(s[0] for s in shares) == ["0", "1"], runs["proc"].stderr[-2000:]
    num = lambda s: int(s.replace(",", ""))  # noqa: E731
    for _, nf4_local, nf4_total, all_local, all_total in shares:
        assert num(nf4_total) == nf4_bytes(runs["out"])  # the whole NF4 residual (packed + absmax)
        assert abs(num(nf4_local) / num(nf4_total) - 0.5) < 0.01
        assert abs(num(all_local) / num(all_total) - 0.5) < 0.01
    assert sum(num(s[1]) for s in shares) >= num(shares[0][2])  # the shards cover the whole (padding aside)


def nf4_bytes(out: Path) -> int:
    """Bytes of the packed NF4 weights + absmax stored in OUT/residual (independent of the run)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(out / "residual" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith(".absmax") or (f.get_slice(key).get_dtype() == "U8" and key.endswith(".weight")):
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


@pytest.mark.slow
def test_fsdp_resume_two_ranks_onto_one(runs: dict) -> None:
    """Step 1 saved by 2 ranks (sharded optimizer in dcp/), step 2 trained by 1 rank: same as one process."""
    res = runs["root"] / "resumed"
    shutil.copytree(runs["fsdp"], res)
    shutil.rmtree(res / "adapter")
    shutil.rmtree(res / f"checkpoint-{STEPS}")
    assert (res / "checkpoint-1" / "dcp" / ".metadata").exists()
    proc = torchrun(1, [str(runs["out"]), "--data", str(runs["data"]), "-o", str(res), *ARGS, "--batch-size", "4",
                        "--fsdp", "--resume"], runs["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(res, runs["single"], runs["out"] / "adapter")


@pytest.mark.slow
def test_fsdp_checkpoint_refuses_a_resume_without_fsdp(runs: dict) -> None:
    res = runs["root"] / "no-fsdp"
    shutil.copytree(runs["fsdp"], res)
    proc = subprocess.run(["qpissa", "train", str(runs["out"]), "--data", str(runs["data"]), "-o", str(res), *ARGS,
                           "--steps", "3", "--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "written by an --fsdp run" in proc.stderr and "Traceback" not in proc.stderr


def test_fsdp_layer_trains_on_the_stored_nf4_bytes(smollm2_decomposed) -> None:
    """No re-quantization: the shardable layer holds the very bytes of OUT/residual and computes what
    bitsandbytes' Linear4bit computes from them (forward and input gradient, bit for bit in fp32)."""
    from safetensors.torch import load_file

    from qpissa.train.model import load_model
    from qpissa.train.nf4_module import FrozenNF4Linear, swap_linear4bit

    out = smollm2_decomposed["qpissa"]["out"]
    model, _ = load_model(TrainConfig(model=str(out), data="unused", output="unused", precision="fp32"))
    stored = load_file(str(out / "residual" / "model.safetensors"))
    lora = model.base_model.model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 3, lora.base_layer.in_features, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    want = lora.base_layer(x)
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    assert swap_linear4bit(model) == 5
    layer = lora.base_layer
    assert isinstance(layer, FrozenNF4Linear) and not any(p.requires_grad for p in layer.parameters())
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(layer.packed.data, stored[key].reshape(-1))  # the stored packed bytes
    assert torch.equal(layer.absmax.data, stored[key + ".absmax"])
    got = layer(x)
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_fsdp_without_a_launch_is_one_line(smollm2_decomposed, tiny_data: Path, tmp_path: Path) -> None:
    out = smollm2_decomposed["qpissa"]["out"]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "WORLD_SIZE", "RANK")}
    for extra, message in ((["--fsdp"], "--fsdp shards the model over the ranks"),
                           (["--fsdp", "--optim", "adamw8bit"], "--fsdp does not support --optim adamw8bit"),
                           (["--fsdp-offload"], "pass --fsdp too")):
        proc = subprocess.run(["qpissa", "train", str(out), "--data", str(tiny_data), "-o", str(tmp_path / "r"),
                               *ARGS, *extra], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.slow
def test_fsdp_bad_optimizer_stops_every_rank(smollm2_decomposed, tiny_data: Path, tmp_path: Path) -> None:
    proc = torchrun(2, [str(smollm2_decomposed["qpissa"]["out"]), "--data", str(tiny_data), "-o", str(tmp_path / "r"),
                        *ARGS, "--fsdp", "--optim", "paged_adamw8bit"], tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("--fsdp does not support --optim paged_adamw8bit") == 2, proc.stderr[-2000:]
    assert "qpissa/train" not in proc.stderr and not (tmp_path / "r").exists()  # no worker traceback
