"""Fine-tune a ``qpissa decompose`` output with TRL's ``SFTTrainer`` instead of ``qpissa train``.

OUT/residual is a plain pre-quantized bitsandbytes NF4 checkpoint and OUT/adapter a plain PEFT LoRA adapter, so
TRL trains them like any QLoRA model. Two things differ from a fresh QLoRA run (both handled below):

1. bitsandbytes' eval-mode trap (CPU only): on an AVX512-BF16 CPU, a ``Linear4bit`` that runs in eval mode without
   grad (``trainer.evaluate()``, ``eval_strategy="steps"``, ``eval_on_start``) repacks its NF4 bytes for an inference
   kernel that has no backward; every later training step routes the base layers through that kernel, and the
   gradient stops there (torch warns "gemv_4bit: an autograd kernel was not registered"; measured on SmolLM2 with
   TRL 1.16: after one evaluation, layer 0's lora_A gradient came out 3x too small). ``keep_4bit_trainable``
   switches the repacking off (what ``qpissa.quant.keep_4bit_layout_trainable`` does in ``qpissa train``).
2. TRL casts the trainable parameters of a 4-bit model to bf16 (the QLoRA paper's recipe). QPiSSA factors are the
   principal singular components, much larger than fresh LoRA factors: bf16 rounds away updates below ~2^-8 of
   their magnitude (at the PiSSA recipe's lr 2e-5, an Adam step of ~lr would vanish in 94% of the entries of
   out/smollm2's r=16 factors, 59% at lr 2e-4).
   ``fp32_adapter`` casts them back to fp32 master weights before the optimizer is built.

Needs ``pip install "qpissa[trl]"`` (or ``pip install trl``); qpissa itself is not imported. README's SmolLM2 run::

    python examples/trl_sft.py out/smollm2 --data tests/fixtures/gsm8k/train.jsonl \
        --eval-data tests/fixtures/gsm8k/test.jsonl --steps 10 --batch-size 2 --max-length 256 --lr 2e-4 \
        -o runs/smollm2-trl

RUN/adapter is a PEFT adapter on OUT/residual, like ``qpissa train``'s: ``qpissa convert RUN/adapter --init
OUT/adapter`` and ``qpissa merge OUT/residual RUN/adapter`` take it. tests/test_trl.py runs this file.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

# qpissa's "gsm8k" template (qpissa.data.GSM8K_PROMPT): the Alpaca prompt of the PiSSA recipe
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
          "\n\n### Instruction:\n{question}\n\n### Response:")


def gsm8k_prompt_completion(row: dict) -> dict:
    """A GSM8K row → TRL's prompt/completion format (loss on the completion only), as qpissa's gsm8k template:
    calculator annotations <<...>> dropped, '#### X' → 'The answer is: X'. TRL appends the eos token."""
    reasoning, sep, final = row["answer"].rpartition("####")
    if not sep:
        reasoning, final = row["answer"], ""
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    final = final.strip().replace(",", "")
    completion = f"{reasoning}\nThe answer is: {final}" if final else reasoning
    return {"prompt": PROMPT.format(question=row["question"]), "completion": " " + completion}


def keep_4bit_trainable(model) -> None:
    """Stop bitsandbytes from repacking Linear4bit weights for its CPU inference kernel (no backward) in eval mode."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def fp32_adapter(model) -> None:
    """Trainable parameters back to fp32 (TRL casts them to bf16 for a 4-bit base)."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def load(out: str | Path, device: str = "cpu"):
    """OUT/residual in 4-bit (its config.json carries the quantization config) + OUT/adapter, trainable."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    base = AutoModelForCausalLM.from_pretrained(out / "residual", device_map={"": device})
    keep_4bit_trainable(base)
    model = PeftModel.from_pretrained(base, out / "adapter", is_trainable=True)  # only lora_A/lora_B train
    tokenizer = AutoTokenizer.from_pretrained(out / "residual")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def dataset(path: str | Path, limit: int | None = None):
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(path), split="train")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.map(gsm8k_prompt_completion, remove_columns=ds.column_names)


def make_trainer(model, tokenizer, train_ds, eval_ds=None, *, output: str | Path, steps: int, batch_size: int = 2,
                 grad_accum: int = 1, lr: float = 2e-4, max_length: int = 256, warmup_ratio: float = 0.03,
                 eval_steps: int = 0, grad_checkpointing: bool = True, seed: int = 0, device: str = "cpu",
                 report_to: str = "none", **extra):
    """TRL's SFTTrainer on the loaded model; evaluation (if any) also before the first step, as a baseline."""
    from trl import SFTConfig, SFTTrainer

    evaluate = eval_ds is not None and eval_steps > 0
    args = SFTConfig(
        output_dir=str(output), max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, gradient_accumulation_steps=grad_accum, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=round(warmup_ratio * steps), max_length=max_length, bf16=True,
        use_cpu=device == "cpu", logging_steps=1, save_strategy="no", report_to=report_to, seed=seed,
        eval_strategy="steps" if evaluate else "no", eval_steps=eval_steps if evaluate else None,
        eval_on_start=evaluate, gradient_checkpointing=grad_checkpointing, **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer)
    fp32_adapter(trainer.model)
    return trainer


def main(argv: list[str] | None = None):
    """Parse the command line, train, save OUTPUT/adapter; returns the trainer (the test reads its state)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="qpissa decompose output directory (residual/ + adapter/)")
    p.add_argument("--data", required=True, help="GSM8K-style .jsonl (question, answer)")
    p.add_argument("--eval-data", help="held-out .jsonl, evaluated every --eval-steps")
    p.add_argument("--eval-examples", type=int, default=16)
    p.add_argument("--eval-steps", type=int, default=5)
    p.add_argument("-o", "--output", required=True, help="run directory; the adapter goes to OUTPUT/adapter")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--limit", type=int, help="use only the first N training rows")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward (TRL's default; off is faster for small models)")
    p.add_argument("--report-to", default="none", help="none | tensorboard | wandb (transformers' report_to)")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load(a.out, device)
    eval_ds = dataset(a.eval_data, a.eval_examples) if a.eval_data else None
    trainer = make_trainer(model, tokenizer, dataset(a.data, a.limit), eval_ds, output=a.output, steps=a.steps,
                           batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr, max_length=a.max_length,
                           warmup_ratio=a.warmup_ratio, eval_steps=a.eval_steps,
                           grad_checkpointing=a.grad_checkpointing, device=device, report_to=a.report_to)
    trainer.train()
    adapter = Path(a.output) / "adapter"
    trainer.save_model(str(adapter))  # adapter_config.json + adapter_model.safetensors (fp32)
    print(f"adapter: {adapter}")
    return trainer


if __name__ == "__main__":
    main()
