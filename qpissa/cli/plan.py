"""CLI command ``plan``: memory of a fine-tuning setup from config.json alone (see :mod:`qpissa.plan`)."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from qpissa.cli import app
from qpissa.errors import UserError
from qpissa.model_shapes import load_config, shapes_from_config
from qpissa.plan import (GiB, PlanConfig, decompose_estimate, largest_batch, largest_rank, parse_size, plan)

_H = {k: v.metadata["help"] for k, v in PlanConfig.__dataclass_fields__.items()}


def _choice(value: str, allowed: tuple[str, ...], opt: str) -> str:
    if value not in allowed:
        raise UserError(f"{opt} {value!r}: choose one of {', '.join(allowed)}")
    return value


@app.command("plan")
def plan_cmd(
    config: str = typer.Argument(..., help="config.json or a model folder holding one (no weights read)"),
    method: str = typer.Option("qpissa", help=_H["method"]),
    rank: int = typer.Option(128, help=_H["rank"]),
    alpha: float = typer.Option(None, help="lora_alpha (does not change memory; recorded in --json)"),
    targets: str = typer.Option("all", help=_H["targets"]),
    batch_size: int = typer.Option(1, help=_H["batch_size"]),
    seq_len: int = typer.Option(2048, help=_H["seq_len"]),
    optim: str = typer.Option("adamw", help=_H["optim"]),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing/--no-grad-checkpointing",
                                            help=_H["grad_checkpointing"]),
    gpu_memory: str = typer.Option("80GB", help="device memory: 80GB (10^9), 79.6GiB (2^30), 24000MB"),
    blocksize: int = typer.Option(64, help=_H["blocksize"]),
    double_quant: bool = typer.Option(False, "--double-quant/--no-double-quant", help=_H["double_quant"]),
    dtype: str = typer.Option("bf16", help=_H["dtype"]),
    adapter_dtype: str = typer.Option("fp32", help=_H["adapter_dtype"]),
    device: str = typer.Option("cuda", help="cuda or cpu (cpu: no context overhead, CPU dropout/SDPA)"),
    overhead: str = typer.Option(None, help="context + workspace (default 1GiB on cuda, 0 on cpu)"),
    decompose: bool = typer.Option(True, "--decompose/--no-decompose", help="also estimate the decompose stage"),
    json_out: str = typer.Option(None, "--json", help="write the plan as JSON here"),
) -> None:
    """Predict training memory (weights, adapters, optimizer, activations) and whether it fits."""
    cfg = PlanConfig(
        method=_choice(method, ("qpissa", "qlora", "loftq", "pissa", "lora", "full"), "--method"),
        rank=rank, targets=targets, batch_size=batch_size, seq_len=seq_len,
        optim=_choice(optim, ("adamw", "adamw8bit", "paged_adamw8bit", "sgd"), "--optim"),
        grad_checkpointing=grad_checkpointing, gpu_memory=parse_size(gpu_memory), blocksize=blocksize,
        double_quant=double_quant, dtype=_choice(dtype, ("bf16", "fp16", "fp32"), "--dtype"),
        adapter_dtype=_choice(adapter_dtype, ("bf16", "fp16", "fp32"), "--adapter-dtype"),
        device=_choice(device, ("cuda", "cpu"), "--device"),
        overhead=parse_size(overhead) if overhead else (GiB if device == "cuda" else 0))
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise UserError(f"--blocksize {blocksize}: bitsandbytes supports 32…4096 (powers of two)")
    shapes = shapes_from_config(load_config(config))
    p = plan(shapes, cfg)
    console = Console()
    t = Table(title=f"{shapes.model_type}: {shapes.n_params / 1e9:.3f}B params, {cfg.method} r={cfg.rank} "
                    f"targets={cfg.targets}, B={cfg.batch_size} L={cfg.seq_len}, {cfg.optim}"
                    f"{', grad ckpt' if cfg.grad_checkpointing else ''}")
    t.add_column("component")
    t.add_column("GiB", justify="right")
    t.add_column("GB", justify="right")
    t.add_column("how")
    for c in p.components:
        t.add_row(c.name, f"{c.bytes / GiB:.3f}", f"{c.bytes / 1e9:.3f}", c.detail)
    t.add_row("[bold]total", f"[bold]{p.total / GiB:.2f}", f"[bold]{p.total / 1e9:.2f}",
              f"of {cfg.gpu_memory / 1e9:.1f} GB")
    console.print(t)
    best_b, best_r = largest_batch(shapes, cfg), largest_rank(shapes, cfg)
    verdict = "[green]fits" if p.fits else "[red]does not fit"
    console.print(f"{verdict}[/] in {cfg.gpu_memory / 1e9:.1f} GB ({p.total / cfg.gpu_memory:.0%}); "
                  f"trainable {p.trainable:,} params; largest batch {best_b} at L={cfg.seq_len}"
                  + (f", largest rank {best_r} at B={cfg.batch_size}" if cfg.method != "full" else ""))
    out = {**p.to_dict(), "alpha": alpha if alpha is not None else rank, "largest_batch": best_b,
           "largest_rank": best_r}
    if decompose and cfg.method in ("qpissa", "loftq", "pissa"):
        est = decompose_estimate(shapes, rank=cfg.rank, targets=cfg.targets)
        m, n = est["largest"]
        console.print(f"decompose stage (`qpissa decompose` defaults, r={cfg.rank}, one tensor at a time): peak ≈ "
                      f"{est['peak_bytes'] / GiB:.1f} GiB (largest {m}×{n}), ≈ {est['seconds'] / 60:.0f} min "
                      f"for {est['tensors']} tensors (rates measured by timing qpissa.decompose on "
                      f"{est['rates'].get('machine', 'the machine in qpissa/decompose_rates.json')})")
        out["decompose"] = est
    if json_out:
        from qpissa.atomic import write_json
        write_json(json_out, out)
        console.print(f"wrote {json_out}")


__all__ = ["plan_cmd"]
