"""The training recipe: one loop for every method, readable top to bottom.

Model (the only thing that differs between methods):
  from-out  OUT/residual (frozen; NF4 Linear4bit for QLoRA/LoftQ/QPiSSA, plain for PiSSA/LoRA)
            + OUT/adapter as trainable PEFT LoRA factors — what ``qpissa decompose`` wrote.
  lora      an unquantized HF checkpoint + a fresh PEFT LoRA (Kaiming A, B = 0; Hu et al. 2021).
  full      an unquantized HF checkpoint, every parameter trainable, fp32 master weights.

Per optimizer step (PiSSA recipe, Meng et al. 2024: AdamW, cosine schedule, 3% warmup, lr 2e-5):
  loss   = Σ_micro Σ_response-tokens CE / N_response-tokens   (token-weighted over grad-accum)
  clip   ‖g‖₂ ≤ max_grad_norm;  θ ← AdamW(θ, g, η_t)
  SORSA  θ ← θ − η_t·(γ/η_max)·∇R(θ)  (qpissa.sorsa, only when --sorsa-gamma > 0)
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
"""
from __future__ import annotations

import json
import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from qpissa import checkpoint as ckpt_lib
from qpissa import distributed
from qpissa.data import DataConfig, Example, batches, build_examples, eval_batches, load_records
from qpissa.errors import UserError
from qpissa.quant import compute_in_fp32, keep_4bit_layout_trainable
from qpissa.usage import require_causal_lm
from qpissa.sorsa import adapter_pairs, sorsa_step


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """One training run. Field metadata is the CLI help text."""

    model: str = field(metadata={"help": "decompose OUT dir (residual/ + adapter/), or an HF checkpoint for "
                                         "--method lora|full"})
    data: str = field(metadata={"help": "training data: .jsonl/.json/.parquet/.csv or a save_to_disk dir"})
    output: str = field(metadata={"help": "run directory RUN"})
    method: Literal["from-out", "lora", "full"] = field(default="from-out", metadata={
        "help": "from-out: train OUT/adapter on OUT/residual; lora/full: baselines on an unquantized checkpoint"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out data for eval loss"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides --epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "epochs when --steps is not given"})
    batch_size: int = field(default=4, metadata={"help": "micro-batch size"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate η_max"})
    schedule: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata={"help": "LR decay"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps of linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global grad norm (0: off)"})
    optim: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = field(default="adamw", metadata={
        "help": "torch AdamW or bitsandbytes 8-bit AdamW (paged: CUDA unified memory)"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    sorsa_gamma: float = field(default=0.0, metadata={"help": "SORSA regularizer strength γ (4e-4 in the paper)"})
    lora_rank: int = field(default=16, metadata={"help": "rank for --method lora"})
    lora_alpha: float | None = field(default=None, metadata={"help": "alpha for --method lora (default: rank)"})
    data_cfg: DataConfig = field(default_factory=DataConfig)
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0: only at the end)"})
    eval_examples: int = field(default=200, metadata={"help": "at most this many held-out examples"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "keep the newest K checkpoints"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest RUN/checkpoint-*"})
    stop_after: int | None = field(default=None, metadata={"help": "stop (with a checkpoint) after this step; "
                                                                    "the schedule still spans --steps"})
    seed: int = field(default=0, metadata={"help": "seed for data order and initialization"})
    device: Literal["auto", "cpu", "cuda"] = field(default="cpu", metadata={
        "help": "where to train: auto | cpu | cuda (auto: cuda when available)"})
    precision: Literal["bf16", "fp32"] = field(default="bf16", metadata={"help": "autocast dtype for compute"})
    save_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={
        "help": "dtype of RUN/adapter (checkpoints are always fp32)"})
    kernels: Literal["none", "triton"] = field(default="none", metadata={"help": "fused NF4 kernels (CUDA)"})
    progress: bool = field(default=True, metadata={"help": "show a rich progress bar"})


# ----------------------------------------------------------------------------- model

def _check_adapter_fits(model, adapter_dir: Path) -> None:
    """Every adapter tensor must name a module of the residual model with matching in/out features."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            shape = f.get_slice(key).get_shape()
            mod = modules.get(name)
            if mod is None:
                raise UserError(f"{adapter_dir}: adapter tensor {key} targets module {name}, which the residual "
                                "model does not have; use the adapter/ and residual/ of the same decompose run")
            want = mod.in_features if ".lora_A." in key else mod.out_features
            have = shape[1] if ".lora_A." in key else shape[0]
            if want != have:
                raise UserError(f"{adapter_dir}: adapter tensor {key} has shape {shape} but {name} has "
                                f"{mod.in_features} in / {mod.out_features} out features; adapter and residual "
                                "come from different models")


def load_model(cfg: TrainConfig):
    """Build (model, tokenizer, description) for cfg.method; only trainable params require grad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(cfg.model)
    device_map = {"": distributed.rank_device(cfg.device, distributed.detect())}
    if cfg.method == "from-out":
        residual, adapter = root / "residual", root / "adapter"
        if not (residual / "config.json").exists():
            raise UserError(f"{residual}/config.json not found: pass the output directory of `qpissa decompose`, "
                            "or --method lora|full with an HF checkpoint")
        if not (adapter / "adapter_config.json").exists() or not (adapter / "adapter_model.safetensors").exists():
            raise UserError(f"{adapter} is missing adapter_config.json/adapter_model.safetensors: rerun "
                            f"`qpissa decompose` into {root} (or --resume it)")
        from peft import PeftModel

        require_causal_lm(residual, "train")
        base = AutoModelForCausalLM.from_pretrained(residual, device_map=device_map)
        _check_adapter_fits(base, adapter)
        model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        tok_dir = residual
    else:
        if not (root / "config.json").exists():
            raise UserError(f"{root}/config.json not found: --method {cfg.method} needs an HF model directory")
        if "quantization_config" in json.loads((root / "config.json").read_text()):
            raise UserError(f"{root} is a quantized checkpoint; --method {cfg.method} needs unquantized weights")
        require_causal_lm(root, "train")
        dtype = torch.float32 if cfg.method == "full" else "auto"
        model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, device_map=device_map)
        if cfg.method == "lora":
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(cfg.seed)
            lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, lora_dropout=0.0,
                              target_modules="all-linear", init_lora_weights=True, task_type="CAUSAL_LM")
            model = get_peft_model(model, lcfg)
        tok_dir = root
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    keep_4bit_layout_trainable(model)
    if cfg.precision == "fp32":
        compute_in_fp32(model)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.kernels == "triton":
        from qpissa.kernel_backend import apply_kernel_backend  # lazy: only when asked

        apply_kernel_backend(model, "triton")
    return model, tokenizer


# ----------------------------------------------------------------------------- optimizer and schedule

def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if cfg.optim == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """η_t/η_max for 0-based step t: linear warmup over W steps, then cosine/linear decay to 0 or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1.0 - progress)


# ----------------------------------------------------------------------------- metrics

def memory_mb(device: str) -> float:
    """Peak memory so far: CUDA max allocated, or the process's peak RSS on CPU (MiB)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_losses(run: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qpissa.atomic import atomic_path

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (response tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    with atomic_path(run / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def evaluate_loss(model, examples, batch_size: int, pad_id: int, device: str, precision: str) -> float:
    """Token-weighted mean cross-entropy over response tokens of the held-out examples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(examples, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(**batch)
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns a summary with the final losses and the adapter path.

    Under torchrun this process joins the group (gloo on CPU, nccl on CUDA) for the whole run.
    """
    from qpissa.devices import resolve_device

    cfg = replace(cfg, device=resolve_device(cfg.device))  # auto → cuda when available; cuda without a GPU: error
    if cfg.device not in ("cpu", "cuda"):
        raise UserError(f"--device {cfg.device}: train takes cpu or cuda (under torchrun each rank uses its LOCAL_RANK)")
    with distributed.session(cfg.device):
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise UserError("--batch-size and --grad-accum must be at least 1")
    kind_dir = Path(cfg.model) / "residual" if cfg.method == "from-out" else Path(cfg.model)
    if (kind_dir / "config.json").exists():
        require_causal_lm(kind_dir, "train")  # an encoder: one line before any data or weights are read
    records = load_records(cfg.data)  # fail fast on bad data, before loading weights
    eval_records = load_records(cfg.eval_data) if cfg.eval_data else []
    existing = ckpt_lib.list_checkpoints(Path(cfg.output))
    if existing and not cfg.resume:
        raise UserError(f"{cfg.output} already holds {existing[-1][1].name}; pass --resume to continue or a new "
                        "--output")
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    model, tokenizer = load_model(cfg)
    examples = build_examples(records, tokenizer, cfg.data_cfg, source=str(cfg.data))
    eval_examples = (build_examples(eval_records[:cfg.eval_examples], tokenizer, cfg.data_cfg,
                                    source=str(cfg.eval_data)) if eval_records else [])
    return fit(cfg, model, tokenizer, examples, eval_examples)


def fit(cfg: TrainConfig, model, tokenizer, examples: list[Example], eval_examples: list[Example]) -> dict[str, Any]:
    """The loop proper, on an already loaded model and tokenized examples (see :func:`train`)."""
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
    distributed.sync_from_rank0(params, d)
    per_step = cfg.batch_size * d.world_size * cfg.grad_accum  # examples per optimizer step (global)
    total = cfg.steps or max(1, int(cfg.epochs * len(examples) // per_step))
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
    config_dict = {k: v for k, v in asdict(cfg).items()}
    if existing:
        state = ckpt_lib.load_checkpoint(existing[-1][1], model, optimizer, scheduler, full)
    run.mkdir(parents=True, exist_ok=True)
    metrics_path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    rows = [r for r in rows if r["step"] <= state.step]  # drop steps logged after the resumed checkpoint
    from qpissa.atomic import write_json

    if d.is_main:  # only rank 0 writes into RUN
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_json(run / "config.json", config_dict)

    pad_id = tokenizer.pad_token_id
    shard = slice(d.rank * cfg.batch_size, (d.rank + 1) * cfg.batch_size)  # this rank's rows of a global batch
    stream = batches(examples, cfg.batch_size * d.world_size, cfg.seed, pad_id, state.pos)
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

    def diverged(what: str) -> None:
        if d.is_main:
            plot_losses(run, rows)
        where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
        raise TrainingDiverged(f"{what} at step {state.step + 1}; training stopped ({where}); lower --lr or check "
                               "the data")

    def save() -> Path:
        if not d.is_main:
            return run / f"checkpoint-{state.step}"  # rank 0 writes it
        return ckpt_lib.save_checkpoint(run, model, optimizer, scheduler, state, config_dict, cfg.keep_last, full)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    from rich.console import Console

    with Progress(*columns, disable=not (cfg.progress and d.is_main), console=Console(stderr=True)) as bar:
        task = bar.add_task("train", total=total, completed=state.step, info="")
        while state.step < stop_at:
            t0 = time.perf_counter()
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            n_resp = sum(int((b["labels"][:, 1:] != -100).sum()) for b, _ in micro)
            loss_sum = 0.0
            for batch, _ in micro:
                batch = {k: v[shard].to(device) for k, v in batch.items()}  # (B, T) of this rank's rows
                n = int((batch["labels"][:, 1:] != -100).sum())
                if n == 0:
                    continue  # no response token in this rank's rows: nothing to add (CE would be 0/0)
                with torch.autocast(**autocast):
                    out = model(**batch)  # out.loss: mean CE over this micro-batch's response tokens
                loss = out.loss * (n / n_resp)  # token-weighted over the whole step
                if not torch.isfinite(loss):
                    diverged(f"loss became {float(out.loss.detach())}")
                loss.backward()
                loss_sum += float(loss.detach())
                del out, loss  # free the (B, T, V) logits before the next forward
            loss_sum = distributed.all_reduce_sum(params, loss_sum, d)  # Σ over ranks: the global batch's gradient and loss
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0
                         else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
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
            if d.is_main and eval_examples and ((cfg.eval_every and state.step % cfg.eval_every == 0)
                                                or state.step == total):
                row["eval_loss"] = evaluate_loss(model, eval_examples, cfg.batch_size, pad_id, device,
                                                 cfg.precision)
            log(row)
            bar.update(task, completed=state.step, info=(
                f"loss {loss_sum:.4f}  lr {lr:.2e}  {row['tokens_per_s']:.0f} tok/s  {row['memory_mb']:.0f} MiB"
                + (f"  eval {row['eval_loss']:.4f}" if "eval_loss" in row else "")))
            if (cfg.save_every and state.step % cfg.save_every == 0) or state.step == stop_at < total:
                last_good = save()

    if d.is_main:
        plot_losses(run, rows)
    summary: dict[str, Any] = {"run": str(run), "steps": state.step, "total_steps": total,
                               "train_loss": rows[-1]["loss"] if rows else None,
                               "eval_loss": next((r["eval_loss"] for r in reversed(rows) if "eval_loss" in r), None),
                               "tokens": state.tokens, "elapsed_s": state.elapsed_s, "checkpoint": str(last_good)}
    if state.step >= total:
        summary["adapter"] = str(run / ("model" if full else "adapter"))
        if d.is_main:
            save_final(run, model, cfg.save_dtype, full)
    if d.is_main:
        write_json(run / "summary.json", summary)
    return distributed.broadcast(d, summary)  # every rank returns rank 0's summary (its eval loss included)


# ----------------------------------------------------------------------------- data parallel


def save_final(run: Path, model, save_dtype: str, full: bool) -> Path:
    """RUN/adapter (PEFT dir, plain-peft loadable) or RUN/model (full fine-tuning), written atomically."""
    import os
    import shutil

    final = run / ("model" if full else "adapter")
    tmp = run / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if save_dtype == "bfloat16" and not full:
        from safetensors.torch import load_file, save_file

        f = tmp / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
