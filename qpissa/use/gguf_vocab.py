"""The tokenizer as GGUF metadata: tokens, token types, merges or scores, special ids, BOS/EOS habits, chat template.

Read from ``tokenizer.json`` (what every fast tokenizer has) plus the loaded tokenizer for what it *does*:
whether it prepends BOS is measured by tokenizing a word, not read from a flag, so llama.cpp adds exactly what
transformers adds. Two tokenizer families:

* byte-level BPE (GPT-2 style: SmolLM2, Qwen, Llama 3) → ``tokenizer.ggml.model = gpt2`` with the merges and a
  pre-tokenizer name llama.cpp knows, chosen from the tokenizer's own split rule (:func:`pre_tokenizer`);
* SentencePiece BPE (``byte_fallback``: Llama 2, Mistral, Gemma) → ``llama`` with per-token scores; a BPE
  SentencePiece model ranks its pieces by id, so the score is −id.

Token types as llama.cpp reads them: 1 normal, 3 control (special added tokens), 4 user-defined (other added
tokens), 5 unused (ids the tokenizer does not fill, written ``[PAD<id>]``), 6 byte (``<0xNN>``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from qpissa.errors import UserError

NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6
# the GPT-2 split rule that a ByteLevel(use_regex=True) pre-tokenizer applies
_QWEN2_RULE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_RULE = _QWEN2_RULE.replace(r"\p{N}|", r"\p{N}{1,3}|")


def _pieces(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not node:
        return []
    return [p for sub in node.get("pretokenizers", []) for p in _pieces(sub)] if node["type"] == "Sequence" else [node]


def pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for this tokenizer's split rule, or None when it is not one llama.cpp implements."""
    pieces = _pieces(tokenizer_json.get("pre_tokenizer"))
    kinds = [p["type"] for p in pieces]
    rules = [p.get("pattern", {}).get("Regex") for p in pieces if p["type"] == "Split"]
    if kinds == ["ByteLevel"] and pieces[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and pieces[0].get("individual_digits") and pieces[1].get("use_regex", True):
        return "smollm"  # each digit apart, then GPT-2's rule
    if kinds and kinds[0] == "Split" and kinds[1:] == ["ByteLevel"] and not pieces[1].get("use_regex", True):
        return {_QWEN2_RULE: "qwen2", _LLAMA3_RULE: "llama-bpe"}.get(rules[0] or "")
    return None


def _probe(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) as the tokenizer actually does on plain text."""
    ids = tokenizer("hello")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, len(ids) > 1 and eos is not None and ids[-1] == eos


def write_vocab(writer: Any, model_dir: Path, vocab_size: int) -> list[str]:
    """Write the tokenizer metadata of ``model_dir``; returns notes for the summary (e.g. an unknown split rule)."""
    import gguf
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; GGUF needs the tokenizer (save it with the model)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{path}: tokenizer model {model.get('type')!r}; GGUF export supports BPE tokenizers "
                        "(byte-level or SentencePiece BPE)")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    by_id = {i: tok for tok, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise UserError(f"{path}: token id {max(by_id)} ≥ config vocab_size {vocab_size}")
    sentencepiece = bool(model.get("byte_fallback"))
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(text)
            types.append(BYTE if sentencepiece and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else NORMAL)
        scores.append(-float(i) if types[-1] == NORMAL else 0.0)
    notes: list[str] = []
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_adds_space_prefix(tj))
    else:
        pre = pre_tokenizer(tj)
        if pre is None:
            notes.append(f"{path}: pre-tokenizer not one llama.cpp names; wrote 'default' (text may split "
                         "differently from transformers)")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not sentencepiece:
        special = gguf.SpecialVocab(model_dir, load_merges=True, special_token_types=(), n_vocab=vocab_size)
        writer.add_token_merges(special.merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(int(tid))
    add_bos, add_eos = _probe(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)
    return notes


def _adds_space_prefix(tj: dict[str, Any]) -> bool:
    """SentencePiece's dummy prefix: a Prepend("▁") normalizer or a Metaspace pre-tokenizer that prepends."""
    norms = (tj.get("normalizer") or {}).get("normalizers") or [tj.get("normalizer") or {}]
    if any(n.get("type") == "Prepend" for n in norms):
        return True
    return any(p["type"] == "Metaspace" and p.get("prepend_scheme", "always") != "never"
               for p in _pieces(tj.get("pre_tokenizer")))
