"""The child-process side of ``benchmarks/gpu_check.py``: asset helpers and the workers it runs as
``python gpu_check.py --worker NAME SPEC`` (each in a fresh process: its own CUDA context and peaks).

Loaded by path from gpu_check.py (benchmarks/ stays off sys.path: nothing there may shadow HF's ``kernels``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# ----------------------------------------------------------------------------- helpers
def sibling(name: str) -> ModuleType:
    """Import benchmarks/<name>.py by path (keeping benchmarks/ off sys.path, see above)."""
    spec = importlib.util.spec_from_file_location(f"qpissa_bench_{name}", HERE / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"benchmarks/{name}.py not found")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def asset_roots() -> list[Path]:
    return [ROOT / "shared" / "assets", ROOT.parent / "shared" / "assets"]


def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF directory. The one place that knows how to get it: the test cache, else
    ``qpissa example smollm2 DIR`` when this qpissa has it, else ``shared/assets/smollm2.py DIR``."""
    for d in (Path(os.environ.get("QPISSA_ASSET_CACHE", Path.home() / ".cache" / "qpissa-test-assets"))
              / "smollm2-135m-instruct", cache / "smollm2"):
        if (d / "model.safetensors").exists() and (d / "tokenizer.json").exists():
            return d
    dest = cache / "smollm2"
    qpissa = shutil.which("qpissa") or str(Path(sys.executable).with_name("qpissa"))
    attempts = [[qpissa, "example", "smollm2", str(dest)]]
    attempts += [[sys.executable, str(r / "smollm2.py"), str(dest)] for r in asset_roots() if (r / "smollm2.py").exists()]
    errors = []
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cache)
        if proc.returncode == 0 and (dest / "model.safetensors").exists():
            return dest
        errors.append(f"{' '.join(cmd[:3])}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:] or 'failed'}")
    raise RuntimeError("SmolLM2 unavailable (" + "; ".join(errors) + ")")


def gsm8k_dir() -> Path:
    for d in [r / "gsm8k" for r in asset_roots()] + [ROOT / "tests" / "fixtures" / "gsm8k"]:
        if (d / "train.jsonl").exists():
            return d
    raise RuntimeError("GSM8K JSONL not found under shared/assets/gsm8k or tests/fixtures/gsm8k")


def tiny_llama(dest: Path, like: Path, hidden: int = 64, inter: int = 224, heads: int = 4, kv: int = 2,
               layers: int = 2) -> Path:
    """A random Llama with ``like``'s tokenizer and vocabulary but toy widths (dry run stand-in), written by
    transformers itself. Defaults keep Llama-3-8B's ratios: intermediate 3.5× hidden, 4 query heads per KV head."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (dest / "model.safetensors").exists():
        return dest
    base = json.loads((like / "config.json").read_text())
    cfg = LlamaConfig(vocab_size=base["vocab_size"], hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=base.get("bos_token_id"),
                      eos_token_id=base.get("eos_token_id"))
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(dest)
    AutoTokenizer.from_pretrained(like).save_pretrained(dest)
    return dest


def run_worker(name: str, spec: dict, timeout: float, env: dict[str, str] | None = None) -> dict:
    """``python gpu_check.py --worker NAME SPEC`` in a fresh process (its own CUDA context and peaks)."""
    cmd = [sys.executable, "-P", str(HERE / "gpu_check.py"), "--worker", name, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout), cwd=spec.get("cwd"),
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                               "TRANSFORMERS_VERBOSITY": "error", **(env or {})})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"worker {name} failed (rc {proc.returncode}): {proc.stderr[-2500:]}")
    return json.loads(line[-1][7:])


# ----------------------------------------------------------------------------- workers (child processes)
def _peaks(device: str) -> dict:
    import torch

    from qpissa.train.metrics import peak_rss_mb

    out = {"peak_rss_mb": peak_rss_mb()}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def worker_env(spec: dict) -> dict:
    import bitsandbytes
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "bitsandbytes": bitsandbytes.__version__,
                            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count(),
                    capability=f"{p.major}.{p.minor}")
    else:
        info.update(card=None, gpu_memory_gib=None, gpu_count=0)
    return info


def worker_decompose(spec: dict) -> dict:
    """Default-settings decompose of one checkpoint; wall time and peaks."""
    import torch

    from qpissa.decompose import decompose

    device = spec["device"]
    if device.startswith("cuda"):
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report = decompose(spec["model"], spec["out"], device=device, progress=False, overwrite=True,
                       **spec.get("options", {}))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    largest = max((m["shape"] for m in report["modules"]), key=lambda s: s[0] * s[1])
    frob = report["overall"].get("method", {}).get("frobenius") if isinstance(report.get("overall"), dict) else None
    return {"seconds": seconds, "tensors": len(report["modules"]), "largest_shape": largest,
            "arguments": {k: report["arguments"].get(k) for k in ("method", "rank", "iters", "svd", "loftq_baseline",
                                                                  "spectral_norms") if k in report["arguments"]},
            "overall_method_frobenius": frob, **_peaks(device)}


def worker_synthetic(spec: dict) -> dict:
    """Write the synthetic Llama-3-8B-shaped checkpoint (2 layers) with benchmarks/synthetic_checkpoint.py."""
    try:
        mod = sibling("synthetic_checkpoint")
        write = mod.write_synthetic_llama
    except (ImportError, FileNotFoundError, AttributeError) as err:
        raise RuntimeError("benchmarks/synthetic_checkpoint.py with write_synthetic_llama(out_dir, layers=2, seed=0) "
                           f"is missing ({err}); it comes with issue 9's scale rehearsal") from None
    start = time.perf_counter()
    write(Path(spec["out"]), layers=spec.get("layers", 2), seed=0)
    size = sum(p.stat().st_size for p in Path(spec["out"]).glob("*.safetensors"))
    return {"seconds": time.perf_counter() - start, "bytes": size}


def worker_plan(spec: dict) -> dict:
    """PEFT QLoRA training of ``spec`` on ``device`` (plan_memory.py's setup); peak CUDA memory after a warm-up
    step, which is what ``qpissa plan`` predicts (weights + adapter + optimizer + activations, overhead 0)."""
    import torch

    pm = sibling("plan_memory")  # the same model setup plan_memory.py measures on the CPU
    device = spec["device"]
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    model, opt = pm.add_lora(pm.load_base(spec, device_map=device), spec)
    B, L, V = spec["batch_size"], spec["seq_len"], model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    peak = None
    for step in range(spec["steps"]):
        ids = torch.randint(0, V, (B, L), generator=g).to(device)  # (B, L)
        if step == 1 and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # loading transients do not count, as in plan_memory.py
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    return {"measured_bytes": peak, **_peaks(device)}


WORKERS: dict[str, Callable[[dict], dict]] = {"env": worker_env, "decompose": worker_decompose,
                                              "synthetic": worker_synthetic, "plan": worker_plan}
