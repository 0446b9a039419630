"""CLI commands that use a decomposition or a trained run: ``convert``, ``merge``, ``export``, ``eval``.

Each parses options, calls one library function (:mod:`qpissa.use.convert`, :mod:`qpissa.use.merge`,
:mod:`qpissa.use.evaluate`) and prints a rich table; user errors become one stderr line (exit 2).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, get_args

import typer
from rich.console import Console
from rich.table import Table

from qpissa.cli.app import app
from qpissa.cli.options import Options, with_options
from qpissa.hub import REVISION_HELP
from qpissa.use.classify_eval import ClassificationConfig
from qpissa.use.convert import ConvertConfig
from qpissa.use.evaluate import Gsm8kConfig, PerplexityConfig
from qpissa.use.gguf_export import ExportConfig
from qpissa.use.merge import MergeConfig

console = Console()  # results (tables) on stdout
log = Console(stderr=True)  # progress and warnings on stderr


def _table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(str(key), f"{value:.6g}" if isinstance(value, float) else str(value))
    return table


@app.command("convert")
@with_options(options=Options(ConvertConfig, list_choices=False))
def convert_cmd(
    trained: Path = typer.Argument(..., help="trained PiSSA/QPiSSA adapter dir (e.g. RUN/adapter)"),
    init: Path = typer.Option(..., "--init", help="the adapter training started from (decompose's OUT/adapter)"),
    output: Path = typer.Option(..., "--output", "-o", help="new dir for the rank-2r LoRA on the original model"),
    options: dict = None,  # type: ignore[assignment]  (ConvertConfig's fields, see with_options)
) -> None:
    """PiSSA → LoRA: ΔW = s·B·A − s·B₀·A₀ as a rank-2r LoRA (A′=[A;A₀], B′=[B,−B₀]) on the ORIGINAL model."""
    from qpissa.use.convert import convert_pissa_to_lora

    summary = convert_pissa_to_lora(trained, init, output, ConvertConfig(**options))
    console.print(_table("converted adapter", summary))
    if not summary["base_model_found"]:
        log.print("[yellow]original model unknown: pass --base-model so the LoRA loads on the original weights")


@app.command("merge")
@with_options(options=Options(MergeConfig, exclude=("shard_size",), defaults={"device": "auto"},
                              flags={"init_adapter": "--init"}, list_choices=False,
                              types={"init_adapter": Path}))
def merge_cmd(
    residual: Path = typer.Argument(..., help="residual model dir (decompose's OUT/residual), any HF model dir or a "
                                              "Hub id org/name"),
    adapter: Path = typer.Argument(..., help="LoRA adapter dir to fold in (e.g. RUN/adapter)"),
    output: Path = typer.Option(..., "--output", "-o", help="new dir for the standalone model"),
    options: dict = None,  # type: ignore[assignment]  (MergeConfig's fields, see with_options)
) -> None:
    """Standalone model = deq(residual) + s·B·A, loadable with plain transformers (optionally NF4 again)."""
    from rich.progress import Progress

    from qpissa.use.merge import merge

    if options["init_adapter"] is not None:  # a Path on the CLI, a str in the config
        options["init_adapter"] = str(options["init_adapter"])
    cfg = MergeConfig(**options)
    with Progress(console=log, transient=True) as bar:
        task = bar.add_task("merging", total=None)
        report = merge(residual, adapter, output, cfg, progress=lambda name: bar.update(task, description=f"merging {name}"))
    console.print(_table("merged model", {k: v for k, v in report.items() if k not in ("modules", "warning")}))
    if report.get("warning"):
        log.print(f"[bold yellow]warning:[/] {report['warning']}")


@app.command("export")
@with_options(options=Options(ExportConfig, list_choices=False))
def export_cmd(
    model: Path = typer.Argument(..., help="merged model dir or Hub id, training run (RUN) or decompose output (OUT)"),
    output: Path = typer.Option(..., "--output", "-o", help="FILE.gguf (with --split adapter also FILE-lora.gguf); "
                                                           "FILE.Modelfile beside it"),
    options: dict = None,  # type: ignore[assignment]  (ExportConfig's fields, see with_options)
) -> None:
    """GGUF for llama.cpp / Ollama: the merged model, or the QPiSSA split (residual at --quant + f16 LoRA)."""
    from rich.progress import Progress

    from qpissa.use.gguf_export import export_gguf

    with Progress(console=log, transient=True) as bar:
        task = bar.add_task("exporting", total=None)
        summary = export_gguf(model, output, ExportConfig(**options),
                              progress=lambda name: bar.update(task, description=f"writing {name}"))
    rows = {k: v for k, v in summary.items() if k not in ("files", "bytes", "notes", "f16_fallback_tensors")}
    rows.update({f"{k} ({summary['bytes'][k] / 2**20:.1f} MiB)": v for k, v in summary["files"].items()})
    console.print(_table("GGUF export", rows))
    if summary["f16_fallback"]:
        log.print(f"[yellow]{summary['f16_fallback']} tensor(s) kept f16 (row length not a multiple of the "
                  f"{options['quant']} block): {', '.join(summary['f16_fallback_tensors'][:5])}")
    for note in summary["notes"]:
        log.print(f"[yellow]note:[/] {note}", markup=True, highlight=False)


@app.command("eval")
@with_options(gsm8k=Options(Gsm8kConfig, list_choices=False),
              ppl=Options(PerplexityConfig,  # these four are Gsm8kConfig's options, for both tasks
                          exclude=("limit", "batch_size", "data_split", "data_config")),
              cls=Options(ClassificationConfig, list_choices=False))
def eval_cmd(
    model: Path = typer.Argument(..., help="HF model dir or Hub id org/name, decompose/train output dir, or "
                                           "adapter dir"),
    task: str = typer.Option(..., "--task", help="gsm8k | perplexity | classification (a run of qpissa train "
                                                 "--task classification: accuracy, macro-F1, Matthews; Pearson, "
                                                 "Spearman for regression)"),
    data: str = typer.Option(..., "--data", help="GSM8K JSONL (question/answer), a text/JSONL file, or a Hub dataset "
                                                 "id org/name (--data-split, default test)"),
    revision: Optional[str] = typer.Option(None, help=REVISION_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="dir for <task>_examples.jsonl and <task>_summary.json"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter to load on MODEL"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 (NF4 models compute per their config)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda (auto: cuda when available)"),
    gsm8k: dict = None,  # type: ignore[assignment]  (Gsm8kConfig's fields, see with_options)
    ppl: dict = None,  # type: ignore[assignment]  (PerplexityConfig's other fields)
    cls: dict = None,  # type: ignore[assignment]  (ClassificationConfig's fields)
) -> None:
    """GSM8K accuracy (batched greedy), token-weighted perplexity or classification scores, with plain
    transformers + peft."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from qpissa.use import evaluate as ev
    from qpissa.devices import resolve_device
    from qpissa.errors import UserError
    from qpissa.hub import is_hub_id

    if task not in ("gsm8k", "perplexity", "classification"):
        raise UserError(f"--task {task!r}: choose gsm8k, perplexity or classification")
    if dtype not in get_args(ev.DType):
        raise UserError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
    gcfg = ev.Gsm8kConfig(**gsm8k)  # checks --prompt-style before any weights are read
    if not Path(data).exists() and not is_hub_id(data):
        raise UserError(f"--data {data}: file not found (nor a Hub dataset id org/name)")
    device = resolve_device(device)
    base, adapter_dir = ev.resolve_model(model, adapter, revision)
    if task == "classification":
        _classify(base, adapter_dir, data, output, device, gcfg, ClassificationConfig(**cls), ppl["text_field"])
        return
    style, note = ev.resolve_prompt_style(gcfg.prompt_style, base, adapter_dir)  # auto → the run's template
    gcfg = replace(gcfg, prompt_style=style)
    if note and task == "gsm8k":
        log.print(note, markup=False, highlight=False)  # a template may hold [brackets]
    model_obj, tokenizer = ev.load_model(base, adapter_dir, dtype, device)  # type: ignore[arg-type]
    columns = (TextColumn(f"[bold]{task}"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=log, transient=True) as bar:
        if task == "gsm8k":
            n = len(ev.read_rows(data, gcfg.limit, gcfg.data_split, gcfg.data_config))
            t = bar.add_task(task, total=n)
            summary, records = ev.evaluate_gsm8k(model_obj, tokenizer, data, gcfg, lambda k: bar.advance(t, k))
        else:
            pcfg = ev.PerplexityConfig(**ppl, limit=gcfg.limit, batch_size=gcfg.batch_size,
                                       data_split=gcfg.data_split, data_config=gcfg.data_config)
            t = bar.add_task(task, total=None)
            summary, records = ev.evaluate_perplexity(model_obj, tokenizer, data, pcfg, lambda k: bar.advance(t, k))
    summary.update({"model": str(base), "adapter": str(adapter_dir) if adapter_dir else None, "dtype": dtype})
    path = ev.write_results(output, task, summary, records)
    console.print(_table(f"{task} → {path}", summary))



def _classify(base: Path, adapter: Optional[Path], data: str, output: Path, device: str, gcfg, cfg, text_field) -> None:
    """``eval --task classification``: the run's head and labels, scored on ``data``."""
    from qpissa.classify import check_rows
    from qpissa.data import load_records
    from qpissa.train.classifier import run_labels
    from qpissa.use import classify_eval as ce
    from qpissa.use.evaluate import write_results

    labels, run_cfg = run_labels(ce.run_of(base, adapter))
    records = load_records(data, gcfg.data_split, gcfg.data_config, gcfg.limit)
    text = text_field or run_cfg.get("text_field")
    pair = cfg.text_pair_field if text_field or cfg.text_pair_field else run_cfg.get("text_pair_field")
    check_rows(records, text, pair, cfg.label_field or run_cfg.get("label_field"), labels, str(data))  # before weights
    model, tokenizer = ce.load_classifier(base, adapter, labels, device)
    with console.status("classifying"):
        summary, rows = ce.evaluate_classification(model, tokenizer, labels, records, run_cfg, cfg, text_field,
                                                   gcfg.batch_size, device, str(data), glue_task=gcfg.data_config)
    summary.update({"model": str(base), "adapter": str(adapter) if adapter else None, "data": str(data)})
    path = write_results(output, "classification", summary, rows)
    console.print(_table(f"classification → {path}", {k: v for k, v in summary.items() if not isinstance(v, list)}))
