"""CLI command ``qpissa train``: options from :class:`TrainConfig` and :class:`DataConfig`, call
:func:`qpissa.train.loop.train`, print a summary table."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from qpissa.cli.app import app
from qpissa.cli.options import Options, help_of, with_options, write_config
from qpissa.data import DataConfig
from qpissa.errors import UserError
from qpissa.train.config import TrainConfig


@app.command("train")
@with_options(
    config_file=True,
    train_opts=Options(TrainConfig, exclude=("model", "data_cfg", "progress"), defaults={"device": "auto"},
                       toggles=False, shorts={"output": "-o"}),
    data_opts=Options(DataConfig, include=("max_length", "template", "packing", "skip_long_prompts"), toggles=False),
)
def train_command(
    model: str = typer.Argument(..., help=help_of(TrainConfig, "model")),
    method_from_out: bool = typer.Option(False, "--method-from-out", help="same as --method from-out (default)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bar"),
    train_opts: dict = None,  # type: ignore[assignment]  (TrainConfig's fields, see with_options)
    data_opts: dict = None,  # type: ignore[assignment]  (DataConfig's fields)
    resolved: dict = None,  # type: ignore[assignment]  (every option's final value → RUN/config.yaml)
) -> None:
    """Fine-tune the adapter of a decompose output (or a LoRA/full baseline) on local or Hub data.

    A finished run writes RUN/config.yaml: `qpissa train --config RUN/config.yaml -o RUN2` repeats it (so does
    RUN/config.json, the record the Python API writes)."""
    from rich.console import Console
    from rich.table import Table

    from qpissa.train.loop import train

    if method_from_out and train_opts["method"] != "from-out":
        raise UserError("--method-from-out and --method are exclusive")
    cfg = TrainConfig(model=model, **train_opts, data_cfg=DataConfig(**data_opts), progress=not no_progress)
    summary = train(cfg)
    from qpissa.distributed import detect

    if not detect().is_main:  # under torchrun every rank returns the summary; one table is enough
        return
    used = json.loads((Path(cfg.output) / "config.json").read_text())  # what the run resolved from the data
    resolved = {**resolved, "template": used["data_cfg"]["template"]}  # chat when detected from messages data
    if cfg.task == "classification":  # the columns and classes it found (GLUE layout, label count)
        resolved.update({k: used[k] for k in ("text_field", "text_pair_field", "num_labels")})
    write_config(Path(cfg.output) / "config.yaml", resolved, "train")  # beside RUN/config.json
    table = Table(title=f"qpissa train → {cfg.output}")
    table.add_column("what")
    table.add_column("value", justify="right")
    preference = ("eval_rewards_accuracy", "eval_rewards_margin") if cfg.objective != "sft" else ()
    for key in ("steps", "train_loss", "eval_loss", *preference, "tokens", "elapsed_s", "checkpoint", "adapter"):
        value = summary.get(key)
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
