"""CLI commands ``decompose`` and ``report``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from qpissa.cli.app import app
from qpissa.cli.options import Options, with_options, write_config
from qpissa.decompose.config import DecomposeConfig

console = Console(width=None if Console().is_terminal else 130)


def print_summary(report: dict) -> None:
    """Rich table: overall and per layer type reductions vs QLoRA and LoftQ."""
    from qpissa.decompose.report import SUMMARY_HEADER, metrics_line, summary_rows

    args = report["arguments"]
    table = Table(title=f"{args['method']} r={args['rank']} T={args['iters']}: reduction of ‖W − Ŵ‖ "
                        "(nuclear, Frobenius, spectral) vs QLoRA and vs LoftQ", caption=metrics_line(report))
    for col in SUMMARY_HEADER:
        table.add_column(col, justify="left" if col == "scope" else "right", no_wrap=col != "scope")
    for row in summary_rows(report):
        table.add_row(*row)
    console.print(table)
    from qpissa.decompose.report import OUTPUT_HEADER, output_rows

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


def print_coverage(report: dict) -> None:
    """The share of the checkpoint's weights that ended up 4-bit, and the warning under half."""
    from qpissa.decompose.coverage import lines

    for line in lines(report["coverage"], report.get("experts")) if report.get("coverage") else ():
        console.print(line, style="bold yellow" if line.startswith("warning") else None, markup=False, highlight=False, soft_wrap=True)


@app.command()
@with_options(config_file=True,
              options=Options(DecomposeConfig, exclude=("compute_dtype", "progress"), defaults={"device": "auto"},
                              list_choices=False, types={"calib_data": Path}))
def decompose(
    model: Optional[Path] = typer.Argument(None, help="HF model dir (config.json + *.safetensors) or Hub id org/name; default: all-MiniLM-L6-v2"),
    out: Path = typer.Option(Path("out"), "--output", "-o", help="output directory"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    options: dict = None,  # type: ignore[assignment]  (DecomposeConfig's fields, see with_options)
    resolved: dict = None,  # type: ignore[assignment]  (every option's final value → OUT/config.yaml)
) -> None:
    """Split each target weight into principal adapter + (NF4) residual; write residual/, adapter/, reports.

    A finished run writes OUT/config.yaml: `qpissa decompose --config OUT/config.yaml -o OUT2` repeats it."""
    from qpissa.decompose.driver import decompose as run

    if options["calib_data"] is not None:  # a Path on the CLI, a str in the config (and the manifest)
        options["calib_data"] = str(options["calib_data"])
    report = run(model, out, DecomposeConfig(**options, progress=not quiet))
    from qpissa.distributed import detect

    if not detect().is_main:  # under torchrun every rank returns the report; one table is enough
        return
    write_config(out / "config.yaml", resolved, "decompose")
    print_summary(report)
    print_coverage(report)
    console.print(f"wrote {out}/residual, {out}/adapter, {out}/report.{{json,csv,md}}, {out}/error_by_layer.png, "
                  f"{out}/config.yaml")
    from qpissa.usage import load_heading, load_snippet

    console.print(load_heading(out))
    console.print(load_snippet(out), markup=False, highlight=False, soft_wrap=True)


@app.command()
def report(out: Path = typer.Argument(..., help="a decomposition output directory")) -> None:
    """Print the error table of OUT and regenerate report.json/csv/md and the plot."""
    from qpissa.decompose.report import load_report, write_report

    data = load_report(out)
    write_report(data, out)
    print_summary(data)
    print_coverage(data)
