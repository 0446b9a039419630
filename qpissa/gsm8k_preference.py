"""A preference set built from GSM8K rows (for ``--objective dpo|simpo``): the correct solution vs the same solution
with a wrong final answer.

For row i: ``prompt`` = qpissa's gsm8k template (the Alpaca prompt of the PiSSA recipe, what ``--template gsm8k``
and ``qpissa eval`` use), ``chosen`` = " " + the reference solution as that template renders it (calculator
annotations removed, ending "The answer is: X"), ``rejected`` = the same text ending "The answer is: Y", Y = X + d
with d = 1 + (i mod 9) (an integer X; otherwise X with a digit appended). The two completions share every token
up to the final number, so the pair isolates one thing: does the policy put the answer its own reasoning computed
above a near miss. A pure function of the rows (no randomness):
``python -m qpissa.gsm8k_preference GSM8K.jsonl OUT.jsonl`` wrote ``tests/fixtures/gsm8k-dpo``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from qpissa.data import GSM8K_PROMPT, gsm8k_response


def wrong_answer(final: str, i: int) -> str:
    """A deterministic near miss of ``final``: X + (1 + i mod 9) for an integer, else X with a 1 appended."""
    try:
        return str(int(final) + 1 + i % 9)
    except ValueError:
        return final + "1"


def build_preference(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One {prompt, chosen, rejected, source} row per GSM8K row with a final answer (``#### X``)."""
    out = []
    for i, row in enumerate(rows):
        chosen = " " + gsm8k_response(str(row["answer"]))
        head, sep, final = chosen.rpartition("The answer is: ")
        if not sep or not final:
            continue
        out.append({"prompt": GSM8K_PROMPT.format(question=row["question"]), "chosen": chosen,
                    "rejected": head + sep + wrong_answer(final, i), "source": i})
    return out


def main(argv: list[str]) -> None:
    src, dest = Path(argv[0]), Path(argv[1])
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(r) + "\n" for r in build_preference(rows)))


if __name__ == "__main__":
    main(sys.argv[1:])
