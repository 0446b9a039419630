"""CLI command ``plan``: memory of a fine-tuning setup from config.json alone (see :mod:`qpissa.plan.memory`)."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from qpissa.cli.app import app
from qpissa.cli.options import Options, with_options
from qpissa.hub import REVISION_HELP
from qpissa.plan.expert_budget import expert_options, summary
from qpissa.plan.fsdp_memory import experts_per_rank
from qpissa.plan.model_shapes import load_config, shapes_from_config
from qpissa.plan.source_size import source_plan
from qpissa.plan.memory import (GiB, PlanConfig, decompose_estimate, largest_batch, largest_rank, parse_size, plan)


@app.command("plan")
@with_options(config_file=True,
              setup=Options(PlanConfig, exclude=("gpu_memory", "overhead", "device"), list_choices=False))
def plan_cmd(
    model: str = typer.Argument(..., help="config.json, a model folder holding one, or a Hub id org/name (only "
                                          "its config.json is fetched; no weights read)"),
    revision: str = typer.Option(None, help=REVISION_HELP),
    alpha: float = typer.Option(None, help="lora_alpha (does not change memory; recorded in --json)"),
    gpu_memory: str = typer.Option(f"{PlanConfig.gpu_memory // 10**9}GB",
                                   help="device memory: 80GB (10^9), 79.6GiB (2^30), 24000MB"),
    device: str = typer.Option(PlanConfig.device, help="cuda or cpu (cpu: no context overhead, CPU dropout/SDPA)"),
    overhead: str = typer.Option(None, help="context + workspace (default 1GiB on cuda, 0 on cpu)"),
    decompose: bool = typer.Option(True, "--decompose/--no-decompose", help="also estimate the decompose stage"),
    json_out: str = typer.Option(None, "--json", help="write the plan as JSON here"),
    setup: dict = None,  # type: ignore[assignment]  (PlanConfig's fields, see with_options)
) -> None:
    """Predict training memory (weights, adapters, optimizer, activations) and whether it fits."""
    rank = setup["rank"]
    cfg = PlanConfig(**setup, gpu_memory=parse_size(gpu_memory), device=device,  # type: ignore[arg-type]
                     overhead=parse_size(overhead) if overhead else (GiB if device == "cuda" else 0))
    config = load_config(model, revision)
    shapes = shapes_from_config(config)
    p = plan(shapes, cfg)
    console = Console()
    t = Table(title=f"{shapes.model_type}: {shapes.n_params / 1e9:.3f}B params, {cfg.method} r={cfg.rank} "
                    f"targets={cfg.targets}, B={cfg.batch_size} L={cfg.seq_len}, {cfg.optim}"
                    f"{', grad ckpt' if cfg.grad_checkpointing else ''}"
                    + (f", FSDP over {cfg.gpus} ranks{' + CPU offload' if cfg.fsdp_offload else ''}: per rank"
                       if cfg.fsdp else ""))
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
    options = expert_options(shapes, cfg)
    if options:  # MoE: which expert rank / optimizer fits (qpissa.plan.expert_budget)
        console.print(summary(options, cfg.gpu_memory), highlight=False)
        out["expert_options"] = options
    split = experts_per_rank(shapes, cfg.gpus) if cfg.fsdp else None
    if split:
        console.print(f"fsdp experts: each of {cfg.gpus} ranks stores {split['experts_per_rank_per_block']} of every "
                      f"block's {split['experts_per_block']} experts ({split['experts_per_rank']:,} of "
                      f"{split['experts_total']:,}), gathered one block at a time", highlight=False)
        out["fsdp_experts"] = split
    if decompose and cfg.method in ("qpissa", "loftq", "pissa"):
        est = decompose_estimate(shapes, rank=cfg.rank, targets=cfg.targets)
        m, n = est["largest"]
        console.print(f"decompose stage (`qpissa decompose` defaults, r={cfg.rank}, one tensor at a time): peak ≈ "
                      f"{est['peak_bytes'] / GiB:.1f} GiB (largest {m}×{n}), ≈ {est['seconds'] / 60:.0f} min "
                      f"for {est['tensors']} tensors (rates measured by timing qpissa.decompose on "
                      f"{est['rates'].get('machine', 'the machine in qpissa/plan/decompose_rates.json')})")
        out["decompose"] = est
    src = source_plan(config, shapes, model)
    if src is not None:
        peak = max(est["peak_bytes"], 512 * 2**20 + src["decode_peak_bytes"]) if "decompose" in out else None
        console.print(f"source: {src['format']}, download {'' if src['download_exact'] else '≈ '}"
                      f"{_size(src['download_bytes'])} ({_count(src['quantized_weights'])} weights stored "
                      "quantized, the rest in the config's dtype); decompose dequantizes one tensor at a time"
                      + (f": peak ≈ {peak / GiB:.1f} GiB with the decoder's temporaries" if peak else ""))
        out["source"] = {**src, "decompose_peak_bytes": peak}
    if json_out:
        from qpissa.atomic import write_json
        write_json(json_out, out)
        console.print(f"wrote {json_out}")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**8 else f"{n / 1e6:.2f}M"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.2f} MB"


__all__ = ["plan_cmd"]
