"""``qpissa train --task classification``: the loop for a sequence-classification head, top to bottom.

Model: :mod:`qpissa.train.classifier_model` (4-bit body frozen, adapter + new head trainable; or LoRA / full).
Per optimizer step (the same recipe as the causal loop, :mod:`qpissa.train.loop`):
  loss   = mean over the step's rows of CE(logits, label)   (MSE for --num-labels 1, regression)
  clip   ‖g‖₂ ≤ max_grad_norm;  θ ← AdamW(θ, g, η_t), η_t warmup + cosine/linear/constant decay
Held-out (``--eval-data``, every ``--eval-every`` steps and at the end): loss and accuracy / macro-F1 /
Matthews (Pearson / Spearman for regression) in RUN/metrics.jsonl. The final RUN/adapter holds the trained
factors and the head (``modules_to_save``); RUN/config.json records the options and the label map
(``id2label``), which ``qpissa eval --task classification`` reads back. One process; no mid-run checkpoints
(a run of an encoder this size takes minutes on a CPU): ``--resume`` of a finished run returns its summary.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpissa import distributed
from qpissa.atomic import write_json
from qpissa.classify import Labels, check_rows, collate, encode, infer_labels, predict, scores, text_fields
from qpissa.data import epoch_order, load_records
from qpissa.errors import UserError
from qpissa.train.config import TrainConfig, TrainingDiverged
from qpissa.train.metrics import memory_mb
from qpissa.train.optim import lr_factor, make_optimizer


def run_labels(run: Path) -> tuple[Labels, dict[str, Any]]:
    """The head of a finished classification run (its label map) and its RUN/config.json."""
    try:
        saved = json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{run}: no readable config.json of a `qpissa train --task classification` run") from None
    if saved.get("task") != "classification":
        raise UserError(f"{run}: a {saved.get('task', 'causal-lm')} run; --task classification evaluates runs "
                        "trained with --task classification")
    id2label = {int(k): v for k, v in (saved.get("id2label") or {}).items()} or None
    return Labels(int(saved["num_labels"]), id2label, bool(saved.get("labels_from_strings"))), saved


def train_classifier(cfg: TrainConfig) -> dict[str, Any]:
    """Train (see the module docstring); returns the summary written to RUN/summary.json."""
    from qpissa.train.classifier_model import load_classifier

    run = Path(cfg.output)
    if distributed.detect().world_size > 1:
        raise UserError("--task classification runs in one process; start it without torchrun")
    if cfg.sorsa_gamma > 0 or cfg.kernels != "none" or cfg.data_cfg.packing or cfg.report_to != "none":
        raise UserError("--sorsa-gamma, --kernels, --packing and --report-to apply to --task causal-lm only "
                        "(classification metrics are in RUN/metrics.jsonl)")
    if (run / "summary.json").exists():
        done = json.loads((run / "summary.json").read_text())
        if cfg.resume and "adapter" in done:
            return done  # finished: nothing to resume
        if not cfg.resume:
            raise UserError(f"{run} already holds a finished run; choose a new --output")
    records = load_records(cfg.data, cfg.data_split, cfg.data_config, cfg.data_limit)  # one line before weights
    text, pair = text_fields(records[0], cfg.text_field, cfg.text_pair_field, str(cfg.data))
    labels = infer_labels(records, cfg.label_field, cfg.num_labels, str(cfg.data))
    eval_records = (load_records(cfg.eval_data, cfg.eval_split, cfg.data_config,
                                 flags=("--eval-split", "--data-config"))[:cfg.eval_examples] if cfg.eval_data else [])
    check_rows(records, text, pair, cfg.label_field, labels, str(cfg.data))
    if eval_records:
        check_rows(eval_records, text, pair, cfg.label_field, labels, str(cfg.eval_data))
    cfg = replace(cfg, text_field=text, text_pair_field=pair, num_labels=labels.num_labels)
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    model, tokenizer = load_classifier(cfg, labels)
    max_len = cfg.data_cfg.max_length
    rows = encode(records, tokenizer, text, pair, cfg.label_field, labels, max_len, str(cfg.data))
    held = (encode(eval_records, tokenizer, text, pair, cfg.label_field, labels, max_len, str(cfg.eval_data))
            if eval_records else [])
    return fit_classifier(cfg, labels, model, tokenizer, rows, held)


def fit_classifier(cfg: TrainConfig, labels: Labels, model, tokenizer, rows, held) -> dict[str, Any]:
    """The loop proper on a loaded model and encoded rows."""
    from qpissa.train.checkpoint import save_final

    run = Path(cfg.output)
    full = cfg.method == "full"
    params = [p for p in model.parameters() if p.requires_grad]
    per_step = cfg.batch_size * cfg.grad_accum
    if len(rows) < cfg.batch_size:
        raise UserError(f"only {len(rows)} training rows for --batch-size {cfg.batch_size}; lower it or add data")
    total = cfg.steps or max(1, int(cfg.epochs * len(rows) // per_step))
    warmup = int(round(cfg.warmup_ratio * total))
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(t, total, warmup, cfg.schedule))
    device = cfg.device
    config_dict = {**asdict(cfg), "id2label": labels.id2label, "labels_from_strings": labels.from_strings}
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "config.json", config_dict)
    metrics_path = run / "metrics.jsonl"
    metrics_path.write_text("")
    history: list[dict[str, Any]] = []
    gold = [r.label for r in held]

    def log(row: dict[str, Any]) -> None:
        history.append(row)
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def evaluate(row: dict[str, Any]) -> None:
        preds, _, loss = predict(model, held, tokenizer, labels, cfg.batch_size, device, cfg.precision)
        row["eval_loss"] = loss
        row.update({f"eval_{k}": v for k, v in scores(preds, gold, labels).items()})

    if held and cfg.eval_at_start:
        start = {"step": 0}
        evaluate(start)
        log(start)
    autocast = dict(device_type=device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    epoch, index, step, seen, tokens, elapsed = 0, 0, 0, 0, 0, 0.0
    order = epoch_order(len(rows), cfg.seed, epoch)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    while step < total:
        t0 = time.perf_counter()
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            if index + cfg.batch_size > len(order):
                epoch, index = epoch + 1, 0
                order = epoch_order(len(rows), cfg.seed, epoch)
            chunk = [rows[j] for j in order[index:index + cfg.batch_size]]
            index += cfg.batch_size
            batch = {k: v.to(device) for k, v in collate(chunk, tokenizer, labels.regression).items()}
            with torch.autocast(**autocast):
                out = model(**batch)  # out.loss: mean CE (or MSE) over the micro-batch
            loss = out.loss.float() / cfg.grad_accum
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {float(out.loss)} at step {step + 1}; lower --lr or check the data")
            loss.backward()
            loss_sum += float(loss.detach())
            seen += len(chunk)
            tokens += int(batch["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        dt = time.perf_counter() - t0
        elapsed += dt
        row = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm), "examples": seen,
               "tokens": tokens, "step_s": dt, "memory_mb": memory_mb(device), "epoch": epoch}
        if held and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
            evaluate(row)
        log(row)
        if cfg.progress and (step % 10 == 0 or step == total):
            extra = "".join(f"  {k} {v:.4f}" for k, v in row.items() if k in ("eval_loss", "eval_accuracy", "eval_pearson"))
            print(f"train {step}/{total}  loss {loss_sum:.4f}  lr {lr:.2e}{extra}", file=sys.stderr, flush=True)
    final = save_final(run, model, cfg.save_dtype, full)
    if full:
        tokenizer.save_pretrained(final)  # RUN/model is a standalone checkpoint
    from qpissa.train.metrics import plot_losses

    plot_losses(run, history)
    last_eval = next((r for r in reversed(history) if "eval_loss" in r), {})
    summary = {"run": str(run), "task": "classification", "steps": step, "total_steps": total,
               "train_loss": history[-1]["loss"], "eval_loss": last_eval.get("eval_loss"),
               **{k: v for k, v in last_eval.items() if k.startswith("eval_") and k != "eval_loss"},
               "examples": seen, "tokens": tokens, "elapsed_s": elapsed, "checkpoint": None, "adapter": str(final)}
    write_json(run / "summary.json", summary)
    return summary
