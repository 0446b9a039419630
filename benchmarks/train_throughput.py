"""Throughput and peak memory of our train step vs HF Trainer + PEFT QLoRA, same model/batch/sequence length.

Both sides train the *same* starting point: SmolLM2-135M quantized to NF4 by transformers/bitsandbytes
(all seven projections of every block) plus the same PEFT LoRA init (r=16), on the same packed GSM8K
rows of exactly --seq-len tokens, bf16 autocast, AdamW, cosine schedule. Each side runs in its own
subprocess (peak RSS is per process), alternating for --rounds; tokens/s is the median over steps
after the first two (warm-up), peak memory is the process's max RSS on CPU (VmHWM; ru_maxrss would include the parent's size) or
torch.cuda.max_memory_allocated on CUDA.

Usage:  python benchmarks/train_throughput.py [--steps 12 --batch-size 4 --seq-len 256 --rounds 2]
        [--device auto|cpu|cuda] [--kernels none|triton] [--train-out OUT]
Writes benchmarks/results/train_throughput.json. ``benchmarks/gpu_check.py`` runs the workers of this
script (:func:`run_side`) on CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = Path.home() / ".cache" / "qpissa-test-assets" / "smollm2-135m-instruct"
DEFAULT_GSM8K = HERE.parent.parent / "shared" / "assets" / "gsm8k"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qpissa-bench-throughput"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when available)")
    ap.add_argument("--kernels", choices=["none", "triton"], default="none", help="our side's NF4 kernels")
    ap.add_argument("--train-out", type=Path, default=None,
                    help="our side trains this decompose OUT (e.g. a QPiSSA one) instead of the shared QLoRA init")
    ap.add_argument("--worker", choices=["ours", "hf"], default=None)
    return ap.parse_args(argv)


def prepare(args) -> Path:
    """OUT dir in decompose's layout: residual/ (pre-quantized NF4) + adapter/ (PEFT LoRA init, bf16)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out = args.work / "out"
    if (out / "adapter" / "adapter_model.safetensors").exists():
        return out
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=q, device_map="cpu")
    model.save_pretrained(out / "residual")
    AutoTokenizer.from_pretrained(args.model).save_pretrained(out / "residual")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS,
                                                  lora_dropout=0.0))
    peft_model.save_pretrained(out / "adapter")
    return out


def packed_rows(args, tokenizer) -> list:
    from qpissa.data import DataConfig, build_examples, load_records

    records = load_records(args.gsm8k / "train.jsonl")[:400]
    rows = build_examples(records, tokenizer, DataConfig(max_length=args.seq_len, packing=True))
    return [r for r in rows if len(r.input_ids) == args.seq_len]


def device_of(args) -> str:
    from qpissa.devices import resolve_device

    return resolve_device(args.device)


def peak_mb(device: str = "auto") -> float:
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.max_memory_allocated() / 2**20
    from qpissa.train.metrics import peak_rss_mb

    return peak_rss_mb()


def worker_ours(args, out: Path) -> dict:
    from qpissa.data import DataConfig
    from qpissa.train import TrainConfig, load_model, fit

    device = device_of(args)
    cfg = TrainConfig(model=str(args.train_out or out), data="-", output=str(args.work / "run-ours"),
                      steps=args.steps, batch_size=args.batch_size, lr=2e-4, save_every=0, progress=False,
                      data_cfg=DataConfig(max_length=args.seq_len, template="{text}"), device=device,
                      kernels=args.kernels)
    import shutil

    shutil.rmtree(cfg.output, ignore_errors=True)
    model, tok = load_model(cfg)
    fit(cfg, model, tok, packed_rows(args, tok), [])
    steps = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": [s["step_s"] for s in steps], "peak_mb": peak_mb(device)}


def worker_hf(args, out: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    device = device_of(args)
    base = AutoModelForCausalLM.from_pretrained(out / "residual", device_map=device)
    model = PeftModel.from_pretrained(base, out / "adapter", is_trainable=True)
    tok = AutoTokenizer.from_pretrained(out / "residual")
    rows = packed_rows(args, tok)
    data = [{"input_ids": torch.tensor(r.input_ids), "labels": torch.tensor(r.labels),
             "attention_mask": torch.ones(len(r.input_ids), dtype=torch.long)} for r in rows]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    targs = TrainingArguments(output_dir=str(args.work / "run-hf"), per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="cosine",
                              warmup_steps=int(round(0.03 * args.steps)), bf16=True, use_cpu=device == "cpu",
                              logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
                              optim="adamw_torch", max_grad_norm=1.0, seed=0, disable_tqdm=True)
    collate = lambda feats: {k: torch.stack([f[k] for f in feats]) for k in feats[0]}  # noqa: E731
    Trainer(model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[Clock()]).train()
    return {"step_s": times, "peak_mb": peak_mb(device)}


def run_side(side: str, argv: list[str], work: Path, timeout: float | None = None,
             env: dict[str, str] | None = None) -> dict:
    """One worker (``ours``/``hf``) in its own process (its own peak memory); returns its RESULT dict."""
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--worker", side, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{side} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    args = parse()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        out = args.work / "out"
        result = (worker_ours if args.worker == "ours" else worker_hf)(args, out)
        print("RESULT " + json.dumps(result))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    out = prepare(args)
    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    for _ in range(args.rounds):
        for side in ("ours", "hf"):
            try:
                runs[side].append(run_side(side, sys.argv[1:], args.work))
            except RuntimeError as err:
                raise SystemExit(str(err)) from None
    tokens_per_step = args.batch_size * args.seq_len
    summary = {}
    for side, rs in runs.items():
        steady = [t for r in rs for t in r["step_s"][2:]]
        summary[side] = {"tokens_per_s": tokens_per_step / statistics.median(steady),
                         "median_step_s": statistics.median(steady), "peak_mb": max(r["peak_mb"] for r in rs),
                         "runs": rs}
    ratio_tps = summary["ours"]["tokens_per_s"] / summary["hf"]["tokens_per_s"]
    ratio_mem = summary["ours"]["peak_mb"] / summary["hf"]["peak_mb"]

    from rich.console import Console
    from rich.table import Table

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    table = Table(title=f"train step, SmolLM2-135M NF4 + LoRA r={args.rank}, batch {args.batch_size} × "
                        f"{args.seq_len} tokens, {device}, {os.cpu_count()} CPUs")
    for col in ("", "tokens/s", "median step s", "peak memory MiB"):
        table.add_column(col, justify="right")
    for side, label in (("ours", "qpissa train"), ("hf", "HF Trainer + PEFT")):
        s = summary[side]
        table.add_row(label, f"{s['tokens_per_s']:.0f}", f"{s['median_step_s']:.3f}", f"{s['peak_mb']:.0f}")
    table.add_row("ratio ours/HF", f"{ratio_tps:.2f}×", "", f"{ratio_mem:.2f}×")
    Console().print(table)
    payload = {"benchmark": "train_throughput", "device": device, "cpu_count": os.cpu_count(),
               "memory_metric": "cuda max_memory_allocated" if torch.cuda.is_available() else "peak RSS (VmHWM)",
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "tokens_per_s_ratio": ratio_tps, "peak_memory_ratio": ratio_mem, "results": summary,
               "load_average_at_end": os.getloadavg()}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "train_throughput.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
