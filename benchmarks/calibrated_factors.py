"""Why calibrated QPiSSA starts closest and trains worse: the scale of its factors, measured.

For QPiSSA(T) and calibrated QPiSSA(T) (two `qpissa decompose` outputs) and the calibrated one with its factors
re-balanced (``--balance-factors``: B' = B·D, A' = D⁻¹·A, D a power of two per rank-1 pair, B·A unchanged bit for bit,
applied here to the loaded adapter), on SmolLM2 with the study's training settings:

- factor scale: Σ‖A‖², Σ‖B‖² and per rank-1 pair log2(‖B_:,i‖/‖A_i,:‖) (PiSSA's √σ split gives 0);
- gradients at step 1 (one batch, before clipping): ‖∇A‖ and ‖∇B‖ summed over modules, and the global norm;
- the effective update per optimizer step (AdamW, the study's lr schedule): ‖Δ(s·B·A)‖ over all modules, split into
  the A side ‖s·B·ΔA‖ and the B side ‖s·ΔB·A‖, relative to ‖s·B·A‖;
- held-out loss before and after the steps.

Usage (decompose first; calibration rows = the first 64 of GSM8K train, which the fixture holds):
  qpissa decompose MODEL -o /tmp/m_plain --method qpissa --iters 5 --rank 16
  qpissa decompose MODEL -o /tmp/m_cal --method qpissa --iters 5 --rank 16 --calib-data tests/fixtures/gsm8k/train.jsonl --calib-samples 64
  python benchmarks/calibrated_factors.py --plain /tmp/m_plain --cal /tmp/m_cal --steps 20 --threads 1
writes benchmarks/results/calibrated_factors.json.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def factor_stats(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Scale of A and B and how each rank-1 pair's σ is split between them."""
    logs, a2, b2 = [], 0.0, 0.0
    for a, b in pairs:
        a, b = a.detach().float(), b.detach().float()
        na, nb = a.norm(dim=1), b.norm(dim=0)  # (r,) (r,)
        logs.append(torch.log2(nb / na))
        a2, b2 = a2 + float(a.pow(2).sum()), b2 + float(b.pow(2).sum())
    logs = torch.cat(logs)
    q = torch.quantile(logs, torch.tensor([0.05, 0.5, 0.95]))
    return {"sum_sq_A": a2, "sum_sq_B": b2, "log2_B_over_A_p05_p50_p95": [round(float(v), 3) for v in q]}


def run(init_dir: Path, balance: bool, args, examples, eval_examples, tokenizer) -> dict:
    from qpissa.data import batches, DataPosition
    from qpissa.decompose.linalg import balance_factors
    from qpissa.train import TrainConfig
    from qpissa.train.metrics import evaluate_loss
    from qpissa.train.model import load_model
    from qpissa.train.optim import lr_factor, make_optimizer
    from qpissa.train.sorsa import adapter_pairs

    cfg = TrainConfig(model=str(init_dir), method="from-out", data="", output="", lr=args.lr, device="cpu",
                      precision="bf16", seed=args.seed)
    model, _ = load_model(cfg)
    pairs = adapter_pairs(model)
    scales = [m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")]
    if balance:
        with torch.no_grad():
            for a, b in pairs:
                a2, b2 = balance_factors(a.data, b.data)
                before = b.data.float() @ a.data.float()
                a.data.copy_(a2), b.data.copy_(b2)
                assert torch.equal(b.data.float() @ a.data.float(), before)  # B·A unchanged bit for bit
    out = {"init": str(init_dir), "balanced": balance, "factors": factor_stats(pairs)}
    pad = tokenizer.pad_token_id
    out["eval_loss_start"] = evaluate_loss(model, eval_examples, 2, pad, "cpu", "bf16")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    warmup = int(round(0.03 * args.total_steps))
    stream = batches(examples, 2, args.seed, pad, DataPosition())
    model.train()
    steps = []
    for step in range(args.steps):
        batch, _ = next(stream)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        ga = math.sqrt(sum(float(a.grad.float().pow(2).sum()) for a, _ in pairs))
        gb = math.sqrt(sum(float(b.grad.float().pow(2).sum()) for _, b in pairs))
        total = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        old = [(a.detach().float().clone(), b.detach().float().clone()) for a, b in pairs]
        for g in optimizer.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.total_steps, warmup, "cosine")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        d2 = da2 = db2 = w2 = 0.0
        for (a0, b0), (a, b), s in zip(old, pairs, scales):
            a1, b1 = a.detach().float(), b.detach().float()
            d2 += float((s * (b1 @ a1 - b0 @ a0)).pow(2).sum())
            da2 += float((s * (b0 @ (a1 - a0))).pow(2).sum())
            db2 += float((s * ((b1 - b0) @ a0)).pow(2).sum())
            w2 += float((s * (b0 @ a0)).pow(2).sum())
        steps.append({"step": step + 1, "loss": float(loss.detach()), "grad_A": ga, "grad_B": gb, "grad_global": total,
                      "update": math.sqrt(d2), "update_A_side": math.sqrt(da2), "update_B_side": math.sqrt(db2),
                      "update_relative": math.sqrt(d2 / w2)})
    out["steps"] = steps
    out["eval_loss_end"] = evaluate_loss(model, eval_examples, 2, pad, "cpu", "bf16")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plain", type=Path, required=True, help="qpissa decompose output, uncalibrated")
    p.add_argument("--cal", type=Path, required=True, help="qpissa decompose output, --calib-data")
    p.add_argument("--data", default=str(ROOT / "tests/fixtures/gsm8k/train.jsonl"))
    p.add_argument("--eval-data", default=str(ROOT / "tests/fixtures/gsm8k/test.jsonl"))
    p.add_argument("--eval-examples", type=int, default=40)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--total-steps", type=int, default=200, help="the schedule's length (the study's 200 steps)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results" / "calibrated_factors.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from qpissa.atomic import write_json
    from qpissa.data import DataConfig, build_examples, load_records

    tokenizer = AutoTokenizer.from_pretrained(args.plain / "residual")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dcfg = DataConfig(template="gsm8k", max_length=160, skip_long_prompts=True)  # the study's data settings
    examples = build_examples(load_records(args.data), tokenizer, dcfg)
    eval_examples = build_examples(load_records(args.eval_data)[:args.eval_examples], tokenizer, dcfg)
    t0 = time.perf_counter()
    results = {name: run(path, bal, args, examples, eval_examples, tokenizer)
               for name, path, bal in (("qpissa", args.plain, False), ("qpissa-cal", args.cal, False),
                                       ("qpissa-cal-bal", args.cal, True))}
    write_json(args.out, {"command": "python benchmarks/calibrated_factors.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "seconds": round(time.perf_counter() - t0, 1), "results": results})
    for name, r in results.items():
        s1 = r["steps"][0]
        print(f"{name:15s} ΣA²={r['factors']['sum_sq_A']:.4g} ΣB²={r['factors']['sum_sq_B']:.4g} "
              f"log2(B/A)={r['factors']['log2_B_over_A_p05_p50_p95']} ‖∇A‖={s1['grad_A']:.3g} ‖∇B‖={s1['grad_B']:.3g} "
              f"update/step (mean) {sum(s['update_relative'] for s in r['steps']) / len(r['steps']):.3g} "
              f"eval {r['eval_loss_start']:.4f} → {r['eval_loss_end']:.4f}")


if __name__ == "__main__":
    main()
