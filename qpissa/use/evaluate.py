"""Evaluation: GSM8K answer accuracy (batched greedy generation) and perplexity.

Models are loaded the way a user would load them — plain ``transformers`` (+ ``peft`` for an adapter),
nothing of ours — so a number here is a number anyone can reproduce (also under lm-eval's ``hf`` model).

* GSM8K (Cobbe et al. 2021): greedy decoding, left-padded batches, the answer read by
  :func:`qpissa.use.answers.extract_answer` ("The answer is" first, as PiSSA's evaluation reads it, Meng et al.
  2024); accuracy = #(extracted == gold) / N.
* Perplexity: token-weighted over all documents, PPL = exp(Σ_t −log p(x_t | x_<t) / #tokens), every token
  but a document's first scored exactly once. Long documents use sliding windows: the first window scores its
  first ``max_length`` tokens, each later window scores ``stride`` new tokens with ``max_length − stride``
  tokens of context (the HF "perplexity of fixed-length models" recipe, without its unscored gaps).

Precision note (measured, transformers 5.24 / bitsandbytes 0.50 on CPU): a pre-quantized NF4 residual loads its
non-quantized tensors in bf16 whatever ``dtype`` says, and bitsandbytes multiplies 4-bit weights in bf16 in eval
mode on AVX512-BF16 CPUs, so NF4 runs compute in bf16 — as they do for every user of the checkpoint.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from qpissa.use.answers import answers_match, extract_answer, gold_answer
from qpissa.data import GSM8K_PROMPT, load_records
from qpissa import hub
from qpissa.choices import check_choices
from qpissa.errors import UserError

PromptStyle = Literal["auto", "alpaca", "chat", "plain"]
DType = Literal["float32", "bfloat16", "float16"]

ALPACA = GSM8K_PROMPT  # the prompt `qpissa train --template gsm8k` trains on (PiSSA repo's template)
PLAIN = "Question: {question}\nAnswer:"
# Where a base model, left alone, starts the next few-shot item; text after it is not part of the answer.
_CONTINUATION_MARKERS = ("\nQuestion:", "\n\nQuestion", "### Instruction", "<|im_end|>", "<|im_start|>")


@dataclass
class Gsm8kConfig:
    limit: int | None = field(default=None, metadata={"help": "first N rows/documents only"})
    batch_size: int = field(default=8, metadata={"help": "prompts (gsm8k) or windows (perplexity) per forward"})
    max_new_tokens: int = field(default=256, metadata={"help": "gsm8k: generation budget"})
    prompt_style: PromptStyle = field(default="auto", metadata={"help":
        "gsm8k: auto (the template the run was trained with, from RUN/config.json: chat → chat, else alpaca) | "
        "alpaca (= qpissa train's gsm8k template) | chat (the tokenizer's chat template, one user turn) | plain"})
    instruction: str = field(default="", metadata={"help": "gsm8k: text appended to each question"})
    data_split: str = field(default="test", metadata={"help": "split when --data is a Hub dataset id"})
    data_config: str | None = field(default=None, metadata={"help": "subset (config name) of a Hub --data, e.g. "
                                                                     "main for openai/gsm8k"})

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class PerplexityConfig:
    max_length: int = field(default=1024, metadata={"help": "perplexity: tokens per window"})
    stride: int = field(default=512, metadata={"help": "perplexity: new tokens scored per later window"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})
    text_field: str | None = field(default=None, metadata={
        "help": "perplexity: JSONL field(s), comma-separated (default text); classification: the text column "
                "(default: the one the run was trained on)"})
    limit: int | None = field(default=None, metadata={"help": "first N documents only"})
    data_split: str = field(default="test", metadata={"help": "split when --data is a Hub dataset id"})
    data_config: str | None = field(default=None, metadata={"help": "subset (config name) of a Hub --data, e.g. "
                                                                     "main for openai/gsm8k"})


# ---------------------------------------------------------------- loading


def _is_hf_model(d: Path) -> bool:
    if not (d / "config.json").exists():
        return False
    try:
        return "model_type" in json.loads((d / "config.json").read_text())
    except json.JSONDecodeError:
        return False


def _adapter_base(adapter: Path) -> Path:
    """The model an adapter belongs on: OUT/residual beside a decompose adapter, else base_model_name_or_path."""
    if _is_hf_model(adapter.parent / "residual"):
        return adapter.parent / "residual"  # a PiSSA adapter goes on its residual, never on the original
    cfg = adapter / "adapter_config.json"
    config = json.loads(cfg.read_text())
    base = config.get("base_model_name_or_path")
    if base and not Path(base).exists() and hub.is_hub_id(base):  # trained on a Hub model: fetch it (cached)
        return hub.resolve_model(base, config.get("revision"))
    if not base or not _is_hf_model(Path(base)):
        raise UserError(f"{cfg}: base_model_name_or_path {base!r} is not a local model dir; "
                        "pass the base model as MODEL and this dir with --adapter")
    return Path(base)


def resolve_model(model_or_run: str | Path, adapter: str | Path | None = None,
                  revision: str | None = None) -> tuple[Path, Path | None]:
    """(base model dir, adapter dir or None) from what the user points at:

    * a HF model dir (config.json with model_type) → that model, plus ``adapter`` if given; a Hub id ``org/name``
      that is not a local path → its snapshot at ``revision`` (:func:`qpissa.hub.resolve_model`);
    * a decompose output (``residual/`` + ``adapter/``) → the residual + its adapter;
    * a training run (``RUN/adapter``, or ``RUN/model`` after full fine-tuning) or an adapter dir → the adapter on
      its base (``OUT/residual`` beside a decompose adapter, else adapter_config's ``base_model_name_or_path``).
    """
    d = Path(model_or_run)
    if revision is not None or (not d.exists() and hub.is_hub_id(str(model_or_run))):
        d = hub.resolve_model(model_or_run, revision)
    if not d.is_dir():
        raise UserError(f"{d}: not a directory; give a HF model dir, a decompose/train output dir or an adapter dir")
    if adapter is not None:
        explicit = Path(adapter)
        if not (explicit / "adapter_config.json").exists():
            raise UserError(f"--adapter {explicit}: no adapter_config.json")
    else:
        explicit = None
    if _is_hf_model(d):
        return d, explicit
    if _is_hf_model(d / "residual"):
        found = d / "adapter" if (d / "adapter" / "adapter_config.json").exists() else None
        return d / "residual", explicit or found
    if _is_hf_model(d / "model"):
        return d / "model", explicit
    for cand in (d, d / "adapter"):
        if (cand / "adapter_config.json").exists():
            return _adapter_base(cand), explicit or cand
    raise UserError(f"{d}: no HF config.json, residual/, adapter/ or adapter_config.json found")


def load_model(model_dir: str | Path, adapter: str | Path | None = None, dtype: DType = "float32",
               device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """Plain ``AutoModelForCausalLM.from_pretrained`` (NF4 residuals load pre-quantized; NF4 MoE experts through
    :func:`qpissa.moe.load_residual`) + ``PeftModel``."""
    from transformers import AutoTokenizer

    from qpissa.usage import require_causal_lm

    require_causal_lm(model_dir, "eval")
    from qpissa.moe import load_residual  # plain from_pretrained, plus NF4 MoE experts when OUT has them

    model = load_residual(str(model_dir), dtype=getattr(torch, dtype), device_map=device)
    if adapter is not None:
        from qpissa.adapters import load_peft

        model = load_peft(model, adapter)
    model.eval()
    tok_dir = model_dir if (Path(model_dir) / "tokenizer_config.json").exists() else adapter
    if tok_dir is None or not (Path(tok_dir) / "tokenizer_config.json").exists():
        raise UserError(f"{model_dir}: no tokenizer files; copy the original model's tokenizer*.json there")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg}); expected one object per line") from None
            if limit is not None and len(rows) >= limit:
                break
    return rows


def read_rows(data: str | Path, limit: int | None = None, split: str = "test",
              config: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local JSONL file, else of the Hub dataset ``data`` (``split``, subset ``config``)."""
    if not Path(data).exists() and hub.is_hub_id(str(data)):
        return load_records(data, split, config, limit)
    if not Path(data).is_file():
        raise UserError(f"--data {data}: file not found (nor a Hub dataset id org/name)")
    return read_jsonl(data, limit)


# ---------------------------------------------------------------- GSM8K


def run_template(base: Path, adapter: Path | None) -> str | None:
    """The ``--template`` a training run used, from RUN/config.json beside RUN/adapter, a checkpoint or RUN/model."""
    for d in ([adapter.parent, adapter] if adapter is not None else []) + [base.parent]:
        try:
            saved = json.loads((Path(d) / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        template = (saved.get("data_cfg") or {}).get("template") if isinstance(saved, dict) else None
        if isinstance(template, str):
            return template
    return None


def resolve_prompt_style(style: PromptStyle, base: Path, adapter: Path | None) -> tuple[PromptStyle, str]:
    """``auto`` → chat for a run trained with --template chat, else alpaca; plus a line to show ('' if none)."""
    if style != "auto":
        return style, ""
    template = run_template(base, adapter)
    if template == "chat":
        return "chat", "prompt style: chat (the run was trained with --template chat)"
    if template not in (None, "gsm8k", "alpaca"):
        return "alpaca", f"prompt style: alpaca (the run's --template {template!r} has no eval counterpart)"
    return "alpaca", ""


def build_prompt(tokenizer: Any, question: str, style: PromptStyle = "alpaca", instruction: str = "") -> str:
    """The prompt text for one question (``instruction``, if any, is appended to the question; ``auto`` with no
    run to read is alpaca, see :func:`resolve_prompt_style`)."""
    content = f"{question}\n{instruction}".strip() if instruction else question
    if style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--prompt-style chat: this tokenizer has no chat template; use plain or alpaca")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return (PLAIN if style == "plain" else ALPACA).format(question=content)


def cut_continuation(text: str) -> str:
    """Drop what a model writes after its answer when it starts the next item (``\\nQuestion:`` …)."""
    cut = len(text)
    for marker in _CONTINUATION_MARKERS:
        pos = text.find(marker)
        if pos > 0:
            cut = min(cut, pos)
    return text[:cut].strip()


@torch.no_grad()
def generate_greedy(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                    batch_size: int, progress: Any = None) -> list[tuple[str, int]]:
    """Greedy completions (text, #new tokens) for ``prompts``, batched with left padding, longest first."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    out: list[tuple[str, int]] = [("", 0)] * len(prompts)
    eos = tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             temperature=None, top_p=None, top_k=None)
        new = gen[:, enc["input_ids"].shape[1]:]  # (B, ≤max_new_tokens)
        for row, i in enumerate(idx):
            ids = new[row].tolist()
            n = next((k + 1 for k, t in enumerate(ids) if t == eos), len(ids))
            out[i] = (tokenizer.decode(ids[:n], skip_special_tokens=True), n)
        if progress is not None:
            progress(len(idx))
    return out


def evaluate_gsm8k(model: torch.nn.Module, tokenizer: Any, data: str | Path, cfg: Gsm8kConfig,
                   progress: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-example records) of greedy GSM8K accuracy on the JSONL file ``data``."""
    rows = read_rows(data, cfg.limit, cfg.data_split, cfg.data_config)
    if not rows or "question" not in rows[0] or "answer" not in rows[0]:
        raise UserError(f"{data}: expected GSM8K JSONL rows with 'question' and 'answer' fields")
    prompts = [build_prompt(tokenizer, r["question"], cfg.prompt_style, cfg.instruction) for r in rows]
    t0 = time.perf_counter()
    outputs = generate_greedy(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, progress)
    seconds = time.perf_counter() - t0
    records = []
    for i, (row, (text, n_new)) in enumerate(zip(rows, outputs)):
        gold = gold_answer(row["answer"])
        pred = extract_answer(cut_continuation(text))
        records.append({"index": i, "question": row["question"], "gold": gold, "extracted": pred,
                        "correct": answers_match(pred, gold), "new_tokens": n_new,
                        "hit_max_new_tokens": n_new >= cfg.max_new_tokens, "completion": text})
    n_correct = sum(r["correct"] for r in records)
    n_tokens = sum(r["new_tokens"] for r in records)
    summary = {
        "task": "gsm8k", "data": str(data), "n": len(records), "correct": n_correct,
        "accuracy": n_correct / len(records), "no_answer": sum(r["extracted"] is None for r in records),
        "hit_max_new_tokens": sum(r["hit_max_new_tokens"] for r in records),
        "prompt_style": "alpaca" if cfg.prompt_style == "auto" else cfg.prompt_style,  # auto without a run: alpaca
        "instruction": cfg.instruction, "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size, "seconds": round(seconds, 3),
        "generated_tokens_per_s": round(n_tokens / seconds, 2) if seconds > 0 else None,
    }
    return summary, records


# ---------------------------------------------------------------- perplexity


def read_texts(path: str | Path, text_field: str = "text", limit: int | None = None, split: str = "test",
               config: str | None = None) -> list[str]:
    """Documents of a ``.jsonl`` file or Hub dataset (``text_field``; ``a,b`` joins fields), or one per text file."""
    if Path(path).is_file() and Path(path).suffix != ".jsonl":
        return [Path(path).read_text(encoding="utf-8")]
    fields = [f.strip() for f in text_field.split(",")]
    texts = []
    for i, row in enumerate(read_rows(path, limit, split, config)):
        missing = [f for f in fields if f not in row]
        if missing:
            raise UserError(f"{path}: row {i} has no field {missing[0]!r} (fields: {sorted(row)}); "
                            "choose with --text-field")
        texts.append("\n".join(str(row[f]) for f in fields))
    return texts


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows ``(start, first_scored, end)`` over token positions 0..n−1.

    Tokens ``first_scored..end−1`` are scored with context ``start..``; together the windows score
    positions 1..n−1 exactly once. Shapes: window length ``end − start ≤ max_length``.
    """
    if not 0 < stride < max_length:
        raise UserError(f"perplexity: need 0 < stride ({stride}) < max_length ({max_length})")
    out, t0 = [], 1
    t1 = min(max_length, n_tokens)
    while t0 < n_tokens:
        out.append((max(0, t1 - max_length), t0, t1))
        t0, t1 = t1, min(t1 + stride, n_tokens)
    return out


@torch.no_grad()
def token_nll(model: torch.nn.Module, docs: list[list[int]], cfg: PerplexityConfig,
              progress: Any = None) -> list[torch.Tensor]:
    """Per-document vectors of −log p(x_t | context) for t = 1..n−1 (fp32), windows batched with right padding."""
    jobs = [(d, w) for d, ids in enumerate(docs) for w in windows(len(ids), cfg.max_length, cfg.stride)]
    jobs.sort(key=lambda j: j[1][2] - j[1][0], reverse=True)
    device = next(model.parameters()).device
    pieces: list[list[tuple[int, torch.Tensor]]] = [[] for _ in docs]
    for b in range(0, len(jobs), cfg.batch_size):
        batch = jobs[b:b + cfg.batch_size]
        width = max(end - start for _, (start, _, end) in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(batch), width, dtype=torch.long)  # (B, L)
        for row, (d, (start, _, end)) in enumerate(batch):
            ids[row, :end - start] = torch.tensor(docs[d][start:end])
            mask[row, :end - start] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, L, V)
        for row, (d, (start, first, end)) in enumerate(batch):
            pos = torch.arange(first - start, end - start)  # window positions of scored tokens
            logp = torch.log_softmax(logits[row, pos - 1].float(), dim=-1)  # (T, V)
            target = ids[row, pos].to(logp.device)  # (T,)
            pieces[d].append((first, -logp.gather(1, target[:, None])[:, 0].cpu()))
        if progress is not None:
            progress(len(batch))
    return [torch.cat([p for _, p in sorted(ps, key=lambda x: x[0])]) if ps else torch.zeros(0) for ps in pieces]


def evaluate_perplexity(model: torch.nn.Module, tokenizer: Any, data: str | Path, cfg: PerplexityConfig,
                        progress: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-document records): token-weighted PPL = exp(Σ NLL / Σ tokens) over the file ``data``."""
    texts = read_texts(data, cfg.text_field or "text", cfg.limit, cfg.data_split, cfg.data_config)
    docs = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    t0 = time.perf_counter()
    nll = token_nll(model, docs, cfg, progress)
    seconds = time.perf_counter() - t0
    records = [{"index": i, "tokens_scored": int(v.numel()), "nll_sum": float(v.double().sum()),
                "perplexity": math.exp(float(v.double().mean())) if v.numel() else None} for i, v in enumerate(nll)]
    total = sum(r["nll_sum"] for r in records)
    count = sum(r["tokens_scored"] for r in records)
    if count == 0:
        raise UserError(f"{data}: no document has two or more tokens; nothing to score")
    summary = {"task": "perplexity", "data": str(data), "documents": len(records), "tokens_scored": count,
               "mean_nll": total / count, "perplexity": math.exp(total / count), "max_length": cfg.max_length,
               "stride": cfg.stride, "seconds": round(seconds, 3),
               "tokens_per_s": round(count / seconds, 1) if seconds > 0 else None}
    return summary, records


def write_results(out_dir: str | Path, task: str, summary: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    """``OUT/<task>_examples.jsonl`` (one record a line) and ``OUT/<task>_summary.json``, atomically."""
    from qpissa.atomic import output_folder, write_json, write_text

    out = Path(out_dir)
    with output_folder(out):  # a full disk: one line, and no examples file without its summary
        write_text(out / f"{task}_examples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        write_json(out / f"{task}_summary.json", summary)
    return out / f"{task}_summary.json"
