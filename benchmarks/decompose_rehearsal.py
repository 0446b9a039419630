"""Scale rehearsal without a download: decompose a synthetic Llama-3-8B-shaped checkpoint end to end on CPU.

1. ``synthetic_checkpoint.write_synthetic_llama`` (2 blocks of real Llama-3-8B shapes, bf16, sharded).
2. ours: ``qpissa.decompose.decompose(CKPT, OUT)`` with DEFAULT settings, in a fresh process; and PEFT's path
   (load fp32 → ``pissa_niter_4`` → save → reload 4-bit + adapter) in another. For each: wall and CPU
   seconds, peak RSS above the import baseline (VmHWM reset via ``/proc/self/clear_refs`` after the imports,
   both measured in the same process), bytes read/written (``/proc/self/io`` rchar/wchar: every byte through
   read()/write(), page cache or not; mmap reads of safetensors are not counted, so ``read`` also lists the
   checkpoint size).
3. calibration of the planner (item 5): ``decompose`` on layer 0's q_proj (``--calibration-targets``) at
   (r, T) = (16, 1), (128, 1), (16, 5), in one fresh process → α, β, γ, import and per-byte costs and peak bytes
   per weight of :mod:`qpissa.plan.decompose_cost`; the planner's prediction of run 2 from these rates alone is
   printed beside the measurement; ``--write-rates`` stores the table as ``qpissa/plan/decompose_rates.json``
   (what ``qpissa plan`` uses). ``--only-calibration`` skips 2.
4. extrapolation per layer to Llama-3-8B (32 layers) and Llama-3-70B (80 layers; 3.9× the weights per layer).

Usage: python benchmarks/decompose_rehearsal.py [--checkpoint DIR] [--threads N] [--skip-peft] [--write-rates]
Writes benchmarks/results/decompose_rehearsal.json and prints a table. Timings taken on a loaded machine are
inflated: say so, or re-run on a quiet one.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "decompose_rehearsal.json"
CONFIGS = ROOT / "tests" / "fixtures" / "configs"
DEFAULT_CKPT = Path.home() / ".cache" / "qpissa-synthetic" / "llama3-8b-shapes-2l"

PROBE = textwrap.dedent('''
    import json, os, resource, sys, time
    from pathlib import Path
    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    def io():
        d = dict(l.split(": ") for l in Path("/proc/self/io").read_text().splitlines())
        return {k: int(v) for k, v in d.items()}
    t0 = time.perf_counter()
    import torch
    torch.set_num_threads(int(os.environ.get("REHEARSAL_THREADS", torch.get_num_threads())))
    import bitsandbytes, peft, safetensors, transformers
    transformers.LlamaForCausalLM, transformers.LlamaConfig
    import qpissa.decompose, qpissa.decompose.report, matplotlib.pyplot
    import_s = time.perf_counter() - t0
    c0 = time.process_time()
    base = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    io0, t1, c1 = io(), time.perf_counter(), time.process_time()
    result = {}
    exec(compile(sys.argv[1], "job", "exec"))
    io1 = io()
    result.update(import_s=import_s, import_cpu_s=c0, seconds=time.perf_counter() - t1, cpu_s=time.process_time() - c1,
                  import_rss=base, peak_above_import=status("VmHWM") - base,
                  read_bytes=io1["rchar"] - io0["rchar"], written_bytes=io1["wchar"] - io0["wchar"])
    print(json.dumps(result))
''')

OURS = '''
from qpissa.decompose import decompose
ckpt, out = sys.argv[2], sys.argv[3]
decompose(ckpt, out, progress=False, **json.loads(sys.argv[4]))
m = json.loads((Path(out) / "manifest.json").read_text())
result["tensor_seconds"] = {k: v["seconds"] for k, v in m["tensors"].items()}
result["report"] = json.loads((Path(out) / "report.json").read_text())["overall"]
'''

CALIBRATE = '''
from qpissa.decompose import decompose
ckpt, out = sys.argv[2], sys.argv[3]
result["runs"] = []
for rank, iters, target in ((16, 1, sys.argv[4]), (128, 1, sys.argv[4]), (16, 5, sys.argv[4]), (16, 1, sys.argv[5])):
    t, c = time.perf_counter(), time.process_time()
    # the metrics the defaults use at scale (a single small target would switch the auto LoftQ/svdvals on)
    decompose(ckpt, out, progress=False, rank=rank, iters=iters, targets=[target], overwrite=True,
              loftq_baseline=False, spectral_norms=False)
    m = json.loads((Path(out) / "manifest.json").read_text())
    result["runs"].append({"rank": rank, "iters": iters, "targets": target, "wall_s": time.perf_counter() - t,
                           "seconds": time.process_time() - c, "peak_above_import": status("VmHWM") - base,
                           "weights": sum(v["metrics"]["shape"][0] * v["metrics"]["shape"][1]
                                          for v in m["tensors"].values())})
'''

PEFT = '''
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
ckpt, out = sys.argv[2], sys.argv[3]
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets, init_lora_weights="pissa_niter_4"))
pm.peft_config["default"].init_lora_weights = True
pm.save_pretrained(out + "/adapter")
pm.unload().save_pretrained(out + "/residual")
del model, pm
q = AutoModelForCausalLM.from_pretrained(out + "/residual", quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
q = PeftModel.from_pretrained(q, out + "/adapter")
'''


def child(job: str, *args: str, threads: int | None) -> dict:
    env = dict(os.environ, **({"REHEARSAL_THREADS": str(threads)} if threads else {}))
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", PROBE, job, *args], capture_output=True, text=True, cwd=tmp,
                              env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def layer_weights(config: Path) -> tuple[int, int]:
    from qpissa.plan.model_shapes import load_config, shapes_from_config

    s = shapes_from_config(load_config(config))
    per_layer = sum(p.numel for p in s.params if p.kind == "linear" and p.count == s.layers)
    return s.layers, per_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1: CPU seconds "
                        "then equal a quiet machine's wall time and the calibration is not skewed by load)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--write-rates", action="store_true", help="store the fit as qpissa/plan/decompose_rates.json")
    parser.add_argument("--calibration-targets", nargs=2, default=[r"model\.layers\.0\.self_attn\.q_proj",
                                                                    r"model\.layers\.0\.self_attn\.k_proj"],
                        help="two regexes: the main calibration target and a smaller one (separates fixed cost)")
    parser.add_argument("--only-calibration", action="store_true", help="skip the end-to-end runs")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic_checkpoint import write_synthetic_llama

    import torch

    from qpissa.atomic import write_json
    from qpissa.plan.decompose_cost import estimate_seconds, fit_rates

    ckpt = write_synthetic_llama(args.checkpoint, layers=2, seed=0)
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    largest_fp32 = 14336 * 4096 * 4
    res: dict = {"checkpoint": str(ckpt), "checkpoint_bytes": ckpt_bytes, "threads": args.threads or torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "largest_fp32_tensor_bytes": largest_fp32}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_calibration:
            cal = child(CALIBRATE, str(ckpt), f"{tmp}/cal", *args.calibration_targets, threads=args.threads)
            res["calibration"] = cal["runs"]
            per_weight, fixed = fit_rates(cal["runs"])
            rates = {"source": "benchmarks/decompose_rehearsal.py (CPU seconds of qpissa.decompose, 1 torch thread, "
                               f"synthetic Llama-3-8B-shaped checkpoint, targets {args.calibration_targets})",
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
                                f"{os.getloadavg()[0]:.1f} at the end of the calibration",
                     "oversample": 16, "s_per_weight": per_weight, "import_s": cal["import_cpu_s"],
                     "other_s_per_byte": max(fixed, 0.0) / ckpt_bytes,
                     "peak_bytes_per_weight": max(r["peak_above_import"] for r in cal["runs"]) / cal["runs"][0]["weights"],
                     "calibration": cal["runs"]}
            res["rates"] = rates
            print(f"calibration CPU s: {[round(r['seconds'], 1) for r in cal['runs']]}; rates {per_weight}, "
                  f"fixed {fixed:.1f} s")
        if args.only_calibration:
            write_json(args.output, res)
            print(f"wrote {args.output}")
            return
        res["ours"] = child(OURS, str(ckpt), f"{tmp}/ours", "{}", threads=args.threads)
        print(f"ours: {res['ours']['seconds']:.1f} s, peak +{res['ours']['peak_above_import'] / 2**20:.0f} MiB")
        if "rates" in res:  # peak from the end-to-end run: the calibration runs' peaks are the fixed part (the
            # non-target tensors' copies), ≈ equal for 4M- and 16M-weight targets, so per weight they overstate it
            res["rates"]["peak_bytes_per_weight"] = res["ours"]["peak_above_import"] / (14336 * 4096)
            if args.write_rates:
                write_json(ROOT / "qpissa" / "plan" / "decompose_rates.json", res["rates"])
        if not args.skip_peft:
            res["peft"] = child(PEFT, str(ckpt), f"{tmp}/peft", threads=args.threads)
            print(f"peft: {res['peft']['seconds']:.1f} s, peak +{res['peft']['peak_above_import'] / 2**20:.0f} MiB")
    ours = res["ours"]
    tensor_s = sum(ours["tensor_seconds"].values())
    target_weights = 2 * layer_weights(CONFIGS / "llama-3-8b.json")[1]
    res["ours"]["peak_over_largest_fp32"] = ours["peak_above_import"] / largest_fp32
    fixed = ours["seconds"] - tensor_s
    res["extrapolation"] = {}
    for name in ("llama-3-8b", "llama-3-70b"):
        layers, per_layer = layer_weights(CONFIGS / f"{name}.json")
        scale = per_layer / (target_weights / 2)
        row = {"layers": layers, "weights_per_layer_vs_8b": scale,
               "ours_hours": (ours["import_s"] + fixed + layers * scale * tensor_s / 2) / 3600}
        if "peft" in res:
            row["peft_hours"] = (res["peft"]["import_s"] + layers * scale * res["peft"]["seconds"] / 2) / 3600
        res["extrapolation"][name] = row
    if "rates" not in res:  # --skip-calibration: check the packaged table instead
        from qpissa.plan.decompose_cost import load_rates

        res["rates"] = load_rates()
    if "rates" in res:
        shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                  (4096, 14336)] * 2
        predicted = estimate_seconds(res["rates"], shapes, 16, 1, ckpt_bytes)
        measured = ours["import_cpu_s"] + ours["cpu_s"]  # CPU seconds, like the calibration (1 thread ≈ quiet wall)
        res["planner"] = {"predicted_s": predicted, "measured_s": measured, "predicted_over_measured": predicted / measured,
                          "predicted_peak_above_import": res["rates"]["peak_bytes_per_weight"] * 14336 * 4096}
    print(f"{'':28}{'ours':>12}{'PEFT':>12}")
    for key, label, f in (("seconds", "wall s (after imports)", 1), ("cpu_s", "CPU s", 1),
                          ("import_s", "import s", 1), ("peak_above_import", "peak RSS MiB above import", 2**20),
                          ("read_bytes", "read MB (read())", 1e6), ("written_bytes", "written MB", 1e6)):
        p = res.get("peft", {}).get(key)
        print(f"{label:28}{ours[key] / f:12.1f}{'' if p is None else f'{p / f:12.1f}'}")
    print(f"peak above import / largest fp32 tensor: {res['ours']['peak_over_largest_fp32']:.2f} (goal ≤ 3)")
    for name, row in res["extrapolation"].items():
        print(f"{name}: ours ≈ {row['ours_hours']:.2f} h" + (f", PEFT ≈ {row['peft_hours']:.2f} h" if "peft_hours" in row
                                                           else ""))
    if "planner" in res:
        print(f"planner (rates from the calibration runs) predicts {res['planner']['predicted_s']:.1f} s vs "
              f"measured {res['planner']['measured_s']:.1f} s (×{res['planner']['predicted_over_measured']:.2f})")
    write_json(args.output, res)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
