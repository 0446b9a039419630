"""Triton NF4 kernels vs bitsandbytes (+ PEFT LoRA), measured in one process on one GPU.

1. dequant: NF4 → bf16 (double quant, blocksize 64) GB/s, ours vs ``bitsandbytes.functional.dequantize_4bit``,
   as a fraction of the card's peak memory bandwidth (bytes = packed + absmax stats read + bf16 written);
   outputs are also checked bit-for-bit on the GPU.
2. linear: one PEFT ``lora.Linear4bit`` layer (bnb NF4 base, bf16 compute, rank r, bf16 adapters),
   forward+backward (grads for x, A, B) with PEFT/bitsandbytes vs the same layer after
   ``apply_kernel_backend(layer, "triton")``, at Llama-2-7B (4096→4096, 4096→11008) and Llama-70B
   (8192→8192, 8192→28672) in→out shapes; time, effective TFLOP/s (4·M·N·K / t) and peak memory.
3. train: a full training step (forward, backward, AdamW) of a real transformers Llama with 7B-sized
   layers (2 decoder layers, 4-bit via BitsAndBytesConfig, PEFT LoRA on all linears), tokens/s per backend.

GPU only: ``python benchmarks/kernel_bench.py`` → benchmarks/results/kernels.json.
``python benchmarks/kernel_bench.py --dry-run`` runs tiny shapes on CPU under TRITON_INTERPRET=1 to prove the
script works (timings there are meaningless and go to benchmarks/results/kernels_dryrun.json).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Keep this folder off sys.path: bitsandbytes' optional `import kernels` (HF kernels hub) must find HF's
# package, never a file here (this script was once named kernels.py; see also the repo's kernels/ folder).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton / qpissa.kernels are imported

import torch  # noqa: E402

# Peak memory bandwidth by device-name substring (vendor spec sheets), bytes/s; first match wins.
PEAK_BW = [
    ("H200", 4.8e12), ("GH200", 4.0e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
    ("A10G", 0.6e12), ("L4", 0.3e12), ("RTX 4090", 1.008e12), ("RTX 3090", 0.936e12), ("V100", 0.9e12),
]

GPU_DEQUANT = [(4096, 4096), (11008, 4096), (8192, 8192), (28672, 8192)]  # (out, in)
GPU_LINEAR = [("7B q/o", 4096, 4096), ("7B gate/up", 4096, 11008), ("70B q/o", 8192, 8192),
              ("70B gate/up", 8192, 28672)]  # (label, in=K, out=N)
DRY_DEQUANT = [(48, 128)]
DRY_LINEAR = [("dry", 64, 96)]


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BW:
        if key in name:
            return bw
    return None


def timed(fn, warmup: int, reps: int, cuda: bool) -> float:
    """Median seconds of fn() over reps (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_mem(fn, cuda: bool) -> int | None:
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_dequant(shapes, dev, warmup, reps, bw):
    import bitsandbytes.functional as F

    from qpissa.kernels.nf4_dequant import nf4_dequantize
    from qpissa.quant import NF4Weight

    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        nf4 = NF4Weight.from_quant_state(packed, qs)
        exact = torch.equal(nf4_dequantize(nf4).view(torch.int16), F.dequantize_4bit(packed, qs).view(torch.int16))
        stats = qs.absmax.numel() + qs.state2.absmax.numel() * 4 + 256 * 4 + 16 * 4
        nbytes = packed.numel() * packed.element_size() + stats + n * k * 2  # read packed + stats, write bf16
        t_ours = timed(lambda: nf4_dequantize(nf4), warmup, reps, dev.type == "cuda")
        t_bnb = timed(lambda: F.dequantize_4bit(packed, qs), warmup, reps, dev.type == "cuda")
        rows.append(dict(shape=[n, k], bit_exact=exact, ours_s=t_ours, bnb_s=t_bnb,
                         ours_GBps=nbytes / t_ours / 1e9, bnb_GBps=nbytes / t_bnb / 1e9,
                         ours_frac_peak=nbytes / t_ours / bw if bw else None,
                         bnb_frac_peak=nbytes / t_bnb / bw if bw else None, speedup=t_bnb / t_ours))
    return rows


def _lora_layer(k, n, rank, dev):
    """A real PEFT LoRA layer on a real bitsandbytes NF4 Linear4bit (bf16 compute, double quant)."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                             compress_statistics=True)
    base.weight = bnb.nn.Params4bit(torch.randn(n, k, dtype=torch.bfloat16) / k**0.5, requires_grad=False,
                                    quant_type="nf4", compress_statistics=True)
    base = base.to(dev)
    cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False)
    layer = LoraLinear4bit(base, "default", cfg, r=rank, lora_alpha=rank)
    layer.lora_A.to(device=dev, dtype=torch.bfloat16)
    layer.lora_B.to(device=dev, dtype=torch.bfloat16)
    layer.train()
    return layer


def bench_linear(shapes, tokens, rank, dev, warmup, reps):
    from qpissa.train.kernel_backend import apply_kernel_backend

    cuda = dev.type == "cuda"
    rows = []
    for label, k, n in shapes:
        layer = _lora_layer(k, n, rank, dev)
        x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(tokens, n, device=dev, dtype=torch.bfloat16)

        def step():
            layer(x).backward(dy)

        res = {}
        for backend in ("bnb", "triton"):
            patched = apply_kernel_backend(layer, backend)
            assert backend == "bnb" or patched == 1, "triton backend did not patch the layer"
            with torch.no_grad():
                res[backend + "_y"] = layer(x).float()
            res[backend] = timed(step, warmup, reps, cuda)
            res[backend + "_mem"] = peak_mem(step, cuda)
        apply_kernel_backend(layer, "bnb")
        y_b, y_t = res["bnb_y"], res["triton_y"]
        flops = 4 * tokens * n * k  # base forward + backward-for-x
        rows.append(dict(layer=label, M=tokens, K=k, N=n, rank=rank, bnb_s=res["bnb"], triton_s=res["triton"],
                         speedup=res["bnb"] / res["triton"], bnb_TFLOPs=flops / res["bnb"] / 1e12,
                         triton_TFLOPs=flops / res["triton"] / 1e12, bnb_peak_bytes=res["bnb_mem"],
                         triton_peak_bytes=res["triton_mem"],
                         max_rel_diff=float((y_b - y_t).abs().max() / y_b.abs().max())))
        del layer, x, dy
        if cuda:
            torch.cuda.empty_cache()
    return rows


def bench_train(dev, dry: bool, warmup, reps, rank):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from qpissa.train.kernel_backend import apply_kernel_backend

    if dry:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=96)
        batch, seq = 1, 8
    else:  # Llama-2-7B layer dimensions, 2 layers
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000)
        batch, seq = 4, 512
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(d, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map={"": dev})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear",
                                             init_lora_weights=False), autocast_adapter_dtype=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    res = {}
    for backend in ("bnb", "triton"):
        res[backend + "_layers"] = apply_kernel_backend(model, backend)
        with torch.no_grad():
            res[backend + "_loss"] = float(model(input_ids=ids, labels=ids).loss)
        res[backend] = timed(step, warmup, reps, dev.type == "cuda")
        res[backend + "_mem"] = peak_mem(step, dev.type == "cuda")
    apply_kernel_backend(model, "bnb")
    tokens = batch * seq
    return dict(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                rank=rank, tokens_per_step=tokens, patched_layers=res["triton_layers"],
                bnb_step_s=res["bnb"], triton_step_s=res["triton"], speedup=res["bnb"] / res["triton"],
                bnb_tokens_per_s=tokens / res["bnb"], triton_tokens_per_s=tokens / res["triton"],
                bnb_peak_bytes=res["bnb_mem"], triton_peak_bytes=res["triton_mem"],
                loss_bnb=res["bnb_loss"], loss_triton=res["triton_loss"])


def print_tables(result):
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not con.is_terminal:  # logs/CI: wide enough that no column is truncated
        con = Console(width=150)
    con.print(f"[bold]{result['device']}[/]  peak bandwidth {result['peak_bandwidth_GBps']} GB/s"
              + ("  [yellow](dry run: interpreter timings, not performance)[/]" if result["dry_run"] else ""))
    t = Table(title="NF4 dequantize → bf16 (double quant, blocksize 64)")
    for c in ("shape", "bit-exact", "ours GB/s", "bnb GB/s", "ours % peak", "bnb % peak", "speedup"):
        t.add_column(c, justify="right")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for r in result["dequant"]:
        t.add_row(f"{r['shape'][0]}×{r['shape'][1]}", str(r["bit_exact"]), f"{r['ours_GBps']:.1f}",
                  f"{r['bnb_GBps']:.1f}", pct(r["ours_frac_peak"]), pct(r["bnb_frac_peak"]), f"{r['speedup']:.2f}×")
    con.print(t)
    t = Table(title=f"NF4+LoRA linear forward+backward, M={result['tokens']} tokens, r={result['rank']}")
    for c in ("layer", "K→N", "bnb+PEFT ms", "triton ms", "speedup", "bnb TFLOP/s", "triton TFLOP/s",
              "bnb peak MiB", "triton peak MiB", "max rel diff"):
        t.add_column(c, justify="right")
    mib = lambda v: "-" if v is None else f"{v / 2**20:.0f}"  # noqa: E731
    for r in result["linear"]:
        t.add_row(r["layer"], f"{r['K']}→{r['N']}", f"{1e3 * r['bnb_s']:.2f}", f"{1e3 * r['triton_s']:.2f}",
                  f"{r['speedup']:.2f}×", f"{r['bnb_TFLOPs']:.1f}", f"{r['triton_TFLOPs']:.1f}",
                  mib(r["bnb_peak_bytes"]), mib(r["triton_peak_bytes"]), f"{r['max_rel_diff']:.1e}")
    con.print(t)
    tr = result["train"]
    if tr is None:
        return
    t = Table(title=f"Training step: Llama {tr['layers']}×(hidden {tr['hidden']}, MLP {tr['intermediate']}), "
                    f"{tr['tokens_per_step']} tokens, r={tr['rank']}, AdamW")
    for c in ("backend", "step ms", "tokens/s", "peak MiB", "loss before"):
        t.add_column(c, justify="right")
    t.add_row("bnb+PEFT", f"{1e3 * tr['bnb_step_s']:.1f}", f"{tr['bnb_tokens_per_s']:.0f}",
              mib(tr["bnb_peak_bytes"]), f"{tr['loss_bnb']:.4f}")
    t.add_row(f"triton ({tr['patched_layers']} layers)", f"{1e3 * tr['triton_step_s']:.1f}",
              f"{tr['triton_tokens_per_s']:.0f}", mib(tr["triton_peak_bytes"]), f"{tr['loss_triton']:.4f}")
    t.add_row("ratio", f"{tr['speedup']:.2f}×", "", "", "")
    con.print(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--tokens", type=int, default=4096, help="M = batch·seq tokens for the linear benchmark")
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank r")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.dry_run:
        dev, warmup, reps, tokens, rank = torch.device("cpu"), 1, 2, 16, 4
        name, dq_shapes, lin_shapes = "CPU (Triton interpreter)", DRY_DEQUANT, DRY_LINEAR
    else:
        if not torch.cuda.is_available():
            print("benchmarks/kernel_bench.py needs a CUDA GPU; use --dry-run to exercise the script on CPU",
                  file=sys.stderr)
            return 2
        dev, warmup, reps, tokens, rank = torch.device("cuda"), 3, args.reps, args.tokens, args.rank
        name, dq_shapes, lin_shapes = torch.cuda.get_device_name(), GPU_DEQUANT, GPU_LINEAR
    bw = None if args.dry_run else peak_bandwidth(name)
    result = dict(device=name, dry_run=args.dry_run, peak_bandwidth_GBps=bw / 1e9 if bw else None,
                  tokens=tokens, rank=rank, torch=torch.__version__)
    import bitsandbytes
    import triton

    result.update(triton=triton.__version__, bitsandbytes=bitsandbytes.__version__)
    result["dequant"] = bench_dequant(dq_shapes, dev, warmup, reps, bw)
    result["linear"] = bench_linear(lin_shapes, tokens, rank, dev, warmup, reps)
    result["train"] = None if args.skip_train else bench_train(dev, args.dry_run, warmup, max(3, reps // 2), rank)
    print_tables(result)
    from qpissa.atomic import write_json

    out = args.out or HERE / "results" / ("kernels_dryrun.json" if args.dry_run else "kernels.json")
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
