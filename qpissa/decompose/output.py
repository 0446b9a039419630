"""OUT before and after the run: the checks that come first, what resumes, the space the output will take.

``prepare`` checks MODEL/OUT and takes OUT's lock; ``expected_bytes`` is the size of a finished OUT from the
shapes alone (``check_space`` refuses a run that cannot fit before any tensor is read); ``kept`` says how much
of an interrupted run ``--resume`` reuses (:func:`qpissa.atomic.output_folder` prints it).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from qpissa.atomic import free_bytes, mb, size_of
from qpissa.errors import UserError
from qpissa.formats import INDEX_NAME, WEIGHT_SUFFIXES, TensorInfo, byte_size, is_within
from qpissa.lock import LOCK_NAME, OutputLock
from qpissa.decompose.config import DecomposeConfig
from qpissa.decompose.experts import ExpertTarget
from qpissa.decompose.methods import QUANTIZED_METHODS
from qpissa.decompose.sharding import known_parts
from qpissa.decompose.targets import Target

OUTPUTS = ("residual", "adapter", ".parts", "manifest.json", "report.json", "report.csv", "report.md",
           "error_by_layer.png")
SAFETENSORS_HEADER = 160  # bytes of safetensors header per tensor entry (name, dtype, shape, offsets), about
REPORT_BYTES = 64_000  # error_by_layer.png, config.yaml, the reports' fixed part (a 2-layer model: 45 KB)
PER_TARGET_BYTES = 5_000  # one target's manifest and report rows (3.7 KB) and safetensors headers (1.3 KB)


def prepare(model_dir: Path, out_dir: Path, cfg: DecomposeConfig, wipe: bool = True,
            lock: OutputLock | None = None) -> dict | None:
    """Check MODEL/OUT, take OUT's lock (``lock``: the writing process); return the manifest to resume from,
    if any (``wipe``: this process clears for --overwrite)."""
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist or is not a directory")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no config.json; pass a Hugging Face model directory")
    if is_within(out_dir, model_dir):
        raise UserError(f"output {out_dir} is the model directory or inside it; choose a separate folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory")
    if lock is not None:
        lock.acquire()  # before any wipe: a concurrent run's files are never touched
    manifest_path = out_dir / "manifest.json"
    if cfg.overwrite:
        for name in OUTPUTS if wipe else ():
            p = out_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return None
    if cfg.resume and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("arguments") != cfg.identity() or manifest.get("model") != str(model_dir.resolve()):
            raise UserError(f"{manifest_path}: --resume with different arguments or model than the interrupted "
                            "run; repeat its arguments or use --overwrite")
        return manifest
    if out_dir.exists() and any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        if cfg.resume:
            raise UserError(f"output {out_dir} has no manifest.json, so there is no interrupted run to resume there; "
                            "choose a new or empty folder, or pass --overwrite to replace it")
        raise UserError(f"output {out_dir} is not empty; pass --resume to continue or --overwrite to replace")
    return None


def nf4_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Bytes bitsandbytes stores for one NF4 weight: packed codes, absmax (nested: uint8 + second level), code."""
    blocks = math.ceil(numel / blocksize)
    absmax = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + absmax + 4 * 16 + 256  # + the quant-state JSON tensor


def expected_bytes(model_dir: Path, tensors: list[TensorInfo], targets: list[Target], cfg: DecomposeConfig) -> int:
    """Size of a finished OUT: every target's residual twice (OUT/.parts, OUT/residual) and its factors twice
    (.parts, OUT/adapter), the other tensors once (OUT/residual), the side files, reports and manifest."""
    adapter_bytes = byte_size((1,), getattr(torch, cfg.adapter_dtype))
    quantized = cfg.method in QUANTIZED_METHODS
    total, covered = 0, set()
    for t in targets:
        m, n = t.shape
        sources = getattr(t, "sources", (t.weight,))
        plain = not quantized or (isinstance(t, ExpertTarget) and cfg.experts_dtype == "bfloat16")
        residual = byte_size((m, n), sources[0].dtype) if plain else nf4_bytes(m * n, cfg.blocksize, cfg.double_quant)
        total += 2 * residual + 2 * cfg.rank * (m + n) * adapter_bytes + PER_TARGET_BYTES
        covered.update(s.name for s in sources)
    total += sum(byte_size(t.shape, t.dtype) + SAFETENSORS_HEADER for t in tensors if t.name not in covered)
    side = [p for p in model_dir.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
            and p.name != INDEX_NAME and not p.name.startswith(".")]
    return total + sum(p.stat().st_size for p in side) + REPORT_BYTES


def check_space(out_dir: Path, expected: int) -> None:
    """Refuse, before any tensor is read, a run whose output cannot fit (a resume counts what OUT holds)."""
    needs, free = expected - size_of(out_dir), free_bytes(out_dir)
    if needs > free:
        raise UserError(f"output {out_dir} needs about {mb(needs)} more ({mb(expected)} when finished) but only "
                        f"{mb(free)} is free on its filesystem; free space or choose another --output")


def kept(out_dir: Path, total: int | None = None) -> str | None:
    """What ``--resume`` reuses of an interrupted run: its journaled tensors, in manifest.json or (under torchrun)
    the ranks' fragments (None: nothing yet)."""
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("status") == "complete":
        return "the finished decomposition"
    done = [e for e in known_parts(out_dir).values() if (out_dir / ".parts" / e.get("part", "?")).exists()]
    if not done and "curves" not in manifest:
        return None
    curves = f", {len(manifest['curves'])} error curves" if manifest.get("curves") else ""
    return f"{len(done)}{f' of {total}' if total else ''} decomposed tensors{curves}"
