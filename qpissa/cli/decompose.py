"""CLI commands ``decompose`` and ``report``."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from qpissa.cli import app
from qpissa.decompose import DecomposeConfig

_HELP = {f.name: f.metadata.get("help", "") for f in fields(DecomposeConfig)}

console = Console(width=None if Console().is_terminal else 130)


def print_summary(report: dict) -> None:
    """Rich table: overall and per layer type reductions vs QLoRA and LoftQ."""
    from qpissa.report import SUMMARY_HEADER, metrics_line, summary_rows

    args = report["arguments"]
    table = Table(title=f"{args['method']} r={args['rank']} T={args['iters']}: reduction of ‖W − Ŵ‖ "
                        "(nuclear, Frobenius, spectral) vs QLoRA and vs LoftQ", caption=metrics_line(report))
    for col in SUMMARY_HEADER:
        table.add_column(col, justify="left" if col == "scope" else "right", no_wrap=col != "scope")
    for row in summary_rows(report):
        table.add_row(*row)
    console.print(table)
    from qpissa.report import OUTPUT_HEADER, output_rows

    rows = output_rows(report)
    if rows:
        out = Table(title="output error ‖(W − Ŵ)·H^½‖_F on held-out activations (LoftQ, QPiSSA: uncalibrated)")
        for col in OUTPUT_HEADER:
            out.add_column(col, justify="left" if col == "scope" else "right", no_wrap=col != "scope")
        for row in rows:
            out.add_row(*row)
        console.print(out)
    fid = report.get("model_fidelity") or {}
    if fid:
        console.print(", ".join(f"{k} = {v:.5g}" for k, v in fid.items()))


@app.command()
def decompose(
    model: Optional[Path] = typer.Argument(None, help="HF model dir (config.json + *.safetensors); default: all-MiniLM-L6-v2"),
    out: Path = typer.Option(Path("out"), "--output", "-o", help="output directory"),
    method: str = typer.Option("qpissa", help=_HELP["method"]),
    rank: int = typer.Option(16, help="adapter rank r"),
    alpha: Optional[float] = typer.Option(None, help="lora_alpha (default r)"),
    rslora: bool = typer.Option(False, help="scale α/√r"),
    iters: int = typer.Option(1, help="T iterations (qpissa, loftq)"),
    targets: Optional[list[str]] = typer.Option(None, help="module names or regexes (repeatable)"),
    blocksize: int = typer.Option(64, help="NF4 block size"),
    double_quant: bool = typer.Option(False, help="NF4 double quantization"),
    svd: str = typer.Option("randomized", help="randomized (default: p=16, q=4, seeded) | exact (LAPACK, slow)"),
    oversample: int = typer.Option(16, help="randomized SVD oversampling"),
    power_iters: int = typer.Option(4, help="randomized SVD power iterations"),
    seed: int = typer.Option(0, help="seed"),
    device: str = typer.Option("auto", help="auto | cpu | cuda (auto: cuda when available)"),
    dtype: str = typer.Option("float32", help="SVD precision: float32 | float64"),
    adapter_dtype: str = typer.Option("bfloat16", help="stored adapter dtype"),
    refit: bool = typer.Option(True, help="qpissa: refit A,B on the stored Q"),
    loftq_baseline: Optional[bool] = typer.Option(
        None, "--loftq-baseline/--no-loftq-baseline",
        help="measure LoftQ(T) too (default: auto, on when the targets hold ≤ 32M weights)"),
    spectral_norms: Optional[bool] = typer.Option(
        None, "--spectral-norms/--no-spectral-norms",
        help="nuclear/spectral norms too, one svdvals each (default: auto, on when the targets hold ≤ 32M weights)"),
    workers: Optional[int] = typer.Option(
        None, help="tensors decomposed at once (default: auto, 2 on a multi-core CPU while every target ≤ 16M weights)"),
    resume: bool = typer.Option(False, help="continue an interrupted run"),
    overwrite: bool = typer.Option(False, help="replace an existing output"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    calib_data: Optional[Path] = typer.Option(None, "--calib-data", help=_HELP["calib_data"]),
    calib_samples: int = typer.Option(128, "--calib-samples", help=_HELP["calib_samples"]),
    calib_holdout: int = typer.Option(32, "--calib-holdout", help=_HELP["calib_holdout"]),
    calib_seq_len: int = typer.Option(256, "--calib-seq-len", help=_HELP["calib_seq_len"]),
    calib_template: str = typer.Option("gsm8k", "--calib-template", help=_HELP["calib_template"]),
    damp: float = typer.Option(DecomposeConfig.damp, "--damp", help=_HELP["damp"]),
    eval_kl: int = typer.Option(0, "--eval-kl", help=_HELP["eval_kl"]),
) -> None:
    """Split each target weight into principal adapter + (NF4) residual; write residual/, adapter/, reports."""
    from qpissa.decompose import decompose as run
    report = run(model, out, method=method, rank=rank, alpha=alpha, rslora=rslora, iters=iters, targets=targets,
                 blocksize=blocksize, double_quant=double_quant, svd=svd, oversample=oversample,
                 power_iters=power_iters, seed=seed, device=device, dtype=dtype, adapter_dtype=adapter_dtype,
                 refit=refit, loftq_baseline=loftq_baseline, spectral_norms=spectral_norms, workers=workers, resume=resume,
                 overwrite=overwrite, progress=not quiet, calib_data=None if calib_data is None else str(calib_data),
                 calib_samples=calib_samples, calib_holdout=calib_holdout, calib_seq_len=calib_seq_len,
                 calib_template=calib_template, damp=damp, eval_kl=eval_kl)
    from qpissa.distributed import detect

    if not detect().is_main:  # under torchrun every rank returns the report; one table is enough
        return
    print_summary(report)
    console.print(f"wrote {out}/residual, {out}/adapter, {out}/report.{{json,csv,md}}, {out}/error_by_layer.png")
    from qpissa.usage import load_snippet

    console.print("load it with plain transformers + peft:")
    console.print(load_snippet(out), markup=False, highlight=False)


@app.command()
def report(out: Path = typer.Argument(..., help="a decomposition output directory")) -> None:
    """Print the error table of OUT and regenerate report.json/csv/md and the plot."""
    from qpissa.report import load_report, write_report

    data = load_report(out)
    write_report(data, out)
    print_summary(data)
