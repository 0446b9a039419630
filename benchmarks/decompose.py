"""Decomposition benchmark: `qpissa decompose` (DEFAULT settings) vs PEFT's PiSSA path, and error sweep.

1. Path comparison, r=16, each run a fresh subprocess timed by this process (wall, interpreter start to exit),
   the sides ALTERNATING (ours T=1, PEFT, ours T=5, then again for --repeats) so load hits them alike:
   ours T=1 = the CLI `qpissa decompose MODEL --rank 16 --quiet` with DEFAULT settings (QPiSSA T=1, randomized
             SVD, refit, QLoRA baseline; LoftQ and nuclear/spectral norms auto by size)
   ours T=5 = the same with `--iters 5`
   peer     = PEFT: load the fp32 model, `get_peft_model(..., init_lora_weights="pissa_niter_4")`, save the
              residual (unload) and the adapter, reload the residual in 4-bit (bnb NF4) + the adapter.
   Reported: median wall time, peak RSS (VmHWM of the child: ru_maxrss would include this
   process's size at fork), Σ‖W − deq(Q) − s·B·A‖_F and the ratios
   ours/PEFT (goals: T=1 ≤ 0.7, T=5 ≤ 2, error ≤ PEFT's).
2. Error sweep (--sweep): reduction vs QLoRA (Frobenius and nuclear, summed over modules) for qpissa(T=1,5)
   and loftq(T=5) at r ∈ {8, 16, 64, 128}.

Usage: python benchmarks/decompose.py [--smollm2 DIR] [--threads N] [--repeats K] [--sweep [--quick]]
Writes benchmarks/results/decompose.json and prints tables. On a loaded machine say so beside the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

from qpissa.atomic import write_json
from qpissa.decompose import default_model_dir
from qpissa.formats import scan_checkpoint
from qpissa.decompose.initialize import initialize
from qpissa.quant import nf4_roundtrip
from qpissa.decompose.targets import find_targets

console = Console(width=160)
RESULTS = Path(__file__).resolve().parent / "results"

CHILD_OURS = textwrap.dedent('''
    import json, resource, sys
    from qpissa.cli import main
    sys.argv = ["qpissa", "decompose", *sys.argv[1:]]
    try:
        main()
    except SystemExit as err:
        if err.code:
            raise
    from qpissa.train.metrics import peak_rss_mb
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "cpu_s": ru.ru_utime + ru.ru_stime}))
''')

CHILD_PEFT = textwrap.dedent('''
    import json, resource, sys, time
    t = time.perf_counter()
    import torch, transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BitsAndBytesConfig
    model_dir, out, rank, targets, auto = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
    cls = getattr(transformers, auto)
    model = cls.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                                  init_lora_weights="pissa_niter_4"))
    peft_model.peft_config["default"].init_lora_weights = True  # else PEFT re-runs PiSSA on the 4-bit reload
    peft_model.save_pretrained(out + "/adapter")
    peft_model.unload().save_pretrained(out + "/residual")
    del model, peft_model
    q = cls.from_pretrained(out + "/residual", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    q = PeftModel.from_pretrained(q, out + "/adapter")
    from qpissa.train.metrics import peak_rss_mb
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "cpu_s": ru.ru_utime + ru.ru_stime}))
''')


def run_child(code: str, *args: str, threads: int | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON; ``seconds`` = wall time seen from here."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(code)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp, env=env)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": seconds}


def peft_error(model_dir: Path, out: Path, modules: list[str]) -> float:
    """Σ‖W − deq(NF4(R_peft)) − s·B·A‖_F from PEFT's saved residual and adapter (fp32)."""
    total = 0.0
    res_files = list((out / "residual").glob("*.safetensors"))
    adapter = {}
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        for k in f.keys():
            adapter[k] = f.get_tensor(k)
    res = {}
    for rf in res_files:
        with safe_open(str(rf), "pt") as f:
            res.update({k: f.get_tensor(k) for k in f.keys()})
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    infos = {t.name: t for t in scan_checkpoint(model_dir)}
    for m in modules:
        info = infos[f"{m}.weight"]
        with safe_open(str(info.file), "pt") as f:
            w = f.get_tensor(info.name).float()
        key = next(k for k in res if k.endswith(f"{m}.weight"))
        a = adapter[f"base_model.model.{m}.lora_A.weight"].float()
        b = adapter[f"base_model.model.{m}.lora_B.weight"].float()
        total += float(torch.linalg.vector_norm(w - nf4_roundtrip(res[key].float())[1] - scale * b @ a))
    return total


def compare_paths(name: str, model_dir: Path, rank: int, auto: str, repeats: int, threads: int | None) -> dict:
    """Alternate ours T=1, PEFT, ours T=5 ``repeats`` times; medians and ratios ours/PEFT."""
    targets, *_ = find_targets(model_dir, scan_checkpoint(model_dir), None)
    modules = [t.module for t in targets]
    runs: dict[str, list[dict]] = {"ours_t1": [], "peft": [], "ours_t5": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            for key, extra in (("ours_t1", []), ("peft", None), ("ours_t5", ["--iters", "5"])):
                out = f"{tmp}/{key}"
                if extra is None:
                    r = run_child(CHILD_PEFT, str(model_dir), out, str(rank), json.dumps(modules), auto, threads=threads)
                    r["error_frobenius"] = peft_error(model_dir, Path(out), modules)
                else:
                    r = run_child(CHILD_OURS, str(model_dir), "--rank", str(rank), "--output", out, "--quiet", *extra,
                                  threads=threads)
                    report = json.loads(Path(f"{out}/report.json").read_text())
                    r["error_frobenius"] = report["overall"]["method"]["frobenius"]
                    r["metrics_computed"] = report.get("metrics_computed")
                runs[key].append(r)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("seconds", "cpu_s", "peak_rss_mb", "error_frobenius")}
           for k, v in runs.items()}
    return {"model": name, "rank": rank, "modules": len(modules), "repeats": repeats, "runs": runs, "median": med,
            "metrics_computed": runs["ours_t1"][0]["metrics_computed"],
            "time_ratio_ours_t1_over_peft": med["ours_t1"]["seconds"] / med["peft"]["seconds"],
            "time_ratio_ours_t5_over_peft": med["ours_t5"]["seconds"] / med["peft"]["seconds"],
            "error_ratio_ours_t1_over_peft": med["ours_t1"]["error_frobenius"] / med["peft"]["error_frobenius"],
            "error_ratio_ours_t5_over_peft": med["ours_t5"]["error_frobenius"] / med["peft"]["error_frobenius"],
            "cpu_ratio_ours_t1_over_peft": med["ours_t1"]["cpu_s"] / med["peft"]["cpu_s"],
            "cpu_ratio_ours_t5_over_peft": med["ours_t5"]["cpu_s"] / med["peft"]["cpu_s"],
            "rss_ratio_ours_t1_over_peft": med["ours_t1"]["peak_rss_mb"] / med["peft"]["peak_rss_mb"]}


def sweep(name: str, model_dir: Path, ranks: list[int], every_nth_layer: int = 1) -> list[dict]:
    """Reduction vs QLoRA for qpissa(T=1,5) and loftq(T=5) at each rank (exact SVD, NF4 blocksize 64)."""
    targets, *_ = find_targets(model_dir, scan_checkpoint(model_dir), None)
    targets = [t for t in targets if int(t.module.split(".")[2 if "layers" in t.module else 2]) % every_nth_layer == 0]
    variants = {"qpissa T=1": ("qpissa", 1), "qpissa T=5": ("qpissa", 5), "loftq T=5": ("loftq", 5)}
    sums = {r: {v: {"frobenius": 0.0, "nuclear": 0.0} for v in [*variants, "qlora"]} for r in ranks}
    for t in targets:
        with safe_open(str(t.weight.file), "pt") as f:
            w = f.get_tensor(t.weight.name).float()
        q_err = w - nf4_roundtrip(w)[1]
        q_nuc, q_fro = float(torch.linalg.svdvals(q_err).sum()), float(torch.linalg.vector_norm(q_err))
        for r in ranks:
            sums[r]["qlora"]["frobenius"] += q_fro
            sums[r]["qlora"]["nuclear"] += q_nuc
            for v, (method, iters) in variants.items():
                e = w - initialize(method, w, r, 1.0, iters=iters).reconstruction()
                sums[r][v]["frobenius"] += float(torch.linalg.vector_norm(e))
                sums[r][v]["nuclear"] += float(torch.linalg.svdvals(e).sum())
    rows = []
    for r in ranks:
        for v in variants:
            rows.append({"model": name, "modules": len(targets), "rank": r, "variant": v,
                         **{f"reduction_{n}": 1 - sums[r][v][n] / sums[r]["qlora"][n] for n in ("frobenius", "nuclear")}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", type=Path, default=Path.home() / ".cache/qpissa-test-assets/smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of every child (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds (medians reported)")
    parser.add_argument("--minilm", action="store_true", help="also compare on all-MiniLM-L6-v2")
    parser.add_argument("--sweep", action="store_true", help="also run the error sweep (slow)")
    parser.add_argument("--quick", action="store_true", help="sweep: ranks 8,16 only; SmolLM2 every 10th layer")
    parser.add_argument("--output", type=Path, default=RESULTS / "decompose.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [("all-MiniLM-L6-v2", default_model_dir(), "AutoModel", 1)] if args.minilm else []
    if (args.smollm2 / "model.safetensors").exists():
        models.append(("SmolLM2-135M-Instruct", args.smollm2, "AutoModelForCausalLM", 10 if args.quick else 5))
    else:
        console.print(f"[yellow]SmolLM2 not found at {args.smollm2}; make it with `qpissa example smollm2 DIR`")
    ranks = [8, 16] if args.quick else [8, 16, 64, 128]
    result = {"device": platform.processor() or platform.machine(), "threads": args.threads or torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(), "paths": [], "sweep": []}
    for name, d, auto, _ in models:
        result["paths"].append(compare_paths(name, d, 16, auto, args.repeats, args.threads))
    result["loadavg_end"] = os.getloadavg()
    t = Table(title="`qpissa decompose MODEL --rank 16` (DEFAULT settings) vs PEFT pissa_niter_4 + save + NF4 reload; "
                    "wall s of each process, sides alternating")
    for c in ("model", "modules", "ours T=1 s", "ours T=5 s", "PEFT s", "T=1/PEFT (≤0.7)", "T=5/PEFT (≤2)",
              "CPU s T=1/T=5/PEFT", "err T=1/PEFT (≤1)", "err T=5/PEFT", "RSS MB ours/PEFT"):
        t.add_column(c, justify="right")
    for p in result["paths"]:
        m = p["median"]
        t.add_row(p["model"], str(p["modules"]), f"{m['ours_t1']['seconds']:.1f}", f"{m['ours_t5']['seconds']:.1f}",
                  f"{m['peft']['seconds']:.1f}", f"{p['time_ratio_ours_t1_over_peft']:.2f}",
                  f"{p['time_ratio_ours_t5_over_peft']:.2f}",
                  f"{m['ours_t1']['cpu_s']:.1f}/{m['ours_t5']['cpu_s']:.1f}/{m['peft']['cpu_s']:.1f}",
                  f"{p['error_ratio_ours_t1_over_peft']:.4f}",
                  f"{p['error_ratio_ours_t5_over_peft']:.4f}",
                  f"{m['ours_t1']['peak_rss_mb']:.0f}/{m['peft']['peak_rss_mb']:.0f}")
    console.print(t)
    for p in result["paths"]:
        console.print(f"{p['model']}: metrics computed by the default run: {p['metrics_computed']}")
    console.print(f"load average at start {result['loadavg_start']}, at end {result['loadavg_end']} "
                  f"on {os.cpu_count()} CPUs")
    if args.sweep:
        start = time.perf_counter()
        for name, d, _, nth in models:
            result["sweep"] += sweep(name, d, ranks, nth)
        result["sweep_seconds"] = time.perf_counter() - start
        t = Table(title="error reduction vs QLoRA (NF4 of W), exact SVD, blocksize 64, α = r")
        for c in ("model", "modules", "rank", "variant", "Frobenius", "nuclear"):
            t.add_column(c, justify="right")
        for row in result["sweep"]:
            t.add_row(row["model"], str(row["modules"]), str(row["rank"]), row["variant"],
                      f"{100 * row['reduction_frobenius']:.1f}%", f"{100 * row['reduction_nuclear']:.1f}%")
        console.print(t)
    write_json(args.output, result)
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
