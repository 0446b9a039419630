"""The study driver: methods × seeds × learning rates → decompose once per method, train each cell, evaluate.

Everything goes through the stage functions (:func:`qpissa.decompose.decompose`, :func:`qpissa.train.train`,
:mod:`qpissa.use.evaluate`); there is no second training loop. Layout of STUDY:

    study.json                       the identity (options that define the results), checked on --resume
    decompose/<method>/              one decompose output per method (shared by its seeds and lrs)
    runs/<method>/seed<S>-lr<LR>/    one training run per cell (metrics.jsonl, checkpoints, adapter)
    results.json/.csv, summary.md, curves.png   from the stored runs only (:mod:`qpissa.compare.report`)

Resume at every level: a complete decompose or run is skipped, an interrupted decompose continues from its
manifest, an interrupted run from its newest checkpoint (saved at every held-out evaluation), so a killed
study rerun with ``--resume`` does only what is missing and ends as the uninterrupted one would.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from qpissa.atomic import output_folder, write_json
from qpissa.compare.config import LEGACY_DEFAULTS, TRAIN_ONLY, CompareConfig, MethodSpec
from qpissa.compare.grid import Cell, cells, decompose_dir, run_dir
from qpissa.errors import UserError
from qpissa.lock import LOCK_NAME, OutputLock

STUDY_FILE = "study.json"
REFERENCE_FILE = "reference.json"  # the original model's held-out loss: where every init starts from


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run (or finish, or only report) a study; returns what :func:`qpissa.compare.report.write_outputs` wrote."""
    from qpissa.compare.report import write_outputs

    study = Path(cfg.output)
    if cfg.report:
        if not (study / STUDY_FILE).exists():
            raise UserError(f"{study}: no {STUDY_FILE}; --report regenerates the tables of an existing study")
        return write_outputs(study)
    run_cfg = _check_inputs(cfg)
    with output_folder(study, "rerun with --resume") as guard:
        guard.kept = lambda: _kept(study)
        return _run(study, cfg, run_cfg)


def _kept(study: Path) -> str | None:
    """The decompose outputs and runs a failed or interrupted study leaves (each stage removes its own when it
    failed before keeping anything), or None."""
    made = [len(list((study / sub).glob(pattern))) for sub, pattern in (("decompose", "*"), ("runs", "*/*"))]
    return f"{made[0]} decompose outputs and {made[1]} runs" if any(made) else None


def _run(study: Path, cfg: CompareConfig, run_cfg: CompareConfig) -> dict[str, Any]:
    from qpissa.compare.report import write_outputs

    lock = OutputLock(study, command="qpissa compare")
    study.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    try:
        _check_study(study, cfg)
        write_json(study / STUDY_FILE, {"identity": cfg.identity(), "grid": {
            "methods": [s.label for s in cfg.specs()], "seeds": cfg.seed_list(), "lrs": cfg.lrs()}})
        cfg = run_cfg  # the model as a local folder (a hub id resolved to its snapshot); identity written above
        grid = cells(cfg)
        to_decompose = [s for s in cfg.specs() if s.name not in TRAIN_ONLY]
        total = len(to_decompose) + len(grid) * (2 if cfg.task != "none" else 1)
        done = 0
        for spec in to_decompose:
            done += 1
            _say(f"[{done}/{total}] decompose {spec.label}")
            _decompose(study, spec, cfg)
        if (cfg.eval_every > 0 and cfg.task != "classification" and cfg.objective == "sft"
                and not (study / REFERENCE_FILE).exists()):
            _say(f"[{done}/{total}] held-out loss of the original model")
            write_json(study / REFERENCE_FILE, _reference(cfg))
        first = {c.spec: c for c in reversed(grid)}  # a method's init is the same in every cell: measure it once
        for cell in grid:
            done += 1
            _say(f"[{done}/{total}] train {cell.spec.label} seed {cell.seed} lr {cell.lr:g}")
            _train(study, cell, cfg, eval_at_start=first[cell.spec] == cell and cfg.eval_every > 0)
        if cfg.task in ("gsm8k", "classification"):
            for cell in grid:
                done += 1
                _say(f"[{done}/{total}] {cfg.task} {cell.spec.label} seed {cell.seed} lr {cell.lr:g}")
                (_gsm8k if cfg.task == "gsm8k" else _classification)(study, cell, cfg)
        return write_outputs(study)
    finally:
        lock.release()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _check_inputs(cfg: CompareConfig) -> CompareConfig:
    """One line before any work: the model is a causal LM (a hub id is fetched), the data read. Returns ``cfg``
    with the model's local folder."""
    from dataclasses import replace

    from qpissa.data import load_records
    from qpissa.decompose import DecomposeConfig
    from qpissa.hub import resolve_model
    from qpissa.train import TrainConfig
    from qpissa.usage import require_causal_lm

    model = resolve_model(cfg.model)
    if not (model / "config.json").is_file():
        raise UserError(f"model {model}: no config.json; pass a Hugging Face model directory")
    if cfg.task != "classification":
        require_causal_lm(model, "compare")
    load_records(cfg.data, TrainConfig.data_split, cfg.data_config)
    load_records(cfg.eval_data, TrainConfig.eval_split, cfg.data_config)  # the split train's held-out loss reads
    if any(s.calibrated for s in cfg.specs()) or cfg.init_kl:
        load_records(cfg.calibration(), DecomposeConfig.calib_split, cfg.data_config)
    return replace(cfg, model=str(model))


def _check_study(study: Path, cfg: CompareConfig) -> None:
    """A new/empty folder, or (with --resume) the same study; never touch another configuration's files."""
    path = study / STUDY_FILE
    if path.exists():
        stored, now = json.loads(path.read_text())["identity"], cfg.identity()
        diff = sorted(k for k in set(stored) | set(now) if stored.get(k, _default(k)) != now.get(k, _default(k)))
        if diff:
            raise UserError(f"{study} holds a study with other options (differs in: {', '.join(diff)}); repeat its "
                            "options with --resume, or choose a new -o")
        if not cfg.resume:
            raise UserError(f"{study} already holds this study; pass --resume to finish it or --report to "
                            "regenerate its tables")
    elif any(p.name != LOCK_NAME for p in study.iterdir()):
        raise UserError(f"{study} is not empty and holds no {STUDY_FILE}; choose a new or empty folder")


def _default(name: str) -> Any:
    """What a study stored before that option existed was computed with: the field's default, or the old behaviour
    where the default changed since (:data:`qpissa.compare.config.LEGACY_DEFAULTS`)."""
    if name in LEGACY_DEFAULTS:
        return LEGACY_DEFAULTS[name]
    f = next((f for f in fields(CompareConfig) if f.name == name), None)
    return None if f is None or f.default is MISSING else f.default


def _complete_decompose(out: Path) -> bool:
    manifest = out / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("status") == "complete"


def _decompose(study: Path, spec: MethodSpec, cfg: CompareConfig) -> None:
    from qpissa.decompose import DecomposeConfig, decompose

    out = decompose_dir(study, spec)
    if not _complete_decompose(out):
        has_manifest = (out / "manifest.json").exists()
        if out.exists() and not has_manifest:
            shutil.rmtree(out)  # killed before its manifest: nothing in it to keep
        decompose(cfg.model, out, DecomposeConfig(
            method=spec.name, rank=cfg.rank, iters=spec.iters, targets=cfg.targets,
            rank_allocation=spec.allocation, balance_factors=spec.balance,
            calib_data=cfg.calibration() if spec.calibrated else None, calib_samples=cfg.calib_samples,
            calib_seq_len=cfg.calib_seq_len, calib_template=cfg.template, calib_config=cfg.data_config,
            loftq_baseline=False,
            device=cfg.device, progress=cfg.progress, resume=has_manifest))
    if cfg.init_kl and not (out / "init_kl.json").exists():
        write_json(out / "init_kl.json", _init_kl(out, cfg))


def _init_kl(out: Path, cfg: CompareConfig) -> dict[str, Any]:
    """KL(original ‖ initialized) on the held-out calibration sequences (the same ones for every method)."""
    from qpissa.decompose import DecomposeConfig
    from qpissa.decompose.calibration import held_out
    from qpissa.decompose.fidelity import model_fidelity
    from qpissa.devices import resolve_device

    probe = DecomposeConfig(calib_data=cfg.calibration(), calib_samples=cfg.calib_samples,
                            calib_seq_len=cfg.calib_seq_len, calib_template=cfg.template,
                            calib_config=cfg.data_config, calib_holdout=max(cfg.init_kl, DecomposeConfig.calib_holdout))
    sequences = held_out(Path(cfg.model), probe)[:cfg.init_kl]
    return model_fidelity(Path(cfg.model), out, sequences, resolve_device(cfg.device))


def _reference(cfg: CompareConfig) -> dict[str, Any]:
    """Held-out loss of the original model (LoRA with B = 0 computes exactly the original function)."""
    from qpissa.data import DataConfig, build_examples, load_records
    from qpissa.devices import resolve_device
    from qpissa.train import TrainConfig
    from qpissa.train.metrics import evaluate_loss
    from qpissa.train.model import load_model

    device = resolve_device(cfg.device)
    tcfg = TrainConfig(model=cfg.model, method="lora", data=cfg.data, data_config=cfg.data_config, output="",
                       lora_rank=cfg.rank, device=device,
                       precision=cfg.precision, data_cfg=DataConfig(template=cfg.template, max_length=cfg.max_length,
                                                                    skip_long_prompts=cfg.skip_long_prompts))
    model, tokenizer = load_model(tcfg)
    records = load_records(cfg.eval_data, tcfg.eval_split, cfg.data_config)[:cfg.eval_examples]  # the rows train's eval loss reads
    examples = build_examples(records, tokenizer, tcfg.data_cfg, source=cfg.eval_data)
    loss = evaluate_loss(model, examples, cfg.batch_size, tokenizer.pad_token_id, device, cfg.precision)
    return {"eval_loss": loss, "examples": len(examples)}


def _train(study: Path, cell: Cell, cfg: CompareConfig, eval_at_start: bool) -> None:
    from qpissa.data import DataConfig
    from qpissa.devices import resolve_device
    from qpissa.train import TrainConfig, train
    from qpissa.train.metrics import reset_peak_memory

    run = run_dir(study, cell)
    summary = run / "summary.json"
    if summary.exists() and "adapter" in json.loads(summary.read_text()):
        return  # complete
    baseline = cell.spec.name in TRAIN_ONLY  # lora, full: on the original checkpoint
    reset_peak_memory(resolve_device(cfg.device))  # each run's peak, not the study process's
    train(TrainConfig(
        model=cfg.model if baseline else str(decompose_dir(study, cell.spec)),
        method=cell.spec.name if baseline else "from-out", task="classification" if cfg.task == "classification"
        else "causal-lm", text_field=cfg.text_field, text_pair_field=cfg.text_pair_field, label_field=cfg.label_field,
        num_labels=cfg.num_labels, objective=cfg.objective, beta=cfg.beta, dpo_loss=cfg.dpo_loss,
        reference=cfg.reference, max_prompt_length=cfg.max_prompt_length, data_config=cfg.data_config, data=cfg.data, data_limit=cfg.data_limit, eval_data=cfg.eval_data, output=str(run), steps=cfg.steps, batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, lr=cell.lr, schedule=cfg.schedule, warmup_ratio=cfg.warmup_ratio,
        lora_rank=cfg.rank, data_cfg=DataConfig(template=cfg.template, max_length=cfg.max_length,
                                                skip_long_prompts=cfg.skip_long_prompts),
        eval_every=cfg.eval_every, eval_examples=cfg.eval_examples, eval_at_start=eval_at_start,
        save_every=cfg.eval_every or cfg.steps, keep_last=1, resume=True, seed=cell.seed, device=cfg.device,
        precision=cfg.precision, progress=cfg.progress))


def _gsm8k(study: Path, cell: Cell, cfg: CompareConfig) -> None:
    from qpissa.devices import resolve_device
    from qpissa.use import evaluate as ev

    out = run_dir(study, cell) / "eval"
    if (out / "gsm8k_summary.json").exists():
        return
    base, adapter = ev.resolve_model(run_dir(study, cell))
    model, tokenizer = ev.load_model(base, adapter, device=resolve_device(cfg.device))
    style, _ = ev.resolve_prompt_style("auto", base, adapter)  # prompt as the run was trained (chat or alpaca)
    gcfg = ev.Gsm8kConfig(limit=cfg.task_limit, batch_size=cfg.task_batch_size, max_new_tokens=cfg.max_new_tokens,
                          prompt_style=style, data_config=cfg.data_config)
    summary, records = ev.evaluate_gsm8k(model, tokenizer, cfg.eval_data, gcfg)
    ev.write_results(out, "gsm8k", summary, records)


def _classification(study: Path, cell: Cell, cfg: CompareConfig) -> None:
    """The run's head scored on all of --eval-data (``qpissa eval --task classification``'s code path)."""
    from qpissa.data import load_records
    from qpissa.devices import resolve_device
    from qpissa.train import TrainConfig
    from qpissa.train.classifier import run_labels
    from qpissa.use import classify_eval as ce
    from qpissa.use import evaluate as ev

    out = run_dir(study, cell) / "eval"
    if (out / "classification_summary.json").exists():
        return
    base, adapter = ev.resolve_model(run_dir(study, cell))
    labels, run_cfg = run_labels(ce.run_of(base, adapter))
    device = resolve_device(cfg.device)
    records = load_records(cfg.eval_data, TrainConfig.eval_split, cfg.data_config, cfg.task_limit)
    model, tokenizer = ce.load_classifier(base, adapter, labels, device)
    summary, rows = ce.evaluate_classification(model, tokenizer, labels, records, run_cfg, ce.ClassificationConfig(),
                                               None, cfg.task_batch_size, device, cfg.eval_data, cfg.data_config)
    ev.write_results(out, "classification", summary, rows)
