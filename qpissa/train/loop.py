"""The training recipe: one loop for every method, readable top to bottom.

Model (the only thing that differs between methods):
  from-out  OUT/residual (frozen; NF4 Linear4bit for QLoRA/LoftQ/QPiSSA, plain for PiSSA/LoRA)
            + OUT/adapter as trainable PEFT LoRA factors — what ``qpissa decompose`` wrote.
  lora      an unquantized HF checkpoint + a fresh PEFT LoRA (Kaiming A, B = 0; Hu et al. 2021).
  full      an unquantized HF checkpoint, every parameter trainable, fp32 master weights.

Per optimizer step (PiSSA recipe, Meng et al. 2024: AdamW, cosine schedule, 3% warmup, lr 2e-5):
  loss   = Σ_micro Σ_response-tokens CE / N_response-tokens   (token-weighted over grad-accum)
  clip   ‖g‖₂ ≤ max_grad_norm;  θ ← AdamW(θ, g, η_t)
  SORSA  θ ← θ − η_t·(γ/η_max)·∇R(θ)  (qpissa.train.sorsa, only when --sorsa-gamma > 0)
  η_t    = η_max · t/W during warmup, then η_max · ½(1 + cos(π·(t−W)/(T−W)))

Precision: trainable adapter factors are fp32 master weights (PEFT upcasts the bf16 files on load),
the forward/backward runs under bf16 autocast (CPU and CUDA; measured 1.6× faster than fp32 on
2 CPU cores for SmolLM2-135M), the frozen base stays as stored (NF4 bytes / bf16). Checkpoints and the
final adapter are saved in fp32 by default (bit-exact resume; rounding PiSSA factors to bf16 would
erase updates smaller than 2⁻⁸ of their magnitude); ``--save-dtype bfloat16`` halves the file.

Several processes (``torchrun --nproc_per_node N --no-python qpissa train ...``; data parallel):
every rank loads the same init (then takes rank 0's trainable weights) and draws the same global
micro-batch of ``batch_size × N`` examples from the shared data order; rank r trains on rows
[r·B, (r+1)·B). Each rank scales its summed CE by the GLOBAL response-token count of the step (known
on every rank, since each sees the whole global batch), so the all-reduced SUM of gradients is the
single-process gradient of that global batch: one step equals a single process with
``--batch-size B×N``. Clipping, AdamW and SORSA then run identically on every rank; only rank 0
writes metrics, checkpoints and the final adapter. Gradients are all-reduced by hand (no
DistributedDataParallel wrapper: the PEFT model and its save/load paths stay untouched). Process
group: gloo on CPU, nccl with ``--device cuda`` (rank on ``cuda:LOCAL_RANK``), see qpissa.distributed.
With ``--fsdp`` the same batches and loss scaling run on a model sharded by FSDP2 (qpissa.train.fsdp):
gradients are reduce-scattered sums, every rank runs every forward/backward (and evaluation), checkpoints
are collective (qpissa.train.fsdp_checkpoint).
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
from qpissa.data import Example, build_examples, load_records, resolve_template
from qpissa.errors import UserError
from qpissa.usage import require_causal_lm
from qpissa.train import checkpoint as ckpt_lib
from qpissa.train import fsdp
from qpissa.train import fsdp_checkpoint as fsdp_ckpt
from qpissa.train import trackers
from qpissa.train.config import TrainConfig, TrainingDiverged
from qpissa.train.gradsync import all_reduce_sum, reduce_values, sync_from_rank0
from qpissa.train.metrics import evaluate_loss, memory_mb, plot_losses
from qpissa.train.model import load_model
from qpissa.train.optim import lr_factor, make_optimizer
from qpissa.train.sorsa import adapter_pairs, sorsa_step
from qpissa.train.task import CausalTask, ClassificationTask, Task

__all__ = ["TrainConfig", "TrainingDiverged", "evaluate_loss", "fit", "load_model", "train"]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns a summary with the final losses and the adapter path.

    Under torchrun this process joins the group (gloo on CPU, nccl on CUDA) for the whole run.
    """
    from qpissa.devices import resolve_device

    cfg = replace(cfg, device=resolve_device(cfg.device))  # auto → cuda when available; cuda without a GPU: error
    if cfg.device not in ("cpu", "cuda"):
        raise UserError(f"--device {cfg.device}: train takes cpu or cuda (under torchrun each rank uses its LOCAL_RANK)")
    if cfg.fsdp:
        fsdp.require_launch()
    from qpissa.atomic import output_folder

    with output_folder(cfg.output, "rerun with --resume", remove=distributed.detect().is_main) as guard:
        guard.kept, guard.needs = (lambda: ckpt_lib.kept(Path(cfg.output))), (lambda: ckpt_lib.bytes_needed(cfg))
        with distributed.session(cfg.device, always=cfg.fsdp):
            return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise UserError("--batch-size and --grad-accum must be at least 1")
    trackers.require(cfg.report_to)  # a missing tensorboard/wandb: one line before any data or weights are read
    if (done := ckpt_lib.check_output(cfg)) is not None:  # a finished run resumed: nothing to do
        return done
    if cfg.task == "classification":
        from qpissa.train.classifier import prepare_classification

        cfg, model, tokenizer, task = prepare_classification(cfg)
        return fit(cfg, model, tokenizer, [], [], task=task)
    if cfg.objective != "sft":  # dpo / simpo: preference pairs on the same loop (qpissa.train.preference_data)
        from qpissa.train.preference_data import prepare_preference

        cfg, model, tokenizer, task = prepare_preference(cfg)
        return fit(cfg, model, tokenizer, [], [], task=task)
    kind_dir = Path(cfg.model) / "residual" if cfg.method == "from-out" else Path(cfg.model)
    if (kind_dir / "config.json").exists():
        require_causal_lm(kind_dir, "train")  # an encoder: one line before any data or weights are read
    records = load_records(cfg.data, cfg.data_split, cfg.data_config, cfg.data_limit)  # fail fast, before weights
    eval_records = (load_records(cfg.eval_data, cfg.eval_split, cfg.data_config,
                                 flags=("--eval-split", "--data-config")) if cfg.eval_data else [])
    data_cfg, note = resolve_template(cfg.data_cfg, records, source=str(cfg.data))  # chat data → --template chat
    if note and distributed.detect().is_main:
        print(note, file=sys.stderr)
    cfg = replace(cfg, data_cfg=data_cfg)  # RUN/config.json records the template used (eval prompts with it)
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    model, tokenizer = load_model(cfg)
    if cfg.fsdp:  # the NF4 residual, adapters, grads and AdamW states sharded per block (qpissa.train.fsdp)
        model = fsdp.shard(model, cfg.device, cfg.fsdp_offload)
    examples = build_examples(records, tokenizer, cfg.data_cfg, source=str(cfg.data))
    eval_examples = (build_examples(eval_records[:cfg.eval_examples], tokenizer, cfg.data_cfg,
                                    source=str(cfg.eval_data)) if eval_records else [])
    return fit(cfg, model, tokenizer, examples, eval_examples)


def fit(cfg: TrainConfig, model, tokenizer, examples: list[Example], eval_examples: list[Example],
        task: Task | None = None) -> dict[str, Any]:
    """The loop proper, on an already loaded model and tokenized examples (see :func:`train`); ``task`` (default:
    the causal LM on ``examples``) supplies the batches, the loss units and the held-out metrics."""
    task = task or CausalTask(examples, eval_examples, tokenizer.pad_token_id, cfg.batch_size, cfg.precision)
    run = Path(cfg.output)
    existing = ckpt_lib.list_checkpoints(run) if cfg.resume else []
    full = cfg.method == "full"
    if full:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"{cfg.model}: no trainable parameters (adapter not marked trainable)")
    d = distributed.detect()
    device = distributed.rank_device(cfg.device, d)  # cuda:LOCAL_RANK under torchrun
    if not cfg.fsdp:  # FSDP shards hold rank 0's values already (every rank loaded the same files)
        sync_from_rank0(params, d)
    per_step = cfg.batch_size * d.world_size * cfg.grad_accum  # examples per optimizer step (global)
    total = cfg.steps or max(1, int(cfg.epochs * len(task) // per_step))  # examples, rows or pairs
    warmup = int(round(cfg.warmup_ratio * total))
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(t, total, warmup, cfg.schedule))
    pairs = adapter_pairs(model) if cfg.sorsa_gamma > 0 else []
    if cfg.sorsa_gamma > 0 and not pairs:
        raise UserError("--sorsa-gamma needs LoRA adapter factors; it does not apply to --method full")
    if any(float(b.detach().abs().max()) == 0.0 for _, b in pairs):
        raise UserError(f"--sorsa-gamma needs PiSSA/QPiSSA-initialized adapters: {cfg.model} has zero lora_B "
                        "factors (LoRA/QLoRA init), whose singular vectors are undefined")

    state = ckpt_lib.TrainState()
    config_dict = {**asdict(cfg), **task.config_extra}  # classification: the label map eval reads back
    if hasattr(task, "prepare"):  # dpo: the reference (the STARTING policy) before a checkpoint is loaded
        task.prepare(model, run, device, d.is_main)
    if existing:
        state = (fsdp_ckpt.load_checkpoint(existing[-1][1], model, optimizer, scheduler) if cfg.fsdp else
                 ckpt_lib.load_checkpoint(existing[-1][1], model, optimizer, scheduler, full))
    run.mkdir(parents=True, exist_ok=True)
    metrics_path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    rows = [r for r in rows if r["step"] <= state.step]  # drop steps logged after the resumed checkpoint
    from qpissa.atomic import write_json

    if d.is_main:  # only rank 0 writes into RUN
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_json(run / "config.json", config_dict)
    tracker = trackers.start(cfg.report_to if d.is_main else "none", run, config_dict, state.step)

    shard = slice(d.rank * cfg.batch_size, (d.rank + 1) * cfg.batch_size)  # this rank's rows of a global batch
    stream = task.stream(cfg.batch_size * d.world_size, cfg.seed, state.pos)
    autocast = dict(device_type=cfg.device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    last_good = existing[-1][1] if existing else None
    stop_at = min(total, cfg.stop_after or total)
    model.train()
    model.zero_grad(set_to_none=True)

    def log(row: dict[str, Any]) -> None:
        rows.append(row)
        if not d.is_main:
            return
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        tracker.log(row, row["step"])  # --report-to tensorboard|wandb

    def diverged(what: str) -> None:
        if d.is_main:
            plot_losses(run, rows)
        where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
        raise TrainingDiverged(f"{what} at step {state.step + 1}; training stopped ({where}); lower --lr or check "
                               "the data")

    def save() -> Path:
        if cfg.fsdp:  # collective: every rank writes its shards
            return fsdp_ckpt.save_checkpoint(run, model, optimizer, scheduler, state, config_dict, cfg.keep_last, d)
        if not d.is_main:
            return run / f"checkpoint-{state.step}"  # rank 0 writes it
        return ckpt_lib.save_checkpoint(run, model, optimizer, scheduler, state, config_dict, cfg.keep_last, full)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    from rich.console import Console

    with tracker, Progress(*columns, disable=not (cfg.progress and d.is_main), console=Console(stderr=True)) as bar:
        bar_task = bar.add_task("train", total=total, completed=state.step, info="")
        if (d.is_main or cfg.fsdp) and cfg.eval_at_start and task.has_eval() and not any(r["step"] == 0 for r in rows):
            log({"step": 0, **task.evaluate(model, device), "tokens": 0})  # the initialization's loss
        while state.step < stop_at:
            t0 = time.perf_counter()
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            n_step = sum(task.units(b) for b, _ in micro)  # the step's loss units: response tokens or rows
            loss_sum, stats = 0.0, {}
            forward = getattr(task, "forward", None)  # dpo/simpo: the pair loss; else the model's own loss
            for batch, _ in micro:
                batch = {k: v[shard].to(device) for k, v in batch.items()}  # (B, T) of this rank's rows
                n = task.units(batch)
                if n == 0 and not cfg.fsdp:
                    continue  # no response token in this rank's rows: nothing to add (CE would be 0/0)
                with torch.autocast(**autocast):
                    out = forward(model, batch) if forward else model(**batch)  # out.loss: mean over its units
                # unit-weighted over the whole step; under FSDP every rank runs backward (its collectives)
                loss = out.loss.float() * (n / n_step) if n else out.logits.sum() * 0.0
                if not torch.isfinite(loss):
                    diverged(f"loss became {float(out.loss.detach())}")
                loss.backward()
                loss_sum += float(loss.detach())
                for k, v in getattr(out, "stats", {}).items():  # rewards: unit-weighted like the loss
                    stats[k] = stats.get(k, 0.0) + v * (n / n_step)
                del out, loss  # free the (B, T, V) logits before the next forward
            if cfg.fsdp:  # FSDP reduce-scattered the gradient sums; clip over all shards
                loss_sum, grad_norm = fsdp.reduce_loss(loss_sum, d), fsdp.clip_grad_norm(params, cfg.max_grad_norm)
            else:
                loss_sum = all_reduce_sum(params, loss_sum, d)  # Σ over ranks: the global batch's gradient and loss
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0
                             else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params
                                                                        if p.grad is not None])))
            if not torch.isfinite(grad_norm):
                diverged(f"gradient norm became {float(grad_norm)}")  # before the step: weights stay good
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sorsa_value = sorsa_step(pairs, cfg.sorsa_gamma, lr, cfg.lr) if pairs else None
            scheduler.step()
            state.step += 1
            state.pos = micro[-1][1]
            step_tokens = sum(int(b["attention_mask"].sum()) for b, _ in micro)
            state.tokens += step_tokens
            dt = time.perf_counter() - t0
            state.elapsed_s += dt
            row = {"step": state.step, "loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens": state.tokens, "tokens_per_s": step_tokens / dt, "step_s": dt,
                   "memory_mb": memory_mb(cfg.device), "epoch": state.pos.epoch}
            if sorsa_value is not None:
                row["sorsa_reg"] = sorsa_value
            row.update(reduce_values(stats, d))
            if (d.is_main or cfg.fsdp) and task.has_eval() and ((cfg.eval_every and state.step % cfg.eval_every == 0)
                                                                or state.step == total):
                row.update(task.evaluate(model, device))
            log(row)
            bar.update(bar_task, completed=state.step, info=(
                f"loss {loss_sum:.4f}  lr {lr:.2e}  {row['tokens_per_s']:.0f} tok/s  {row['memory_mb']:.0f} MiB"
                + (f"  eval {row['eval_loss']:.4f}" if "eval_loss" in row else "")
                + "".join(f"  {k[5:]} {row[k]:.4f}" for k in ("eval_accuracy", "eval_pearson") if k in row)))
            if (cfg.save_every and state.step % cfg.save_every == 0) or state.step == stop_at < total:
                last_good = save()

    if d.is_main:
        plot_losses(run, rows)
    last_eval = next((r for r in reversed(rows) if "eval_loss" in r), {})
    summary: dict[str, Any] = {"run": str(run), **({"task": task.name} if task.name != "causal-lm" else {}),
                               "steps": state.step, "total_steps": total,
                               "train_loss": rows[-1].get("loss") if rows else None,
                               "eval_loss": last_eval.get("eval_loss"),
                               **{k: v for k, v in last_eval.items() if k.startswith("eval_") and k != "eval_loss"},
                               "tokens": state.tokens, "elapsed_s": state.elapsed_s, "checkpoint": str(last_good)}
    if state.step >= total:
        summary["adapter"] = str(run / ("model" if full else "adapter"))
        if cfg.fsdp:
            fsdp_ckpt.save_final(run, model, cfg.save_dtype, d)
        elif d.is_main:
            final = ckpt_lib.save_final(run, model, cfg.save_dtype, full)
            if full:
                tokenizer.save_pretrained(final)  # RUN/model is a standalone checkpoint
    if d.is_main:
        write_json(run / "summary.json", summary)
    return distributed.broadcast(d, summary)  # every rank returns rank 0's summary (its eval loss included)
