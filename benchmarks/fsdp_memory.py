"""Check ``qpissa plan --fsdp --gpus 2`` against the measured per-rank peak of ``train --fsdp`` on CPU.

Each of 2 gloo ranks (torchrun) loads a decompose OUT exactly as ``qpissa train --fsdp`` does
(:func:`qpissa.train.model.load_model`, then :func:`qpissa.train.fsdp.shard`: FSDP2 per block + root),
and trains a few steps of a batch of random tokens with AdamW, without autocast (bf16 base, fp32
adapters: the setting benchmarks/plan_memory.py checks the single-process planner in). Measurement as
there (the libraries the load imports and the tokenizer are built before the baseline):
``MALLOC_MMAP_THRESHOLD_=65536`` (every tensor its own mmap, unmapped on free), the kernel's high-water
mark VmHWM reset through ``/proc/self/clear_refs`` after one warm-up step; measured = VmHWM − that baseline. The planner sees only config.json.

Run: ``qpissa decompose SMOLLM2 OUT --rank 16`` then
``python benchmarks/fsdp_memory.py OUT [--batch-size 1 --seq-len 128]`` → benchmarks/results/fsdp_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fsdp_memory.json"


def worker(out: str, batch: int, seq: int, steps: int) -> None:
    """One rank: load + shard as train --fsdp does, train ``steps`` steps, print its RSS figures as JSON."""
    import gc

    import peft  # noqa: F401 - imported before the baseline: the figures exclude the libraries' own memory
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401

    from qpissa.train import fsdp
    from qpissa.train.config import TrainConfig
    from qpissa.train.metrics import proc_status_bytes
    from qpissa.train.model import load_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    # libraries the load imports and the tokenizer it builds are not training memory (the planner's
    # overhead=0): import / build them before the baseline
    import bitsandbytes  # noqa: F401
    import peft.tuners.lora.bnb  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(Path(out) / "residual"))
    gc.collect()
    base = proc_status_bytes("VmRSS")
    model, _ = load_model(TrainConfig(model=out, data="unused", output="unused", fsdp=True, precision="bf16"))
    fsdp.shard(model, "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gc.collect()
    static = proc_status_bytes("VmRSS") - base
    g = torch.Generator().manual_seed(dist.get_rank())
    peaks, times = [], []
    for step in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)  # (B, L)
        if step == 1:
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        fsdp.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
        times.append(time.perf_counter() - t0)
        if step >= 1:
            peaks.append(proc_status_bytes("VmHWM") - base)
    maps = [ln for ln in Path("/proc/self/maps").read_text().splitlines() if ".safetensors" in ln]
    del tokenizer
    print("FSDP_MEM " + json.dumps({"rank": dist.get_rank(), "static_rss": static, "peak_rss": max(peaks),
                                    "step_s": times, "safetensors_maps": len(maps)}), flush=True)
    dist.destroy_process_group()


def predict(out: str, batch: int, seq: int, ranks: int):
    from qpissa.plan.memory import PlanConfig, plan
    from qpissa.plan.model_shapes import load_config, shapes_from_config

    shapes = shapes_from_config(load_config(str(Path(out) / "residual")))
    rank = json.loads((Path(out) / "adapter" / "adapter_config.json").read_text())["r"]
    cfg = PlanConfig(method="qpissa", rank=rank, targets="all", batch_size=batch, seq_len=seq, optim="adamw",
                     dtype="bf16", adapter_dtype="fp32", overhead=0, device="cpu", gpus=ranks, fsdp=True)
    return plan(shapes, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="a `qpissa decompose` OUT of SmolLM2 (all targets)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.out, args.batch_size, args.seq_len, args.steps)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node", str(args.ranks), __file__, args.out, "--worker",
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    ranks = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("FSDP_MEM ")]
    p = predict(args.out, args.batch_size, args.seq_len, args.ranks)
    worst = max(r["peak_rss"] for r in ranks)
    result = {"command": " ".join(["python", "benchmarks/fsdp_memory.py", "OUT", "--batch-size", str(args.batch_size),
                                   "--seq-len", str(args.seq_len), "--steps", str(args.steps)]),
              "ranks": ranks, "predicted_total": p.total, "measured_peak_max": worst,
              "ratio": p.total / worst, "predicted": p.to_dict(), "cores": os.cpu_count()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"per-rank peak measured {[round(r['peak_rss'] / 2**20) for r in ranks]} MiB, planned "
          f"{p.total / 2**20:.0f} MiB (ratio {p.total / worst:.3f}) → {RESULTS}")


if __name__ == "__main__":
    main()
