"""Convergence: LoRA, PiSSA, QLoRA, LoftQ(T), QPiSSA(T), QPiSSA+SORSA and full fine-tuning, same seed/data/steps.

The PiSSA paper's claim (Meng et al. 2024, Fig. 1/Table 1): at equal steps PiSSA's loss is below LoRA's
and QPiSSA's below QLoRA's and LoftQ's. Every method goes through the one training loop
(:func:`qpissa.train.train`); only the starting point differs:

  lora   --method lora on the unquantized checkpoint (PEFT: Kaiming A, B = 0)
  full   --method full on the unquantized checkpoint (all parameters, fp32 master weights, lr / 10)
  pissa, qlora, loftq(T), qpissa(T)   `qpissa decompose` outputs, trained with --method from-out
  qpissa+sorsa   the qpissa(T) output with --sorsa-gamma

Usage (defaults = the run reported in the README):
  python benchmarks/train_convergence.py --threads 1   # 20 steps × 2 × ≤160 tokens, r=16, q_proj v_proj
Writes benchmarks/results/train_convergence.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = Path.home() / ".cache" / "qpissa-test-assets" / "smollm2-135m-instruct"
DEFAULT_GSM8K = HERE.parent.parent / "shared" / "assets" / "gsm8k"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qpissa-bench-convergence"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5, help="T for LoftQ and QPiSSA")
    ap.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--lr", type=float, default=2e-4, help="adapter methods; full FT uses lr/10")
    ap.add_argument("--sorsa-gamma", type=float, default=4e-4)
    ap.add_argument("--eval-examples", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=0, help="0: only after the last step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--methods", nargs="+",
                    default=["lora", "pissa", "qlora", "loftq", "qpissa", "qpissa+sorsa", "full"])
    return ap.parse_args(argv)


def decomposed(args, method: str) -> tuple[Path, dict]:
    """Decompose once per method into WORK/decompose/METHOD (reused when already complete)."""
    from qpissa.decompose import decompose

    out = args.work / "decompose" / method
    iters = args.iters if method in ("loftq", "qpissa") else 1
    if not (out / "report.json").exists():
        t0 = time.perf_counter()
        decompose(args.model, out, method=method, rank=args.rank, iters=iters, targets=args.targets,
                  loftq_baseline=False, overwrite=True, progress=False)
        (out / "seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}")
    overall = json.loads((out / "report.json").read_text())["overall"]
    return out, {"init_error_frobenius": overall["method"]["frobenius"],
                 "init_reduction_vs_qlora_frobenius": overall["reduction_vs_qlora"]["frobenius"],
                 "decompose_s": float((out / "seconds.txt").read_text()) if (out / "seconds.txt").exists() else None}


def recipe(args: argparse.Namespace, output: Path) -> dict:
    """The TrainConfig fields shared by every method (data, steps, lr schedule, evaluation)."""
    from qpissa.data import DataConfig

    return dict(data=str(args.gsm8k / "train.jsonl"), eval_data=str(args.gsm8k / "test.jsonl"), output=str(output),
                steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.03, seed=0,
                eval_every=args.eval_every or args.steps, eval_examples=args.eval_examples, progress=True,
                data_cfg=DataConfig(max_length=args.max_length, skip_long_prompts=True))


def main() -> None:
    args = parse()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    from qpissa.train import TrainConfig, train

    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in args.methods:
        extra: dict = {}
        common = recipe(args, args.work / "runs" / name)
        if name == "lora":
            cfg = TrainConfig(model=str(args.model), method="lora", lora_rank=args.rank, **common)
        elif name == "full":
            cfg = TrainConfig(model=str(args.model), method="full", **{**common, "lr": args.lr / 10})
        else:
            base = "qpissa" if name == "qpissa+sorsa" else name
            out, extra = decomposed(args, base)
            cfg = TrainConfig(model=str(out), sorsa_gamma=args.sorsa_gamma if name == "qpissa+sorsa" else 0.0,
                              **common)
        import shutil

        shutil.rmtree(cfg.output, ignore_errors=True)
        t0 = time.perf_counter()
        summary = train(cfg)
        rows = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
        tail = rows[-max(1, args.steps // 5):]
        results[name] = {**extra, "train_loss_last20pct": sum(r["loss"] for r in tail) / len(tail),
                         "eval_loss": summary["eval_loss"],
                         "eval_curve": [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r],
                         "train_curve": [r["loss"] for r in rows], "lr": cfg.lr,
                         "train_s": time.perf_counter() - t0, "tokens": summary["tokens"]}
        if name == "full":
            shutil.rmtree(Path(cfg.output), ignore_errors=True)  # 0.5 GB of fp32 weights + optimizer

    table = Table(title=f"GSM8K convergence, SmolLM2-135M, r={args.rank}, {args.steps} steps × {args.batch_size} "
                        f"seq ≤{args.max_length}, targets {' '.join(args.targets)}")
    for col in ("method", "init err red. vs QLoRA (Frob.)", "train loss (last 20%)", "eval loss", "train s"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        red = r.get("init_reduction_vs_qlora_frobenius")
        table.add_row(name, "—" if red is None else f"{100 * red:.1f}%", f"{r['train_loss_last20pct']:.4f}",
                      f"{r['eval_loss']:.4f}", f"{r['train_s']:.0f}")
    Console().print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        curve = r["train_curve"]
        k = max(1, len(curve) // 10)
        smooth = [sum(curve[max(0, i - k + 1):i + 1]) / len(curve[max(0, i - k + 1):i + 1]) for i in range(len(curve))]
        ax1.plot(range(1, len(curve) + 1), smooth, label=name)
        ax2.plot(*zip(*r["eval_curve"]), "o-", label=name)
    ax1.set(xlabel="step", ylabel=f"train loss (moving avg {k})", title="training loss")
    ax2.set(xlabel="step", ylabel="held-out GSM8K loss", title=f"eval loss ({args.eval_examples} test examples)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    fig.savefig(out_dir / "train_convergence.png", dpi=100, bbox_inches="tight")
    payload = {"benchmark": "train_convergence", "device": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "args": {
                   k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "results": results,
               "claims": {k: results[a]["eval_loss"] < results[b]["eval_loss"] for k, a, b in [
                   ("pissa_below_lora", "pissa", "lora"), ("qpissa_below_qlora", "qpissa", "qlora"),
                   ("qpissa_below_loftq", "qpissa", "loftq")] if a in results and b in results}}
    (out_dir / "train_convergence.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload["claims"]))


if __name__ == "__main__":
    main()
