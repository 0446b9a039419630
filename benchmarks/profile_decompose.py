"""Where does `qpissa decompose` spend its time? cProfile of the real driver, grouped by stage.

Runs :func:`qpissa.decompose.decompose` in this process under cProfile with a CPU-time clock
(``time.process_time``), ``torch.set_num_threads(--threads)`` (default 1) and ``workers=1``, so the breakdown is
the work done, not the wait for a loaded machine. The per-tensor work runs in the driver's worker thread: a
second profiler wraps each ``_process_one`` call there and the two are merged. Stages are cumulative times of
the driver's own functions (nested stages are listed indented: their time is inside the parent's).

Usage: python benchmarks/profile_decompose.py MODEL [--threads 1] [--layers 0-2] [decompose kwargs as k=v ...]
  e.g. python benchmarks/profile_decompose.py ~/.cache/qpissa-test-assets/smollm2-135m-instruct iters=5
Writes benchmarks/results/profile_decompose.json (one entry per distinct argument set) and prints a table.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "profile_decompose.json"

# (label, module file suffix, function name, depth)
STAGES = [
    ("imports and target discovery (find_targets)", "targets.py", "find_targets", 0),
    ("per-tensor work (_process_one)", "driver.py", "_process_one", 0),
    ("read weight (load_tensor)", "formats.py", "load_tensor", 1),
    ("decompose_tensor", "tensor.py", "decompose_tensor", 1),
    ("method (initialize)", "initialize.py", "initialize", 2),
    ("LoftQ baseline", "methods.py", "loftq", 2),
    ("SVD exact", "linalg.py", "exact_svd", 2),
    ("SVD randomized", "linalg.py", "randomized_svd", 2),
    ("NF4 quantize", "quant.py", "quantize_nf4", 2),
    ("NF4 dequantize (whole)", "quant.py", "dequantize_nf4", 2),
    ("NF4 dequantize (row chunks)", "nf4_cpu.py", "dequantize_nf4_cpu", 2),
    ("error E = W − deq Q − sBA (_error)", "methods.py", "_error", 2),
    ("error norms (svdvals + Frobenius)", "linalg.py", "error_norms", 2),
    ("write part (save_tensors)", "formats.py", "save_tensors", 1),
    ("sha256 of parts", "driver.py", "_sha256", 1),
    ("manifest.json rewrites (write_json)", "atomic.py", "write_json", 0),
    ("assemble shards + adapter (assemble)", "assemble.py", "assemble", 0),
    ("reports (write_report)", "report.py", "write_report", 0),
]


def stage_times(stats: pstats.Stats) -> dict[str, dict]:
    out = {}
    for label, file, func, depth in STAGES:
        cum, calls = 0.0, 0
        for (fname, _, name), (cc, nc, tt, ct, callers) in stats.stats.items():
            if name == func and fname.endswith(file):
                cum += ct
                calls += nc
        out[label] = {"seconds": cum, "calls": calls, "depth": depth}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", default=None, help="only these block indices, e.g. 0-2 (default: all)")
    parser.add_argument("--output", type=Path, default=RESULT)
    parser.add_argument("--top", type=int, default=0, help="also print the N most expensive functions (cumulative)")
    parser.add_argument("kwargs", nargs="*", help="decompose keyword arguments, k=v (JSON values)")
    args = parser.parse_intermixed_args()
    import torch

    torch.set_num_threads(args.threads)
    from qpissa.decompose import decompose

    kwargs = {}
    for kv in args.kwargs:
        k, v = kv.split("=", 1)
        try:
            kwargs[k] = json.loads(v)
        except json.JSONDecodeError:
            kwargs[k] = v
    if args.layers:
        lo, hi = (int(x) for x in args.layers.split("-"))
        kwargs["targets"] = [rf".*\.({'|'.join(str(i) for i in range(lo, hi + 1))})\..*"]
    from qpissa.decompose import driver

    prof, worker_prof = cProfile.Profile(time.process_time), cProfile.Profile(time.process_time)
    process_one = driver._process_one

    def profiled(*a, **k):  # runs in the worker thread, where cProfile's main-thread hook does not reach
        worker_prof.enable()
        try:
            return process_one(*a, **k)
        finally:
            worker_prof.disable()

    driver._process_one = profiled
    kwargs.setdefault("workers", 1)
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        prof.enable()
        report = decompose(args.model, Path(tmp) / "out", progress=False, **kwargs)
        prof.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    driver._process_one = process_one
    stats = pstats.Stats(prof)
    stats.add(worker_prof)
    stages = stage_times(stats)
    key = json.dumps({"model": args.model.name, "layers": args.layers, "threads": args.threads, **kwargs},
                     sort_keys=True)
    entry = {"wall_s": wall, "cpu_s": cpu, "modules": report["overall"]["modules"], "stages": stages,
             "metrics": report.get("metrics_computed")}
    print(f"{key}\nwall {wall:.1f} s, CPU {cpu:.1f} s (threads={args.threads}), {entry['modules']} modules")
    for label, s in stages.items():
        if s["calls"]:
            print(f"  {'  ' * s['depth']}{label:<42} {s['seconds']:8.2f} s CPU {100 * s['seconds'] / cpu:5.1f}%"
                  f"  ({s['calls']} calls)")
    if args.top:
        stats.sort_stats("cumulative").print_stats(args.top)
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    results[key] = entry
    from qpissa.atomic import write_json

    write_json(args.output, results)


if __name__ == "__main__":
    main()
