"""Decompose under torchrun (2 CPU processes, gloo): same files as one process; resume; one rank's error reaches all.

Bitwise equality needs the same BLAS/LAPACK thread count per process: LAPACK's SVD is not
bitwise reproducible across thread counts (singular-vector signs may flip). torchrun runs each
rank with OMP_NUM_THREADS=1, so the single-process reference here runs with 1 thread too.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tree_digest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qpissa import distributed
from qpissa.decompose import sharding
from qpissa.decompose import decompose
from qpissa.errors import UserError
from qpissa.formats import scan_checkpoint
from qpissa.decompose.targets import find_targets

ARGS = dict(method="qpissa", rank=8, iters=1, targets=["query", "value"], loftq_baseline=False)
CLI_ARGS = ["--method", "qpissa", "--rank", "8", "--iters", "1", "--targets", "query", "--targets", "value",
            "--no-loftq-baseline", "--device", "cpu", "--quiet"]
OUTPUT_FILES = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "residual/config.json",
                "residual/model.safetensors", "report.json", "report.csv", "report.md", "error_by_layer.png"}


def torchrun(tmp: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N --no-python qpissa decompose ...`` (cwd outside the repo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--no-python", "qpissa", "decompose", *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def one_thread_decompose(model: Path, out: Path, **kwargs) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return decompose(model, out, progress=False, **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(minilm_dir, tmp_path_factory) -> Path:
    """Single process, 1 thread: all-MiniLM-L6-v2 query+value (12 tensors 384×384), r=8."""
    out = tmp_path_factory.mktemp("single") / "out"
    one_thread_decompose(minilm_dir, out, **ARGS)
    return out


# --- which rank owns which tensor ----------------------------------------------------------------

@pytest.mark.parametrize("sizes", [[5, 3, 3, 2, 2, 2, 1], [7, 7, 7, 7], [10, 1, 1, 1, 1, 1, 1, 1, 1, 9],
                                   [4, 4, 3, 3, 3]])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_assign_covers_every_tensor_and_is_near_optimal(sizes, world):
    owner = sharding.assign(sizes, world)
    assert len(owner) == len(sizes) and set(owner) <= set(range(world))
    assert owner == sharding.assign(list(sizes), world)  # deterministic: every rank computes the same
    makespan = max(sum(s for s, o in zip(sizes, owner) if o == r) for r in range(world))
    optimal = min(max(sum(s for s, o in zip(sizes, split) if o == r) for r in range(world))
                  for split in itertools.product(range(world), repeat=len(sizes)))  # brute force
    assert makespan <= 4 / 3 * optimal  # Graham's bound for largest-first greedy
    mine = [sharding.owned([(s,) for s in sizes], distributed.Dist(r, world, r)) for r in range(world)]
    assert sorted(sum(mine, [])) == list(range(len(sizes)))  # a partition: each tensor has one owner


def test_detect_reads_torchrun_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.detect() == distributed.Dist(0, 1, 0) and not distributed.detect().enabled
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.detect() == distributed.Dist(3, 4, 1)
    assert distributed.rank_device("cpu", distributed.detect()) == "cpu"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UserError, match="RANK=4"):
        distributed.detect()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE"):
        distributed.detect()


def test_fragments_newest_entry_wins_and_a_missing_rank_is_reported(tmp_path):
    (tmp_path / ".parts").mkdir()
    old = {"a": {"part": "00000.safetensors", "sha256": "old"}, "b": {"part": "00001.safetensors", "sha256": "b"}}
    (tmp_path / "manifest.json").write_text(json.dumps({"tensors": old}))
    os.utime(tmp_path / "manifest.json", ns=(1, 1))  # written before the fragment
    sharding.write_fragment(tmp_path / ".parts", distributed.Dist(1, 2, 1), {"a": {"sha256": "new"}})
    assert sharding.known_parts(tmp_path) == {"a": {"sha256": "new"}, "b": old["b"]}
    with pytest.raises(UserError, match="manifest-rank0.json is missing"):
        sharding.merge_fragments(tmp_path / ".parts", 2, ["a", "b"])
    sharding.write_fragment(tmp_path / ".parts", distributed.Dist(0, 2, 0), {})
    with pytest.raises(UserError, match="no part recorded for b"):
        sharding.merge_fragments(tmp_path / ".parts", 2, ["a", "b"])
    sharding.remove_fragments(tmp_path / ".parts")
    assert list((tmp_path / ".parts").iterdir()) == []


# --- real runs -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_ranks_write_the_single_process_files(reference, minilm_dir, tmp_path):
    out = tmp_path / "dist"
    proc = torchrun(tmp_path, str(minilm_dir), "-o", str(out), *CLI_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]  # every rank got a report to print (None would crash)
    got, want = tree_digest(out), tree_digest(reference)
    assert OUTPUT_FILES <= set(want) and len([k for k in want if k.startswith(".parts/")]) == 12
    assert got == want  # residual/, adapter/, reports, plot and parts: byte for byte, no fragments left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and list(manifest["tensors"]) == \
        list(json.loads((reference / "manifest.json").read_text())["tensors"])


@pytest.mark.slow
def test_resume_across_process_counts(reference, minilm_dir, tmp_path):
    """A 1-process run cut after 5 parts, resumed by 2 ranks; a 2-rank run's fragments, resumed by 1 process."""
    cut = tmp_path / "cut"
    shutil.copytree(reference, cut)
    for name in ("residual", "adapter", "report.json", "report.csv", "report.md", "error_by_layer.png"):
        p = cut / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    manifest = json.loads((cut / "manifest.json").read_text())
    modules = list(manifest["tensors"])
    for module in modules[5:]:
        (cut / ".parts" / manifest["tensors"].pop(module)["part"]).unlink()
    manifest["status"] = "running"
    (cut / "manifest.json").write_text(json.dumps(manifest))
    kept = {p.name: p.stat().st_ino for p in (cut / ".parts").iterdir()}

    proc = torchrun(tmp_path, str(minilm_dir), "-o", str(cut), "--resume", *CLI_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree_digest(cut) == tree_digest(reference)
    assert {n: (cut / ".parts" / n).stat().st_ino for n in kept} == kept  # verified parts were not redone

    # as a killed 2-rank run leaves it: entries only in rank fragments, not yet in manifest.json
    manifest = json.loads((cut / "manifest.json").read_text())
    entries, manifest["tensors"], manifest["status"] = manifest["tensors"], {}, "running"
    (cut / "manifest.json").write_text(json.dumps(manifest))
    for rank, chunk in enumerate((modules[:4], modules[4:7])):
        sharding.write_fragment(cut / ".parts", distributed.Dist(rank, 2, rank), {m: entries[m] for m in chunk})
    for module in modules[7:]:
        (cut / ".parts" / entries[module]["part"]).unlink()
    (cut / "report.json").unlink()
    kept = {p.name: p.stat().st_ino for p in (cut / ".parts").glob("0*.safetensors")}
    one_thread_decompose(minilm_dir, cut, resume=True, **ARGS)
    assert tree_digest(cut) == tree_digest(reference)  # fragments merged and removed
    assert {n: (cut / ".parts" / n).stat().st_ino for n in kept} == kept
    assert list(json.loads((cut / "manifest.json").read_text())["tensors"]) == modules


@pytest.mark.slow
def test_an_error_on_one_rank_stops_all_with_one_clear_line(tmp_path):
    """NaN in a tensor that rank 1 owns: both ranks exit 2 with the same message; nothing is assembled."""
    from transformers import BertConfig, BertModel

    model = tmp_path / "bert"
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=50, max_position_embeddings=16, architectures=["BertModel"])
    BertModel(cfg).save_pretrained(model)
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    targets, *_ = find_targets(model, scan_checkpoint(model), None)
    owner = sharding.assign([math.prod(t.shape) for t in targets], 2)
    bad = targets[owner.index(1)].weight.name  # a tensor rank 1 decomposes
    tensors[bad][3, 5] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})

    out = tmp_path / "out"
    proc = torchrun(tmp_path, str(model), "-o", str(out), "--rank", "4", "--quiet")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all(bad in e and "NaN or Inf" in e for e in errors), proc.stderr[-3000:]
    assert "(reported by rank 1)" in errors[0] + errors[1]
    frames = [line for line in proc.stderr.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "qpissa" in f], proc.stderr[-3000:]  # only torchrun's own ChildFailedError
    assert not (out / "adapter").exists() and not (out / "residual").exists()
    assert (out / ".parts" / "manifest-rank0.json").is_file()  # rank 0's finished parts are kept for --resume
