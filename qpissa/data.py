"""Datasets → token batches: prompt templates, label masking, right padding or packing.

Supervised fine-tuning trains only on the response (PiSSA recipe, Meng et al. 2024, §5 and
the Alpaca recipe): for one example the model sees ``prompt + response + eos`` and

    labels[t] = -100            for every prompt token t   (ignored by the cross-entropy)
    labels[t] = input_ids[t]    for every response token

so ``loss = mean over response tokens of -log p(x_t | x_<t)``. The prompt and the response are
tokenized separately and concatenated, so the mask boundary is exact (no BPE merge across it).
Conversations (``--template chat``: a ``messages``/``conversations`` column) are rendered by the
tokenizer's chat template and trained on every assistant turn, end-of-turn token included
(:mod:`qpissa.chat` says exactly which tokens).

Data order is a pure function of ``(seed, epoch)`` (:func:`epoch_order`), so a run can resume from
``(epoch, position)`` and see exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence, TypeVar

import torch

from qpissa.chat import chat_column, messages_of, require_chat_template, tokenize_chat
from qpissa.errors import UserError

IGNORE_INDEX = -100

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")
ALPACA_PROMPT = ALPACA_HEADER + "### Instruction:\n{instruction}\n\n### Response:"
ALPACA_PROMPT_WITH_INPUT = (ALPACA_HEADER.replace("a task.", "a task, paired with an input that provides further "
                                                  "context.") + "### Instruction:\n{instruction}\n\n### Input:\n"
                            "{input}\n\n### Response:")
GSM8K_PROMPT = ALPACA_HEADER + "### Instruction:\n{question}\n\n### Response:"  # = qpissa.use.evaluate.ALPACA

TemplateName = Literal["gsm8k", "alpaca", "chat"]

T = TypeVar("T")


@dataclass
class DataConfig:
    """How to turn records into training sequences."""

    template: str = field(default="gsm8k", metadata={
        "help": "'gsm8k' (question/answer; response ends with 'The answer is: X'), 'alpaca' "
                "(instruction, optional input, output), 'chat' (a messages/conversations column of "
                "{role, content} or ShareGPT {from, value} turns, rendered by the model's chat template, "
                "trained on assistant turns; picked automatically for such data when left at gsm8k), "
                "or a format string whose LAST {field} is the response, e.g. 'Q: {question}\\nA: {answer}'"})
    max_length: int = field(default=512, metadata={"help": "tokens per sequence (prompt + response + eos)"})
    packing: bool = field(default=False, metadata={
        "help": "concatenate examples into full max_length rows (attention spans example borders)"})
    skip_long_prompts: bool = field(default=False, metadata={
        "help": "drop examples whose prompt leaves no room for a response instead of failing"})


# ----------------------------------------------------------------------------- loading records

def load_records(path: str | Path, split: str = "train", config: str | None = None, limit: int | None = None,
                 flags: tuple[str, str] = ("--data-split", "--data-config")) -> list[dict[str, Any]]:
    """The first ``limit`` rows of a local JSON/JSONL/Parquet/CSV file, a ``datasets.save_to_disk`` directory
    or, when no such path exists, the Hub dataset ``org/name`` (subset ``config``; see :mod:`qpissa.hub`).
    ``split`` picks the split of a saved DatasetDict or Hub dataset; ``flags`` name those options in errors."""
    import datasets

    from qpissa.hub import is_hub_id, load_hub_dataset

    path = Path(path)
    if limit is not None and limit < 1:
        raise UserError(f"row limit {limit} for {path}: pass a positive number of rows")
    if not path.exists() and is_hub_id(str(path)):
        ds = load_hub_dataset(str(path), split, config, flags)
    elif not path.exists():
        raise UserError(f"data file {path} does not exist: pass a local .jsonl/.json/.parquet/.csv file, "
                        "a dataset saved with save_to_disk, or a Hub dataset id org/name")
    elif path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - datasets raises several types here
            raise UserError(f"data directory {path} is not a saved dataset ({err}); "
                            "pass a file or a save_to_disk directory") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"dataset {path} has splits {list(ds)} but no '{split}' split; choose one with "
                                f"{flags[0]}")
            ds = ds[split]
    else:
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix.lower())
        if kind is None:
            raise UserError(f"data file {path}: unknown extension {path.suffix!r}; use .jsonl, .json, .parquet "
                            "or .csv")
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # noqa: BLE001
            raise UserError(f"data file {path} could not be read as {kind}: {err}") from None
    if len(ds) == 0:
        raise UserError(f"data file {path} is empty: it needs at least one example")
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return [dict(row) for row in ds]


# ----------------------------------------------------------------------------- templates

def _fields(fmt: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(fmt) if name]


def _require(record: dict[str, Any], columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in record]
    if missing:
        raise UserError(f"{where}: column {missing[0]!r} is missing (columns present: {sorted(record)}); "
                        "pick a --template that matches the data")


def gsm8k_response(answer: str) -> str:
    """GSM8K answer → 'reasoning\\nThe answer is: X' (calculator annotations <<...>> removed)."""
    reasoning, sep, final = answer.rpartition("####")
    if not sep:
        reasoning, final = answer, ""
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    final = final.strip().replace(",", "")
    return f"{reasoning}\nThe answer is: {final}" if final else reasoning


def render(record: dict[str, Any], template: str, where: str = "data") -> tuple[str, str]:
    """One record → (prompt, response) text for a built-in template name or a user format string."""
    if template == "gsm8k":
        _require(record, ["question", "answer"], where)
        return GSM8K_PROMPT.format(question=record["question"]), " " + gsm8k_response(str(record["answer"]))
    if template == "alpaca":
        _require(record, ["instruction", "output"], where)
        if str(record.get("input") or "").strip():
            return ALPACA_PROMPT_WITH_INPUT.format(**record), " " + str(record["output"])
        return ALPACA_PROMPT.format(instruction=record["instruction"]), " " + str(record["output"])
    names = _fields(template)
    if not names or not template.rstrip().endswith("{" + names[-1] + "}"):
        raise UserError(f"--template {template!r} must be 'gsm8k', 'alpaca' or a format string ending in the "
                        "response field, e.g. 'Q: {question}\\nA: {answer}'")
    _require(record, names, where)
    response_field = names[-1]
    cut = template.rindex("{" + response_field + "}")
    return template[:cut].format(**record), str(record[response_field])


# ----------------------------------------------------------------------------- tokenization

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_example(tokenizer, prompt: str, response: str, max_length: int) -> Example | None:
    """prompt+response+eos with prompt labels −100; truncated to max_length; None if no response token fits."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        return None
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return Example(ids, labels)


def chat_example(tokenizer, record: dict[str, Any], max_length: int, where: str) -> tuple[Example | None, int]:
    """One conversation → (labels = ids on assistant tokens, −100 elsewhere; truncated to max_length, or None
    when no assistant token fits; the number of tokens before the first assistant token)."""
    ids, mask = tokenize_chat(tokenizer, messages_of(record, where), where)  # (T,), (T,)
    first = mask.index(True) if True in mask else len(ids)
    if first >= max_length:
        return None, first
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return Example(ids[:max_length], labels[:max_length]), first


def resolve_template(cfg: DataConfig, records: list[dict[str, Any]], source: str = "data") -> tuple[DataConfig, str]:
    """--template left at its default on conversational data → 'chat', and the line that says so ('' if kept)."""
    default = next(f.default for f in fields(DataConfig) if f.name == "template")
    first = records[0] if records else {}
    column = chat_column(first)
    if cfg.template != default or column is None or {"question", "answer"} <= first.keys():
        return cfg, ""
    return replace(cfg, template="chat"), (f"{source}: a '{column}' column of turns: using --template chat "
                                           "(the model's chat template; assistant turns are trained)")


def build_examples(records: list[dict[str, Any]], tokenizer, cfg: DataConfig, source: str = "data") -> list[Example]:
    """Tokenize all records; a prompt longer than max_length is an error unless skip_long_prompts."""
    chat = cfg.template == "chat"
    if chat:
        require_chat_template(tokenizer)
    out: list[Example] = []
    for i, rec in enumerate(records):
        if chat:  # n: tokens before the first assistant token
            ex, n = chat_example(tokenizer, rec, cfg.max_length, where=f"{source} row {i}")
        else:
            prompt, response = render(rec, cfg.template, where=f"{source} row {i}")
            ex = tokenize_example(tokenizer, prompt, response, cfg.max_length)
        if ex is None:
            if cfg.skip_long_prompts:
                continue
            n = n if chat else len(tokenizer(prompt)["input_ids"])
            raise UserError(f"{source} row {i}: the prompt is {n} tokens but --max-length is {cfg.max_length}; "
                            "raise --max-length or pass --skip-long-prompts")
        out.append(ex)
    if not out:
        raise UserError(f"{source}: no example fits --max-length {cfg.max_length}; raise --max-length")
    if cfg.packing:
        out = pack(out, cfg.max_length)
    return out


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate examples (labels keep their −100 prompt masks) and cut into rows of max_length tokens."""
    ids = [t for ex in examples for t in ex.input_ids]
    labels = [t for ex in examples for t in ex.labels]
    rows = [Example(ids[i:i + max_length], labels[i:i + max_length]) for i in range(0, len(ids), max_length)]
    return [r for r in rows if any(t != IGNORE_INDEX for t in r.labels)]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids/labels/attention_mask, each (B, T)."""
    T = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), T), dtype=torch.long)  # (B, T)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[b, :n] = torch.tensor(ex.input_ids)
        labels[b, :n] = torch.tensor(ex.labels)
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ----------------------------------------------------------------------------- order and batches

def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of n examples used in ``epoch``: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


@dataclass
class DataPosition:
    """Where the loader is: next batch starts at ``order(epoch)[index]``. Saved in checkpoints."""

    epoch: int = 0
    index: int = 0


def shuffled_batches(items: Sequence[T], batch_size: int, seed: int, pos: DataPosition,
                     collate_fn: Callable[[list[T]], dict[str, torch.Tensor]]) -> Iterator[tuple[dict[str, torch.Tensor], DataPosition]]:
    """Endless shuffled micro-batches of ``items`` from ``pos``; yields (batch, position after it). Drops a short
    last batch (the next epoch starts a new order)."""
    if len(items) < batch_size:
        raise UserError(f"only {len(items)} training examples for --batch-size {batch_size}; "
                        "lower the batch size or add data")
    epoch, index = pos.epoch, pos.index
    while True:
        order = epoch_order(len(items), seed, epoch)
        while index + batch_size <= len(order):
            chunk = [items[j] for j in order[index:index + batch_size]]
            index += batch_size
            yield collate_fn(chunk), DataPosition(epoch, index)
        epoch, index = epoch + 1, 0


def batches(examples: list[Example], batch_size: int, seed: int, pad_id: int,
            pos: DataPosition) -> Iterator[tuple[dict[str, torch.Tensor], DataPosition]]:
    """Endless shuffled, padded causal-LM micro-batches from ``pos`` (see :func:`shuffled_batches`)."""
    return shuffled_batches(examples, batch_size, seed, pos, lambda chunk: collate(chunk, pad_id))


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Held-out batches in file order (the last one may be short)."""
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id)
