"""GSM8K answer extraction and comparison: small pure functions, no model, no I/O.

A model's free-text solution is reduced to one canonical number string, in this order of trust:

1. the text after the *last* "The answer is" (the phrase PiSSA's GSM8K training data ends with and its
   evaluation reads, Meng et al. 2024; ``qpissa train --template gsm8k`` writes "The answer is: X") — or
   "Answer:" / "Final answer:";
2. the text after the last ``####`` (GSM8K's own gold format, Cobbe et al. 2021);
3. the last ``\\boxed{…}`` (common in math-tuned chat models);
4. otherwise the last number anywhere in the text.

Numbers are normalized before comparing: ``$1,234.50.`` → ``1234.5``, ``-3 apples`` → ``-3``,
``18.00`` → ``18``, ``50%`` → ``50``; thousands separators only count in groups of three
(``1,000`` is one number, ``1,2`` is two). Comparison is exact on the decimal value.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: optional minus (not a hyphen glued to a preceding word/digit, so "16-3" is 16 and 3),
# optional "$", thousands-grouped or plain integer part, optional fraction. A trailing "." is not a fraction.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-−])?(?:\$\s?)?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?(?![\d])"
)
_ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*[:：]|^\s*answer\s*[:：])",
                        re.IGNORECASE | re.MULTILINE)
_HASHES = re.compile(r"####")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def normalize_number(text: str) -> str | None:
    """First number in ``text`` as a canonical decimal string (no commas, no trailing zeros), or None."""
    m = _NUMBER.search(text)
    return None if m is None else _canonical(m)


def _canonical(m: re.Match[str]) -> str | None:
    digits = m.group("int").replace(",", "")
    if m.group("frac"):
        digits += "." + m.group("frac")
    try:
        value = Decimal(digits)
    except InvalidOperation:  # pragma: no cover - the regex only admits digits
        return None
    if m.group("sign"):
        value = -value
    return _format_decimal(value)


def _format_decimal(value: Decimal) -> str:
    """Canonical text of a decimal: ``18.00`` → ``18``, ``0.50`` → ``0.5``, ``-0`` → ``0``."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _last_number(text: str) -> str | None:
    matches = list(_NUMBER.finditer(text))
    return None if not matches else _canonical(matches[-1])


def extract_answer(text: str) -> str | None:
    """The model's final numeric answer in ``text`` (see module docstring for the order), or None."""
    cues = list(_ANSWER_IS.finditer(text))
    if cues:
        tail = text[cues[-1].end():]
        found = normalize_number(tail.split("\n\n")[0])
        if found is not None:
            return found
    hashes = list(_HASHES.finditer(text))
    if hashes:
        found = normalize_number(text[hashes[-1].end():])
        if found is not None:
            return found
    boxed = _BOXED.findall(text)
    if boxed:
        found = normalize_number(boxed[-1])
        if found is not None:
            return found
    return _last_number(text)


def gold_answer(solution: str) -> str:
    """The reference answer of a GSM8K row: the number after ``####`` in its ``answer`` field."""
    if "####" not in solution:
        raise ValueError("GSM8K answer field has no '####' marker")
    found = normalize_number(solution.rsplit("####", 1)[1])
    if found is None:
        raise ValueError(f"no number after '####' in {solution[-80:]!r}")
    return found


def answers_match(predicted: str | None, gold: str) -> bool:
    """True when both are numbers with the same decimal value (``"18"`` == ``"18.0"``)."""
    if predicted is None:
        return False
    try:
        return Decimal(predicted) == Decimal(gold)
    except InvalidOperation:
        return False
