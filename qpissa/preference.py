"""Preference pairs → token rows: TRL's prompt / chosen / rejected format, checked, tokenized and truncated.

A record holds a prompt and two completions. Plain text (``"prompt": str``): the model sees ``prompt + chosen +
eos`` and ``prompt + rejected + eos`` (TRL appends the eos as well). Conversational (``"prompt": [{role,
content}, …]``, ``"chosen"``/``"rejected"``: lists of assistant turns): rendered with the tokenizer's chat
template; the prompt is ``render(prompt, add_generation_prompt=True)`` and each completion is what
``render(prompt + completion)`` adds after it (as TRL's DPOTrainer does; the template's end-of-turn token is
part of the completion). Only the completion tokens enter the log-probabilities.

Length handling, as TRL: with ``max_prompt_length`` the prompt keeps its LAST tokens first (TRL < 0.20's
``truncation_mode="keep_end"`` for prompts), then prompt + completion keeps its first ``max_length`` tokens
(TRL 1.16's ``keep_start``), so a long completion loses its end. A prompt that leaves no room for a
completion token is an error naming the row (TRL drops it; ``--skip-long-prompts`` drops it here too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from qpissa.errors import UserError

IGNORE_INDEX = -100


@dataclass
class Pair:
    """One tokenized preference pair: the shared prompt and the two completions (eos / end-of-turn included)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    index: int  # row of the source file (reference log-probs are stored by it)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _turns(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, dict) for t in value) and bool(value)


def check_record(rec: dict[str, Any], names: tuple[str, str, str], where: str) -> str:
    """One line for a row the objective cannot use; returns its kind: ``text`` or ``chat``."""
    for name in names:
        if name not in rec or rec[name] is None:
            raise UserError(f"{where}: field {name!r} is missing (columns present: {sorted(rec)}); preference data "
                            "needs prompt, chosen and rejected (rename with --prompt-field/--chosen-field/"
                            "--rejected-field)")
    prompt, chosen, rejected = (rec[n] for n in names)
    kinds = {"text" if _text(v) else "chat" if _turns(v) else "bad" for v in (prompt, chosen, rejected)}
    if kinds not in ({"text"}, {"chat"}):
        raise UserError(f"{where}: fields {list(names)} must all be text or all be lists of {{role, content}} "
                        f"turns; got {[type(rec[n]).__name__ for n in names]}")
    for name, value in zip(names[1:], (chosen, rejected)):
        empty = (not value.strip()) if _text(value) else not any(str(t.get("content") or "").strip() for t in value)
        if empty:
            raise UserError(f"{where}: field {name!r} is an empty completion; drop the row or fill it")
    if chosen == rejected:
        raise UserError(f"{where}: fields {names[1]!r} and {names[2]!r} are identical, so the pair prefers nothing; "
                        "drop the row")
    return kinds.pop()


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]], where: str, generation_prompt: bool) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # noqa: BLE001 - jinja and templates raise their own types
        raise UserError(f"{where}: the chat template failed on this conversation: {err}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_record(tokenizer: Any, rec: dict[str, Any], names: tuple[str, str, str], kind: str,
                    where: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) before truncation; the completion starts where the tokenized prompt
    and prompt + completion diverge (TRL's rule; a BPE merge across the border moves it left)."""
    prompt, chosen, rejected = (rec[n] for n in names)
    if kind == "chat":
        p = _chat_ids(tokenizer, prompt, where, True)
        pc = _chat_ids(tokenizer, prompt + chosen, where, False)
        pr = _chat_ids(tokenizer, prompt + rejected, where, False)
    else:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        pc = tokenizer(prompt + chosen, add_special_tokens=True)["input_ids"] + eos
        pr = tokenizer(prompt + rejected, add_special_tokens=True)["input_ids"] + eos
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return p[:n], pc[n:], pr[n:]


def build_pairs(records: Sequence[dict[str, Any]], tokenizer: Any, names: tuple[str, str, str], max_length: int,
                max_prompt_length: int | None = None, skip_long_prompts: bool = False,
                source: str = "data") -> list[Pair]:
    """Check and tokenize every record (see the module docstring); rows are checked before any is tokenized."""
    kinds = [check_record(rec, names, f"{source} row {i}") for i, rec in enumerate(records)]
    if "chat" in kinds:
        from qpissa.chat import require_chat_template

        require_chat_template(tokenizer, "conversational preference data")
    pairs = []
    for i, (rec, kind) in enumerate(zip(records, kinds)):
        where = f"{source} row {i}"
        prompt, chosen, rejected = tokenize_record(tokenizer, rec, names, kind, where)
        if max_prompt_length is not None:
            prompt = prompt[-max_prompt_length:] if max_prompt_length > 0 else []
        if len(prompt) >= max_length:
            if skip_long_prompts:
                continue
            raise UserError(f"{where}: field {names[0]!r} is {len(prompt)} tokens but --max-length is {max_length}; "
                            "raise --max-length, set --max-prompt-length or pass --skip-long-prompts")
        room = max_length - len(prompt)
        pairs.append(Pair(prompt, chosen[:room], rejected[:room], i))
    if not pairs:
        raise UserError(f"{source}: no pair fits --max-length {max_length}; raise --max-length")
    return pairs


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows, chosen at [:, 0] and rejected at [:, 1]: input_ids/labels/attention_mask (B, 2, T)
    (labels: the completion's ids, −100 on the prompt and padding), index (B,) the source rows."""
    seqs = [(p.prompt, c) for p in pairs for c in (p.chosen, p.rejected)]
    T = max(len(a) + len(b) for a, b in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (2B, T)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)  # (2B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (2B, T)
    for row, (prompt, completion) in enumerate(seqs):
        n, m = len(prompt), len(completion)
        ids[row, :n + m] = torch.tensor(prompt + completion)
        labels[row, n:n + m] = torch.tensor(completion)
        mask[row, :n + m] = 1
    B = len(pairs)
    return {"input_ids": ids.view(B, 2, T), "labels": labels.view(B, 2, T), "attention_mask": mask.view(B, 2, T),
            "index": torch.tensor([p.index for p in pairs], dtype=torch.long)}
