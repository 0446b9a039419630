"""A constructed real-text classification task from GSM8K rows (NOT a GLUE task): does this first solution
step belong to this question?

For question i, the positive pair is (question_i, first line of solution_i) with label 1; the negative is
(question_i, first line of solution_j) with label 0, j the next question (cyclically, from a fixed offset)
whose final answer differs from i's. Calculator annotations ``<<a*b=c>>`` are removed. The result is a pure
function of the rows (no randomness), balanced, and as short as a GLUE sentence pair, so an encoder can learn
it on a CPU: ``python -m qpissa.gsm8k_pairs GSM8K.jsonl OUT.jsonl`` wrote ``tests/fixtures/gsm8k-pairs``.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

OFFSET = 7  # the negative of question i is searched from i + OFFSET: far from its neighbours in the file


def first_step(answer: str) -> str:
    """The first line of a GSM8K solution, calculator annotations removed."""
    reasoning = answer.rpartition("####")[0] or answer
    line = next((ln for ln in reasoning.splitlines() if ln.strip()), reasoning)
    return re.sub(r"<<[^>]*>>", "", line).strip()


def final_answer(answer: str) -> str:
    return answer.rpartition("####")[2].strip().replace(",", "")


def build_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two rows per question: {question, step, label, source}; label 1 = the step is from its own solution."""
    n = len(rows)
    out = []
    for i, row in enumerate(rows):
        out.append({"question": row["question"], "step": first_step(row["answer"]), "label": 1, "source": i})
        for k in range(n - 1):
            j = (i + OFFSET + k) % n
            if j != i and final_answer(rows[j]["answer"]) != final_answer(row["answer"]):
                out.append({"question": row["question"], "step": first_step(rows[j]["answer"]), "label": 0,
                            "source": j})
                break
    return out


def main(argv: list[str]) -> None:
    src, dest = Path(argv[0]), Path(argv[1])
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    dest.write_text("".join(json.dumps(r) + "\n" for r in build_pairs(rows)))


if __name__ == "__main__":
    main(sys.argv[1:])
