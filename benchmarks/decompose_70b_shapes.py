"""Streaming-decompose cost of Llama-3-70B-shaped tensors with the real per-tensor driver.

Runs ``qpissa.decompose.decompose_tensor`` (QPiSSA T=1 + refit, randomized SVD p=16 q=4, r=128,
NF4 blocksize 64, Frobenius-only metrics) on one synthetic bf16 weight per shape with a decaying
spectrum (σ_i ∝ i^-0.6 on 512 directions + Gaussian noise), reports seconds and peak RSS, and
extrapolates to the 80 × 7 linears of Llama-3-70B. Usage: python benchmarks/decompose_70b_shapes.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"q/o 8192×8192": (8192, 8192), "k/v 1024×8192": (1024, 8192), "down 8192×28672": (8192, 28672)}
PER_LAYER = {"q/o 8192×8192": 2, "k/v 1024×8192": 2, "down 8192×28672": 3}  # gate/up (28672×8192) ≈ down
RESULT = Path(__file__).resolve().parent / "results" / "decompose_70b_shapes.json"


def one(m: int, n: int) -> dict:
    import torch

    from qpissa.decompose import DecomposeConfig, decompose_tensor
    from qpissa.formats import TensorInfo
    from qpissa.decompose.targets import Target
    from qpissa.train.metrics import peak_rss_mb

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(m, n, generator=gen) * 0.02
    u = torch.linalg.qr(torch.randn(m, 512, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, 512, generator=gen))[0]
    w += (u * (2.0 * torch.arange(1, 513, dtype=torch.float32) ** -0.6)) @ v.T
    w = w.bfloat16()
    del u, v
    target = Target("model.layers.0.x", TensorInfo("x.weight", Path("x"), (m, n), "BF16"), False)
    cfg = DecomposeConfig(method="qpissa", rank=128, iters=1, svd="randomized", loftq_baseline=False,
                          spectral_norms=False)
    start = time.perf_counter()
    _, metrics = decompose_tensor(target, w, cfg)
    return {"seconds": time.perf_counter() - start,
            "peak_rss_gib": peak_rss_mb() / 1024,
            "reduction_vs_qlora": 1 - metrics["method"]["frobenius"] / metrics["qlora"]["frobenius"]}


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(one(int(sys.argv[1]), int(sys.argv[2]))))
        return
    rows = {}
    for name, (m, n) in SHAPES.items():  # a fresh process per shape: peak RSS is that shape's alone
        out = subprocess.run([sys.executable, __file__, str(m), str(n)], capture_output=True, text=True, check=True)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: {rows[name]['seconds']:.1f} s, peak RSS {rows[name]['peak_rss_gib']:.2f} GiB")
    layer_s = sum(rows[k]["seconds"] * c for k, c in PER_LAYER.items())
    result = {"shapes": rows, "llama3_70b_hours": 80 * layer_s / 3600,
              "llama3_70b_peak_rss_gib": max(r["peak_rss_gib"] for r in rows.values())}
    print(f"Llama-3-70B (80 layers × 7 linears): ≈{result['llama3_70b_hours']:.1f} h, "
          f"peak ≈{result['llama3_70b_peak_rss_gib']:.1f} GiB")
    from qpissa.atomic import write_json

    write_json(RESULT, result)


if __name__ == "__main__":
    main()
