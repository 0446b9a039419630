"""Expert decompose kernel alone: per-matrix QPiSSA vs one batch, at Qwen3-30B-A3B's expert shapes, in one run.

Per kind (gate_up 1536×2048, down 2048×768) one batch of experts as the driver forms it (≤ 7M weights:
2 gate_up or 4 down experts) of ``synthetic_checkpoint.synthetic_linear`` weights, decomposed with decompose's
defaults for a large model (qpissa r=16, T=1, refit, randomized SVD p=16 q=4, QLoRA baseline, no LoftQ baseline):
``methods.qpissa`` + the QLoRA baseline on each matrix, then ``experts_batch.qpissa_batch`` + the batched baseline
with the sketch in fp32 and in bf16 (the shipped default). CPU seconds (process time: robust on a shared machine,
where wall time measures the neighbours) per expert, best of ``--repeat``, and the ratio.

Usage: python benchmarks/moe_batch_kernel.py [--threads 1] [--repeat 3]
Writes benchmarks/results/moe_batch_kernel.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    import torch

    from synthetic_checkpoint import _generator, synthetic_linear
    from qpissa.decompose.experts_batch import BATCH_WEIGHTS, StackNF4, qpissa_batch
    from qpissa.decompose.heap import reuse_freed_heap
    from qpissa.decompose.methods import SvdOptions, qpissa
    from qpissa.quant import minus_dequantized, quantize_nf4

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_heap()  # as the decompose driver does
    rows = []
    for kind, (m, n) in (("gate_up_proj", (1536, 2048)), ("down_proj", (2048, 768))):
        e = max(1, BATCH_WEIGHTS // (m * n))
        w = torch.stack([synthetic_linear(m, n, _generator(0, f"{kind}.{i}")).float() for i in range(e)])

        def per_matrix():
            for i in range(e):
                qpissa(w[i], 16, 1.0, svd=SvdOptions("randomized"))
                torch.linalg.vector_norm(minus_dequantized(w[i], quantize_nf4(w[i])))

        def batch(sketch):
            qpissa_batch(w, 16, 1.0, iters=1, blocksize=64, oversample=16, power_iters=4, seed=0,
                         adapter_dtype=torch.bfloat16, refit=True, sketch=sketch)
            torch.linalg.vector_norm(w - StackNF4(w, 64).dequantize(), dim=(1, 2))

        def best(fn) -> float:
            fn()  # warm-up
            times = []
            for _ in range(args.repeat):
                t0 = time.process_time()
                fn()
                times.append((time.process_time() - t0) / e)
            return min(times)

        row = {"kind": kind, "shape": [m, n], "batch": e, "per_matrix_s": best(per_matrix),
               "batch_fp32_sketch_s": best(lambda: batch(None)), "batch_bf16_sketch_s": best(lambda: batch(torch.bfloat16))}
        row["speedup_fp32_sketch"] = row["per_matrix_s"] / row["batch_fp32_sketch_s"]
        row["speedup_bf16_sketch"] = row["per_matrix_s"] / row["batch_bf16_sketch_s"]
        rows.append(row)
    per = sum(r["per_matrix_s"] for r in rows)
    bat = sum(r["batch_bf16_sketch_s"] for r in rows)
    result = {"threads": args.threads, "repeat": args.repeat, "rows": rows,
              "one_expert_both_kinds": {"per_matrix_s": per, "batch_s": bat, "speedup": per / bat}}
    (Path(__file__).parent / "results" / "moe_batch_kernel.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| kind | shape | batch | per-matrix CPU s/expert | batch fp32 sketch | batch bf16 sketch | speedup (bf16) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['shape'][0]}×{r['shape'][1]} | {r['batch']} | {r['per_matrix_s']:.4f} | "
              f"{r['batch_fp32_sketch_s']:.4f} | {r['batch_bf16_sketch_s']:.4f} | {r['speedup_bf16_sketch']:.2f}× |")
    print(f"one expert (gate_up + down): {per:.4f} → {bat:.4f} CPU s, {per / bat:.2f}×")


if __name__ == "__main__":
    main()
