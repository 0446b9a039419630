"""The faults a long run meets: a full disk (a real ENOSPC on a small tmpfs), Ctrl-C (a real SIGINT) and a failed
start. Each is one line (exit 2, or 130 for Ctrl-C) saying what was kept and how to go on; a run that kept nothing
leaves nothing behind; ``--resume`` after freeing space ends byte-identical to an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import helpers
from helpers import tree_digest
from qpissa.cli import main

DECOMPOSE = ["--rank", "4", "--workers", "1", "--quiet"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 4-layer Llama (hidden 128, 28 target linears, bf16): decomposes in about a second."""
    return helpers.tiny_llama(tmp_path_factory.mktemp("faults") / "llama", layers=4, hidden=128)


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end identical to."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert _cli_in_process("decompose", str(tiny_llama), "-o", str(out), *DECOMPOSE)[0] == 0
    return out


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(kib)``: a fresh tmpfs of that size (a real filesystem that fills up); skips where mounting is not
    permitted (not root, no CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(d)],
                                  capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command: the disk-full tests mount a small tmpfs")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()}); the disk-full tests need root")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(fs: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of ``fs`` with one file (removed again to free the space)."""
    st = os.statvfs(fs)
    filler = fs / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def _cli_in_process(*args: str) -> tuple[int, str]:
    """Run ``qpissa ARGS`` in this process; (exit code, stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    old = sys.argv
    sys.argv = ["qpissa", *args]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    finally:
        sys.argv = old
    return code, err.getvalue()


def _one_line(err: str, *needles: str) -> str:
    """The one message line (last on stderr; progress bars of datasets/transformers may come before it)."""
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip()]
    said = [x for x in lines if x.startswith(("error:", "interrupted"))]
    assert len(said) == 1 and lines[-1] == said[0] and "Traceback" not in err, err
    for n in needles:
        assert n in said[0], (n, said[0])
    return said[0]


def _parts(out: Path) -> int:
    return len(list((out / ".parts").glob("*.safetensors")))


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(["qpissa", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before {what}: {proc.stderr.read()}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.005)


# ----------------------------------------------------------------------------- a full disk

def test_expected_size_is_the_real_output_size(tiny_llama, reference):
    """The up-front estimate against the bytes a finished run wrote (within 3%; it errs on the large side)."""
    from qpissa.atomic import size_of
    from qpissa.decompose.config import DecomposeConfig
    from qpissa.decompose.output import expected_bytes
    from qpissa.decompose.targets import find_targets
    from qpissa.formats import scan_checkpoint

    tensors = scan_checkpoint(tiny_llama)
    targets = find_targets(tiny_llama, tensors, None)[0]
    expected, real = expected_bytes(tiny_llama, tensors, targets, DecomposeConfig(rank=4)), size_of(reference)
    assert real <= expected <= 1.03 * real, (expected, real)


def test_decompose_refuses_up_front_when_the_output_cannot_fit(tiny_llama, small_fs):
    fs = small_fs(1024)
    code, err = _cli_in_process("decompose", str(tiny_llama), "-o", str(fs / "a" / "out"), *DECOMPOSE)
    assert code == 2
    _one_line(err, "error: output", "needs about", "free on its filesystem", "choose another --output")
    assert list(fs.iterdir()) == []  # no empty OUT (nor its parent) left behind


@pytest.mark.slow
def test_disk_full_mid_run_is_one_line_and_resume_after_freeing_space_is_byte_identical(tiny_llama, reference,
                                                                                          small_fs):
    fs = small_fs(4096)  # the finished output (≈ 2.0 MB) fits, so the up-front check lets it start
    out = fs / "out"
    proc = _start("decompose", str(tiny_llama), "-o", str(out), *DECOMPOSE)
    _wait_for(proc, lambda: _parts(out) >= 1, "a first part")
    proc.send_signal(signal.SIGSTOP)  # while stopped, another writer takes the disk: room for the parts and the
    from qpissa.atomic import size_of  # journal, not for the residual shard, so ENOSPC comes while assembling (a
    # part that fails leaves less than a part free, maybe too little to journal: then nothing is kept, by design)
    filler = _fill(fs, leave=size_of(reference / ".parts") + size_of(reference / "residual") // 2)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    line = _one_line(err, "error: no space left on device writing", "free there", "the rest needs about",
                     "of 28 decomposed tensors", "free space and rerun with --resume")
    kept = len(json.loads((out / "manifest.json").read_text())["tensors"])  # journaled: what --resume reuses
    assert 1 <= kept <= 28 and f"kept {kept} of 28" in line and not (out / "adapter").exists(), (kept, line)
    parts = _parts(out)
    code, err = _cli_in_process("decompose", str(tiny_llama), "-o", str(out), *DECOMPOSE, "--resume")
    assert code == 2  # still full: refused before any work, and what was kept stays
    _one_line(err, "needs about", "free on its filesystem")
    assert _parts(out) == parts
    filler.unlink()
    assert _cli_in_process("decompose", str(tiny_llama), "-o", str(out), *DECOMPOSE, "--resume")[0] == 0
    assert tree_digest(out) == tree_digest(reference)


def test_merge_into_a_full_disk_leaves_no_half_model(tiny_llama, reference, small_fs):
    fs = small_fs(1024)  # the merged bf16 model is ≈ 2.2 MB
    code, err = _cli_in_process("merge", str(reference / "residual"), str(reference / "adapter"),
                                "-o", str(fs / "merged"))
    assert code == 2
    line = _one_line(err, "error: no space left on device writing", "the rest needs about", "nothing kept",
                     "free space and rerun")
    from safetensors import safe_open

    with safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as f:  # the merged model: every weight bf16
        merged = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel") else
                     int(torch.tensor(f.get_slice(k).get_shape()).prod()) for k in f.keys()) * 2
    needs = float(line.split("the rest needs about ")[1].split(" MB")[0]) * 1e6
    assert abs(needs - merged) <= 0.05e6, (needs, merged, line)
    assert list(fs.iterdir()) == []


# ----------------------------------------------------------------------------- a failed start

def test_a_failed_start_leaves_nothing_behind(tiny_llama, reference, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan"  # the targets hold a NaN: found after OUT exists, before anything is kept
    broken.mkdir()
    for p in tiny_llama.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    for name in (k for k in tensors if k.endswith("proj.weight")):  # whichever target comes first
        tensors[name][0, 0] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    for args, needle in ((["decompose", str(broken)], "NaN"), (["decompose", str(tiny_llama), "--rank", "999"], "rank"),
                         (["train", str(reference), "--data", str(tmp_path / "missing.jsonl")], "missing"),
                         (["merge", str(reference / "residual"), str(tmp_path / "no-adapter")], "no-adapter"),
                         (["compare", str(tiny_llama), "--data", "x.jsonl", "--eval-data", "y.jsonl"], "x.jsonl")):
        extra = ["--quiet", "--workers", "1"] if args[0] == "decompose" else []
        code, err = _cli_in_process(*args, "-o", str(tmp_path / "made" / "out"), *extra)
        assert code == 2, (args, err)
        _one_line(err, needle)
        assert not (tmp_path / "made").exists(), args
    empty = tmp_path / "empty"  # a folder the user made stays, empty as it was
    empty.mkdir()
    code, err = _cli_in_process("decompose", str(broken), "-o", str(empty), *DECOMPOSE)
    assert code == 2 and list(empty.iterdir()) == []


# ----------------------------------------------------------------------------- Ctrl-C

@pytest.mark.slow
def test_ctrl_c_during_decompose_says_what_was_kept_and_resume_finishes_identically(tiny_llama, reference, tmp_path):
    out = tmp_path / "out"
    proc = _start("decompose", str(tiny_llama), "-o", str(out), *DECOMPOSE)
    _wait_for(proc, lambda: _parts(out) >= 2, "two parts")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    line = _one_line(err, "interrupted: kept", "of 28 decomposed tensors", "rerun with --resume to continue")
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"kept {len(manifest['tensors'])} of 28" in line and len(manifest["tensors"]) >= 1
    assert _cli_in_process("decompose", str(tiny_llama), "-o", str(out), *DECOMPOSE, "--resume")[0] == 0
    assert tree_digest(out) == tree_digest(reference)


@pytest.fixture(scope="module")
def trainable(smollm2_dir, tmp_path_factory) -> Path:
    """A decompose output of a tiny Llama with SmolLM2's tokenizer (train needs one): 2 layers, hidden 64."""
    from qpissa.decompose import decompose

    root = tmp_path_factory.mktemp("trainable")
    decompose(helpers.tiny_llama(root / "model", tokenizer=smollm2_dir), root / "out", rank=4, progress=False)
    return root / "out"


def test_train_checkpoint_into_a_full_disk_is_one_line(trainable, tiny_data, small_fs):
    fs = small_fs(32)  # RUN/config.json and the metrics fit; the first checkpoint (adapter + AdamW) does not
    run = fs / "run"
    code, err = _cli_in_process("train", str(trainable), "--data", str(tiny_data), "-o", str(run), "--steps", "3",
                                "--save-every", "1", "--batch-size", "1", "--max-length", "128", "--no-progress")
    assert code == 2, err
    _one_line(err, "error: no space left on device writing", "the rest needs about", "no checkpoint yet",
              "free space and rerun with --resume")
    assert not list(run.glob("checkpoint-*")) and not list(run.glob(".checkpoint-*"))  # no half checkpoint


@pytest.mark.slow
def test_ctrl_c_during_train_names_the_checkpoint_to_resume_from(trainable, tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = _start("train", str(trainable), "--data", str(tiny_data), "-o", str(run), "--steps", "500",
                  "--save-every", "2", "--batch-size", "1", "--max-length", "128", "--no-progress")
    _wait_for(proc, lambda: (run / "checkpoint-2" / "trainer_state.pt").exists(), "checkpoint-2")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    line = _one_line(err, "interrupted: kept checkpoint-", "rerun with --resume to continue")
    step = max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert f"checkpoint-{step} (--resume continues from step {step})" in line
