"""DPO on a ``qpissa decompose`` output (or on a finished ``qpissa train`` SFT run) with TRL's ``DPOTrainer``.

The reference must be the STARTING policy: residual + the starting adapter. For a QPiSSA adapter (the principal
components) "adapter disabled" is the residual alone, a badly broken model. TRL 1.16 gets this right for a
pre-loaded PEFT model: it copies the adapter into a frozen second adapter named ``ref`` (PEFT ≥ 0.20) and runs the
reference forwards through it, at twice the adapter memory (``qpissa train --objective dpo`` instead precomputes
the reference log-probs once). The two fixes of examples/trl_sft.py apply here too and are imported from it:
``keep_4bit_trainable`` (bitsandbytes' eval-mode repacking on AVX512-BF16 CPUs) and ``fp32_adapter`` (TRL casts
the trainable factors of a 4-bit model to bf16, which rounds away small updates of QPiSSA's large factors).

Data: TRL's preference format, ``prompt`` / ``chosen`` / ``rejected`` (text, or lists of chat turns), e.g. the
GSM8K pairs of ``python -m qpissa.gsm8k_preference`` (tests/fixtures/gsm8k-dpo)::

    python examples/trl_dpo.py out/smollm2 --data tests/fixtures/gsm8k-dpo/train.jsonl \
        --eval-data tests/fixtures/gsm8k-dpo/test.jsonl --steps 10 --batch-size 2 --max-length 256 --lr 5e-4 \
        -o runs/smollm2-trl-dpo

``out`` may also be a ``qpissa train`` run (RUN/adapter on the OUT/residual named in RUN/config.json): DPO after
SFT. RUN/adapter is a PEFT adapter on OUT/residual, like ``qpissa train``'s. tests/test_trl.py runs this file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_sft import fp32_adapter, keep_4bit_trainable  # noqa: E402  (the two fixes, beside this file)


def start_dirs(out: str | Path) -> tuple[Path, Path]:
    """(residual, starting adapter): a decompose OUT, or a ``qpissa train`` RUN (RUN/adapter on its OUT/residual)."""
    out = Path(out)
    if not (out / "residual").is_dir() and (out / "config.json").is_file():
        return Path(json.loads((out / "config.json").read_text())["model"]) / "residual", out / "adapter"
    return out / "residual", out / "adapter"


def load(out: str | Path, device: str = "cpu"):
    """OUT/residual in 4-bit + the starting adapter, trainable (TRL adds the frozen ``ref`` copy)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    residual, adapter = start_dirs(out)
    base = AutoModelForCausalLM.from_pretrained(residual, device_map={"": device})
    keep_4bit_trainable(base)
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    tokenizer = AutoTokenizer.from_pretrained(residual)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def dataset(path: str | Path, limit: int | None = None):
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(path), split="train")
    ds = ds.select_columns(["prompt", "chosen", "rejected"])
    return ds.select(range(min(limit, len(ds)))) if limit else ds


def make_trainer(model, tokenizer, train_ds, eval_ds=None, *, output: str | Path, steps: int, batch_size: int = 2,
                 lr: float = 5e-4, beta: float = 0.1, loss_type: str = "sigmoid", max_length: int = 256,
                 warmup_ratio: float = 0.0, eval_steps: int = 0, seed: int = 0, device: str = "cpu",
                 report_to: str = "none", **extra):
    """TRL's DPOTrainer on the loaded model; evaluation (if any) also before the first step."""
    from trl import DPOConfig, DPOTrainer

    evaluate = eval_ds is not None and eval_steps > 0
    args = DPOConfig(
        output_dir=str(output), max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=round(warmup_ratio * steps), max_length=max_length, beta=beta, loss_type=[loss_type],
        bf16=True, use_cpu=device == "cpu", logging_steps=1, save_strategy="no", report_to=report_to, seed=seed,
        eval_strategy="steps" if evaluate else "no", eval_steps=eval_steps if evaluate else None,
        eval_on_start=evaluate, gradient_checkpointing=False, **extra)
    trainer = DPOTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer)
    fp32_adapter(trainer.model)  # the trainable "default" factors; the frozen "ref" copy was taken before the cast
    return trainer


def main(argv: list[str] | None = None):
    """Parse the command line, train, save OUTPUT/adapter; returns the trainer (the test reads its state)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="qpissa decompose output (residual/ + adapter/) or a qpissa train RUN")
    p.add_argument("--data", required=True, help="preference .jsonl: prompt, chosen, rejected")
    p.add_argument("--eval-data", help="held-out preference .jsonl, evaluated every --eval-steps")
    p.add_argument("--eval-examples", type=int, default=16)
    p.add_argument("--eval-steps", type=int, default=5)
    p.add_argument("-o", "--output", required=True, help="run directory; the adapter goes to OUTPUT/adapter")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss-type", default="sigmoid", help="sigmoid | ipo | … (TRL's loss_type)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--limit", type=int, help="use only the first N training pairs")
    p.add_argument("--report-to", default="none", help="none | tensorboard | wandb (transformers' report_to)")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load(a.out, device)
    eval_ds = dataset(a.eval_data, a.eval_examples) if a.eval_data else None
    trainer = make_trainer(model, tokenizer, dataset(a.data, a.limit), eval_ds, output=a.output, steps=a.steps,
                           batch_size=a.batch_size, lr=a.lr, beta=a.beta, loss_type=a.loss_type,
                           max_length=a.max_length, warmup_ratio=a.warmup_ratio, eval_steps=a.eval_steps,
                           device=device, report_to=a.report_to)
    trainer.train()
    adapter = Path(a.output) / "adapter"
    trainer.model.save_pretrained(str(adapter), selected_adapters=["default"])  # not the frozen "ref" copy
    print(f"adapter: {adapter}")
    return trainer


if __name__ == "__main__":
    main()
