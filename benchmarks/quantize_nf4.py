"""NF4 quantization on the CPU: qpissa.nf4_cpu (chunked, compare-and-count) vs bitsandbytes' quantize_4bit.

For each real layer shape (Llama-3-8B q_proj 4096², gate/up 14336×4096, SmolLM2 gate 1536×576; fp32,
seeded N(0, 0.02²)), each thread count and each side, a FRESH subprocess: imports, makes the weight, warms
up on a small tensor, resets VmHWM (``/proc/self/clear_refs`` 5), quantizes once → peak RSS above that
baseline (the weight itself excluded, the outputs included), then times ``--repeats`` more calls (best wall
and CPU seconds). Both sides hash packed bytes + quant state: the table says whether they are identical.

Usage: python benchmarks/quantize_nf4.py [--repeats 3] [--threads 1 2] [--double-quant]
Writes benchmarks/results/quantize_nf4.json. Wall times on a loaded machine are inflated: say so.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "quantize_nf4.json"
SHAPES = {"llama3-8b q_proj 4096x4096": (4096, 4096), "llama3-8b gate_proj 14336x4096": (14336, 4096),
          "smollm2 gate_proj 1536x576": (1536, 576)}
SIDES = ("qpissa", "bitsandbytes")


def worker(side: str, m: int, n: int, threads: int, repeats: int, double_quant: bool) -> dict:
    """One side, one shape, in this (fresh) process."""
    import hashlib
    import time

    import torch

    torch.set_num_threads(threads)
    import bitsandbytes.functional as bnbf

    from qpissa.nf4_cpu import quantize_nf4_cpu
    from qpissa.train.metrics import proc_status_bytes

    def quantize(w):
        if side == "qpissa":
            return quantize_nf4_cpu(w, 64, double_quant)
        return bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")

    w = torch.randn(m, n, generator=torch.Generator().manual_seed(0)).mul_(0.02)  # (m, n) fp32
    quantize(torch.randn(256, 256))  # warm-up: lazy imports, kernel registration
    base = proc_status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    packed, state = quantize(w)
    peak = proc_status_bytes("VmHWM") - base
    digest = hashlib.sha256(packed.numpy().tobytes())
    for key, value in sorted(state.as_dict(packed=True).items()):
        digest.update(key.encode() + value.contiguous().view(torch.uint8).numpy().tobytes())
    del packed, state
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        quantize(w)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"side": side, "shape": [m, n], "threads": threads, "wall_s": min(wall), "cpu_s": min(cpu),
            "peak_above_baseline_bytes": peak, "weight_fp32_bytes": w.numel() * 4, "sha256": digest.hexdigest()}


def run(args) -> dict:
    rows = []
    for name, (m, n) in SHAPES.items():
        for threads in args.threads:
            pair = {}
            for side in SIDES:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, str(m), str(n), str(threads),
                       "--repeats", str(args.repeats)] + (["--double-quant"] if args.double_quant else [])
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT / "benchmarks")
                pair[side] = json.loads(out.stdout.strip().splitlines()[-1])
            ours, bnb = pair["qpissa"], pair["bitsandbytes"]
            rows.append({"shape_name": name, "shape": [m, n], "threads": threads, "qpissa": ours, "bitsandbytes": bnb,
                         "identical": ours["sha256"] == bnb["sha256"],
                         "speedup_wall": bnb["wall_s"] / ours["wall_s"], "speedup_cpu": bnb["cpu_s"] / ours["cpu_s"],
                         "peak_ratio_bnb_over_ours": bnb["peak_above_baseline_bytes"] / ours["peak_above_baseline_bytes"]})
            _print_row(rows[-1])
    return {"benchmark": "quantize_nf4", "blocksize": 64, "double_quant": args.double_quant,
            "repeats": args.repeats, "python": platform.python_version(), "machine": platform.processor() or
            platform.machine(), "rows": rows}


def _print_row(r: dict) -> None:
    o, b, mib = r["qpissa"], r["bitsandbytes"], 2 ** 20
    w = o["weight_fp32_bytes"]
    print(f"{r['shape_name']:<32} {r['threads']:>2}  {o['wall_s']:7.3f} {b['wall_s']:7.3f} {r['speedup_wall']:5.2f}x  "
          f"{o['cpu_s']:7.3f} {b['cpu_s']:7.3f} {r['speedup_cpu']:5.2f}x  "
          f"{o['peak_above_baseline_bytes'] / mib:7.0f} ({o['peak_above_baseline_bytes'] / w:4.2f}W) "
          f"{b['peak_above_baseline_bytes'] / mib:7.0f} ({b['peak_above_baseline_bytes'] / w:4.2f}W)  "
          f"{'yes' if r['identical'] else 'NO'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--worker", nargs=4, metavar=("SIDE", "M", "N", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, (m, n, threads) = args.worker[0], map(int, args.worker[1:])
        print(json.dumps(worker(side, m, n, threads, args.repeats, args.double_quant)))
        return
    print("shape                            thr  wall ours   bnb  speedup   cpu ours   bnb  speedup   "
          "peak MiB ours (×W fp32)  bnb (×W)   identical")
    result = run(args)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
