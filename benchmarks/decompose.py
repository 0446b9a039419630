"""Decomposition benchmark: ours vs PEFT's PiSSA path, and error reduction vs QLoRA across ranks.

1. Path comparison (each side in a fresh subprocess, run one after the other in this run):
   ours  = `decompose(method="qpissa", iters=1, svd="randomized", spectral_norms=False)`: streams tensor by
           tensor, refits A,B on the stored Q and measures its own and QLoRA's Frobenius error on the way
   peer  = PEFT: load the fp model, `get_peft_model(..., init_lora_weights="pissa_niter_4")`, save the
           residual (unload) and the adapter, reload the residual in 4-bit (bnb NF4) + the adapter.
   Reported: wall time, peak RSS (ru_maxrss of the child) and Σ‖W − deq(Q) − s·B·A‖_F, with ratios.
2. Error sweep: reduction vs QLoRA (Frobenius and nuclear, summed over modules) for qpissa(T=1,5)
   and loftq(T=5) at r ∈ {8, 16, 64, 128}.

Usage: python benchmarks/decompose.py [--smollm2 DIR] [--quick]
Writes benchmarks/results/decompose.json and prints tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
from qpissa.methods import initialize
from qpissa.quant import nf4_roundtrip
from qpissa.targets import find_targets

console = Console(width=160)
RESULTS = Path(__file__).resolve().parent / "results"

CHILD_OURS = textwrap.dedent('''
    import json, resource, sys, time
    t = time.perf_counter()
    from qpissa.decompose import decompose
    model, out, rank, targets = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    decompose(model, out, method="qpissa", rank=rank, iters=1, svd="randomized", power_iters=4, oversample=16,
              targets=targets, loftq_baseline=False, spectral_norms=False, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
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
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
''')


def run_child(code: str, *args: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(code)
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])


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


def compare_paths(name: str, model_dir: Path, rank: int, auto: str) -> dict:
    targets, *_ = find_targets(model_dir, scan_checkpoint(model_dir), None)
    modules = [t.module for t in targets]
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_child(CHILD_OURS, str(model_dir), f"{tmp}/ours", str(rank), json.dumps(modules))
        report = json.loads(Path(f"{tmp}/ours/report.json").read_text())
        ours["error_frobenius"] = report["overall"]["method"]["frobenius"]
        peer = run_child(CHILD_PEFT, str(model_dir), f"{tmp}/peft", str(rank), json.dumps(modules), auto)
        peer["error_frobenius"] = peft_error(model_dir, Path(f"{tmp}/peft"), modules)
    return {"model": name, "rank": rank, "modules": len(modules), "ours": ours, "peft": peer,
            "time_ratio_peft_over_ours": peer["seconds"] / ours["seconds"],
            "rss_ratio_peft_over_ours": peer["peak_rss_mb"] / ours["peak_rss_mb"],
            "error_ratio_ours_over_peft": ours["error_frobenius"] / peer["error_frobenius"]}


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
    parser.add_argument("--quick", action="store_true", help="ranks 8,16 only; SmolLM2 every 10th layer")
    parser.add_argument("--skip-paths", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS / "decompose.json")
    args = parser.parse_args()
    minilm = default_model_dir()
    models = [("all-MiniLM-L6-v2", minilm, "AutoModel", 1)]
    if (args.smollm2 / "model.safetensors").exists():
        models.append(("SmolLM2-135M-Instruct", args.smollm2, "AutoModelForCausalLM", 10 if args.quick else 5))
    else:
        console.print(f"[yellow]SmolLM2 not found at {args.smollm2}; materialize it with ../shared/assets/smollm2.py")
    ranks = [8, 16] if args.quick else [8, 16, 64, 128]
    result = {"device": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "paths": [], "sweep": []}
    if not args.skip_paths:
        for name, d, auto, _ in models:
            result["paths"].append(compare_paths(name, d, 16, auto))
        t = Table(title="decompose: ours (randomized SVD q=4 p=16, QPiSSA T=1) vs PEFT pissa_niter_4 + NF4 reload, r=16")
        for c in ("model", "modules", "ours s", "PEFT s", "time PEFT/ours", "ours RSS MB", "PEFT RSS MB",
                  "RSS PEFT/ours", "err ours/PEFT"):
            t.add_column(c, justify="right")
        for p in result["paths"]:
            t.add_row(p["model"], str(p["modules"]), f"{p['ours']['seconds']:.1f}", f"{p['peft']['seconds']:.1f}",
                      f"{p['time_ratio_peft_over_ours']:.2f}", f"{p['ours']['peak_rss_mb']:.0f}",
                      f"{p['peft']['peak_rss_mb']:.0f}", f"{p['rss_ratio_peft_over_ours']:.2f}",
                      f"{p['error_ratio_ours_over_peft']:.4f}")
        console.print(t)
    start = time.perf_counter()
    for name, d, _, nth in models if not args.skip_sweep else ():
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
