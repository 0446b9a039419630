"""CLI command ``qpissa train``: parse options, call :func:`qpissa.train.train`, print a summary table."""
from __future__ import annotations

from dataclasses import fields
from typing import Literal, Optional, get_args, get_origin, get_type_hints

import typer

from qpissa.cli import app
from qpissa.data import DataConfig
from qpissa.errors import UserError
from qpissa.train import TrainConfig

_TRAIN_HELP = {f.name: f.metadata.get("help", "") for f in fields(TrainConfig)}
_DATA_HELP = {f.name: f.metadata.get("help", "") for f in fields(DataConfig)}
# allowed values come from TrainConfig's Literal types (declared once there)
_ALLOWED = {name: get_args(hint) for name, hint in get_type_hints(TrainConfig).items() if get_origin(hint) is Literal}
for _name, _values in _ALLOWED.items():
    _TRAIN_HELP[_name] = f"{_TRAIN_HELP[_name]} (one of: {', '.join(_values)})"


@app.command("train")
def train_command(
    out: str = typer.Argument(..., help=_TRAIN_HELP["model"]),
    data: str = typer.Option(..., "--data", help=_TRAIN_HELP["data"]),
    output: str = typer.Option(..., "--output", "-o", help=_TRAIN_HELP["output"]),
    method: str = typer.Option("from-out", "--method", help=_TRAIN_HELP["method"]),
    method_from_out: bool = typer.Option(False, "--method-from-out", help="same as --method from-out (default)"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help=_TRAIN_HELP["eval_data"]),
    steps: Optional[int] = typer.Option(None, "--steps", help=_TRAIN_HELP["steps"]),
    epochs: float = typer.Option(1.0, "--epochs", help=_TRAIN_HELP["epochs"]),
    batch_size: int = typer.Option(4, "--batch-size", help=_TRAIN_HELP["batch_size"]),
    grad_accum: int = typer.Option(1, "--grad-accum", help=_TRAIN_HELP["grad_accum"]),
    lr: float = typer.Option(2e-5, "--lr", help=_TRAIN_HELP["lr"]),
    schedule: str = typer.Option("cosine", "--schedule", help=_TRAIN_HELP["schedule"]),
    warmup_ratio: float = typer.Option(0.03, "--warmup-ratio", help=_TRAIN_HELP["warmup_ratio"]),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help=_TRAIN_HELP["weight_decay"]),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help=_TRAIN_HELP["max_grad_norm"]),
    max_length: int = typer.Option(512, "--max-length", help=_DATA_HELP["max_length"]),
    template: str = typer.Option("gsm8k", "--template", help=_DATA_HELP["template"]),
    packing: bool = typer.Option(False, "--packing", help=_DATA_HELP["packing"]),
    skip_long_prompts: bool = typer.Option(False, "--skip-long-prompts", help=_DATA_HELP["skip_long_prompts"]),
    optim: str = typer.Option("adamw", "--optim", help=_TRAIN_HELP["optim"]),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help=_TRAIN_HELP["grad_checkpointing"]),
    sorsa_gamma: float = typer.Option(0.0, "--sorsa-gamma", help=_TRAIN_HELP["sorsa_gamma"]),
    lora_rank: int = typer.Option(16, "--lora-rank", help=_TRAIN_HELP["lora_rank"]),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help=_TRAIN_HELP["lora_alpha"]),
    eval_every: int = typer.Option(0, "--eval-every", help=_TRAIN_HELP["eval_every"]),
    eval_examples: int = typer.Option(200, "--eval-examples", help=_TRAIN_HELP["eval_examples"]),
    save_every: int = typer.Option(0, "--save-every", help=_TRAIN_HELP["save_every"]),
    keep_last: int = typer.Option(2, "--keep-last", help=_TRAIN_HELP["keep_last"]),
    resume: bool = typer.Option(False, "--resume", help=_TRAIN_HELP["resume"]),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help=_TRAIN_HELP["stop_after"]),
    seed: int = typer.Option(0, "--seed", help=_TRAIN_HELP["seed"]),
    device: str = typer.Option("auto", "--device", help=_TRAIN_HELP["device"]),
    precision: str = typer.Option("bf16", "--precision", help=_TRAIN_HELP["precision"]),
    save_dtype: str = typer.Option("float32", "--save-dtype", help=_TRAIN_HELP["save_dtype"]),
    kernels: str = typer.Option("none", "--kernels", help=_TRAIN_HELP["kernels"]),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bar"),
) -> None:
    """Fine-tune the adapter of a decompose output (or a LoRA/full baseline) on local data."""
    from rich.console import Console
    from rich.table import Table

    from qpissa.train import train

    given = {"method": method, "schedule": schedule, "optim": optim, "device": device, "precision": precision,
             "save_dtype": save_dtype, "kernels": kernels}
    for name, value in given.items():
        if value not in _ALLOWED[name]:
            raise UserError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(_ALLOWED[name])}")
    if method_from_out and method != "from-out":
        raise UserError("--method-from-out and --method are exclusive")
    cfg = TrainConfig(
        model=out, data=data, output=output, method=method, eval_data=eval_data, steps=steps, epochs=epochs,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, schedule=schedule, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, optim=optim, grad_checkpointing=grad_checkpointing,
        sorsa_gamma=sorsa_gamma, lora_rank=lora_rank, lora_alpha=lora_alpha,
        data_cfg=DataConfig(template=template, max_length=max_length, packing=packing,
                            skip_long_prompts=skip_long_prompts),
        eval_every=eval_every, eval_examples=eval_examples, save_every=save_every, keep_last=keep_last,
        resume=resume, stop_after=stop_after, seed=seed, device=device, precision=precision, save_dtype=save_dtype,
        kernels=kernels, progress=not no_progress)
    summary = train(cfg)
    from qpissa.distributed import detect

    if not detect().is_main:  # under torchrun every rank returns the summary; one table is enough
        return
    table = Table(title=f"qpissa train → {output}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("steps", "train_loss", "eval_loss", "tokens", "elapsed_s", "checkpoint", "adapter"):
        value = summary.get(key)
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
