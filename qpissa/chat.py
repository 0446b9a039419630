"""Conversations → token ids + an assistant-token mask, rendered by the tokenizer's own chat template.

A record holds ``messages`` (or ``conversations``): a list of ``{role, content}`` turns, or ShareGPT's
``{from, value}`` with human/gpt roles (mapped to user/assistant). The whole conversation is rendered
once with ``apply_chat_template`` and tokenized once with character offsets; nothing is re-tokenized
piecewise, so the ids are exactly what the template produces.

Which characters are trained, for the assistant message at index i (every assistant turn):

    start = len(render(messages[:i], add_generation_prompt=True))   # after the assistant header
    end   = len(render(messages[:i+1]))                              # after the turn's end-of-turn text
    span  = [start, end − trailing whitespace)

so for ChatML ``<|im_start|>assistant\\n`` (the header: prompt) is masked, the content and ``<|im_end|>``
(the model must learn to stop) are trained, and the ``\\n`` the template writes after ``<|im_end|>`` is
not (it belongs to the next turn's scaffolding). A token is trained when any of its characters lies in
a span (a BPE merge across a border is trained, as transformers' ``return_assistant_tokens_mask`` does).
Both prefix renderings must be string prefixes of the full rendering; a template that rewrites earlier
turns once later ones follow (e.g. drops past reasoning) is not prefix-stable and is refused.
"""
from __future__ import annotations

from typing import Any

from qpissa.errors import UserError

CHAT_COLUMNS = ("messages", "conversations")  # checked in this order
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def chat_column(record: dict[str, Any]) -> str | None:
    """The record's conversation column (``messages`` or ``conversations``) if it holds a list of turns."""
    for name in CHAT_COLUMNS:
        if isinstance(record.get(name), list):
            return name
    return None


def messages_of(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The record's turns as ``[{role, content}]``: ShareGPT's from/value and human/gpt are mapped."""
    column = chat_column(record)
    if column is None:
        raise UserError(f"{where}: column 'messages' (or 'conversations') is missing or not a list of turns "
                        f"(columns present: {sorted(record)}); pick a --template that matches the data")
    out = []
    for j, turn in enumerate(record[column]):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: {column}[{j}] is {type(turn).__name__}, expected a {{role, content}} object")
        role = turn.get("role") or turn.get("from")  # datasets fills keys other rows have with None
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if role is None or (content is not None and not isinstance(content, str)):
            raise UserError(f"{where}: {column}[{j}] needs a 'role' (or 'from') and a text 'content' (or 'value'); "
                            f"got keys {sorted(k for k, v in turn.items() if v is not None)}")
        out.append({"role": _ROLES.get(str(role).lower(), str(role)), "content": content or ""})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant turn (roles: {[m['role'] for m in out]}); "
                        "there is nothing to train on")
    if out[0]["role"] == "assistant":
        raise UserError(f"{where}: the conversation starts with an assistant turn; put a user (or system) turn "
                        "first")
    return out


def require_chat_template(tokenizer: Any, what: str = "--template chat") -> None:
    """One line when the tokenizer cannot render conversations or give character offsets."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{what}: the model's tokenizer has no chat template (no chat_template in "
                        "tokenizer_config.json or chat_template.jinja); use --template alpaca or a format string")
    if not getattr(tokenizer, "is_fast", True):
        raise UserError(f"{what}: needs a fast (tokenizers-backed) tokenizer for character offsets")


def _render(tokenizer: Any, messages: list[dict[str, str]], where: str, generation_prompt: bool = False) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # noqa: BLE001 - jinja raises TemplateError, templates raise their own exceptions
        raise UserError(f"{where}: the chat template failed on this conversation: {err}") from None
    return text


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, character spans [start, end) of every assistant turn's trained text)."""
    full = _render(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], where, generation_prompt=True)
        turn = _render(tokenizer, messages[:i + 1], where)
        if not (full.startswith(head) and full.startswith(turn) and len(head) <= len(turn)):
            bad = head if not full.startswith(head) else turn
            at = next((k for k, (a, b) in enumerate(zip(bad, full)) if a != b), min(len(bad), len(full)))
            raise UserError(f"{where}: the chat template is not prefix-stable (rendering the first {i + 1} messages "
                            f"differs from the whole conversation at character {at}: {bad[at:at + 30]!r} vs "
                            f"{full[at:at + 30]!r}), so assistant turns cannot be located exactly; use a template "
                            "that renders earlier turns the same way whatever follows")
        end = len(turn.rstrip())  # the template's whitespace after the end-of-turn token is not trained
        spans.append((len(head), max(end, len(head))))
    return full, spans


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is assistant text (to be trained)."""
    text, spans = assistant_spans(tokenizer, messages, where)
    # the template writes its own special tokens (bos included where the model wants one): add none
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]  # (T,), (T, 2)
    mask = []
    for a, b in offsets:
        if a == b:  # an empty offset (a trimmed whitespace token): trained when its position is in a span
            mask.append(any(s <= a < e for s, e in spans))
        else:
            mask.append(any(a < e and b > s for s, e in spans))
    return list(ids), mask
