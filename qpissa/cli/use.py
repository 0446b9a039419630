"""CLI commands that use a decomposition or a trained run: ``convert``, ``merge``, ``eval``.

Each parses options, calls one library function (:mod:`qpissa.use.convert`, :mod:`qpissa.use.merge`,
:mod:`qpissa.use.evaluate`) and prints a rich table; user errors become one stderr line (exit 2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from qpissa.cli.app import app

console = Console()  # results (tables) on stdout
log = Console(stderr=True)  # progress and warnings on stderr


def _table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(str(key), f"{value:.6g}" if isinstance(value, float) else str(value))
    return table


@app.command("convert")
def convert_cmd(
    trained: Path = typer.Argument(..., help="trained PiSSA/QPiSSA adapter dir (e.g. RUN/adapter)"),
    init: Path = typer.Option(..., "--init", help="the adapter training started from (decompose's OUT/adapter)"),
    output: Path = typer.Option(..., "--output", "-o", help="new dir for the rank-2r LoRA on the original model"),
    dtype: str = typer.Option("same", help="same | bfloat16 | float16 | float32 (factor dtype)"),
    base_model: Optional[str] = typer.Option(None, help="original model path/id to record in adapter_config.json"),
    overwrite: bool = typer.Option(False, help="replace an adapter already in --output"),
) -> None:
    """PiSSA → LoRA: ΔW = s·B·A − s·B₀·A₀ as a rank-2r LoRA (A′=[A;A₀], B′=[B,−B₀]) on the ORIGINAL model."""
    from qpissa.use.convert import ConvertConfig, convert_pissa_to_lora
    from qpissa.errors import UserError

    if dtype not in ("same", "bfloat16", "float16", "float32"):
        raise UserError(f"--dtype {dtype!r}: choose same, bfloat16, float16 or float32")
    summary = convert_pissa_to_lora(trained, init, output, ConvertConfig(dtype, base_model, overwrite))  # type: ignore[arg-type]
    console.print(_table("converted adapter", summary))
    if not summary["base_model_found"]:
        log.print("[yellow]original model unknown: pass --base-model so the LoRA loads on the original weights")


@app.command("merge")
def merge_cmd(
    residual: Path = typer.Argument(..., help="residual model dir (decompose's OUT/residual) or any HF model dir"),
    adapter: Path = typer.Argument(..., help="LoRA adapter dir to fold in (e.g. RUN/adapter)"),
    output: Path = typer.Option(..., "--output", "-o", help="new dir for the standalone model"),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float16 | float32"),
    quantize: str = typer.Option("none", help="none | nf4 (re-quantize merged weights; extra error reported)"),
    init: Optional[Path] = typer.Option(None, "--init", help="initial adapter: also report what training changed"),
    overwrite: bool = typer.Option(False, help="replace a model already in --output"),
    device: str = typer.Option("auto", help="where to compute: auto | cpu | cuda (auto: cuda when available)"),
) -> None:
    """Standalone model = deq(residual) + s·B·A, loadable with plain transformers (optionally NF4 again)."""
    from rich.progress import Progress

    from qpissa.errors import UserError
    from qpissa.use.merge import MergeConfig, merge

    if dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype {dtype!r}: choose bfloat16, float16 or float32")
    if quantize not in ("none", "nf4"):
        raise UserError(f"--quantize {quantize!r}: choose none or nf4")
    with Progress(console=log, transient=True) as bar:
        task = bar.add_task("merging", total=None)
        report = merge(residual, adapter, output, MergeConfig(dtype=dtype, quantize=quantize, overwrite=overwrite,
                                                              init_adapter=str(init) if init else None,
                                                              device=device),  # type: ignore[arg-type]
                       progress=lambda name: bar.update(task, description=f"merging {name}"))
    console.print(_table("merged model", {k: v for k, v in report.items() if k not in ("modules", "warning")}))
    if report.get("warning"):
        log.print(f"[bold yellow]warning:[/] {report['warning']}")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="HF model dir, decompose/train output dir, or adapter dir"),
    task: str = typer.Option(..., "--task", help="gsm8k | perplexity"),
    data: Path = typer.Option(..., "--data", help="GSM8K JSONL (question/answer) or a text/JSONL file"),
    output: Path = typer.Option(..., "--output", "-o", help="dir for <task>_examples.jsonl and <task>_summary.json"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter to load on MODEL"),
    limit: Optional[int] = typer.Option(None, help="first N rows/documents only"),
    batch_size: int = typer.Option(8, help="prompts (gsm8k) or windows (perplexity) per forward"),
    max_new_tokens: int = typer.Option(256, help="gsm8k: generation budget"),
    prompt_style: str = typer.Option("alpaca", help="gsm8k: alpaca (= qpissa train's template) | chat | plain"),
    instruction: str = typer.Option("", help="gsm8k: text appended to each question"),
    max_length: int = typer.Option(1024, help="perplexity: tokens per window"),
    stride: int = typer.Option(512, help="perplexity: new tokens scored per later window"),
    text_field: str = typer.Option("text", help="perplexity: JSONL field(s), comma-separated"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 (NF4 models compute per their config)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda (auto: cuda when available)"),
) -> None:
    """GSM8K accuracy (batched greedy) or token-weighted perplexity, with plain transformers + peft."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from qpissa.use import evaluate as ev
    from qpissa.devices import resolve_device
    from qpissa.errors import UserError

    if task not in ("gsm8k", "perplexity"):
        raise UserError(f"--task {task!r}: choose gsm8k or perplexity")
    if prompt_style not in ("alpaca", "chat", "plain"):
        raise UserError(f"--prompt-style {prompt_style!r}: choose alpaca, chat or plain")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
    if not data.exists():
        raise UserError(f"--data {data}: file not found")
    device = resolve_device(device)
    base, adapter_dir = ev.resolve_model(model, adapter)
    model_obj, tokenizer = ev.load_model(base, adapter_dir, dtype, device)  # type: ignore[arg-type]
    columns = (TextColumn(f"[bold]{task}"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=log, transient=True) as bar:
        if task == "gsm8k":
            cfg = ev.Gsm8kConfig(limit, batch_size, max_new_tokens, prompt_style, instruction)  # type: ignore[arg-type]
            n = len(ev.read_jsonl(data, limit))
            t = bar.add_task(task, total=n)
            summary, records = ev.evaluate_gsm8k(model_obj, tokenizer, data, cfg, lambda k: bar.advance(t, k))
        else:
            pcfg = ev.PerplexityConfig(max_length, stride, batch_size, text_field, limit)
            t = bar.add_task(task, total=None)
            summary, records = ev.evaluate_perplexity(model_obj, tokenizer, data, pcfg, lambda k: bar.advance(t, k))
    summary.update({"model": str(base), "adapter": str(adapter_dir) if adapter_dir else None, "dtype": dtype})
    path = ev.write_results(output, task, summary, records)
    console.print(_table(f"{task} → {path}", summary))

