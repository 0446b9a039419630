"""Held-out perplexity of GGUF exports in llama.cpp (llama-cpp-python), as ``qpissa eval --task perplexity`` counts it.

Each document is tokenized by the model's Hugging Face tokenizer (the same ids for every variant), run through
llama.cpp in one pass, and scored on positions 1..n−1; PPL = exp(Σ NLL / Σ tokens). A variant is
``NAME=MODEL.gguf`` or ``NAME=MODEL.gguf+LORA.gguf`` (the QPiSSA split: residual + GGUF LoRA via ``--lora``).

    python benchmarks/gguf_perplexity.py --tokenizer RUN_OR_MODEL_DIR --data tests/fixtures/gsm8k/test.jsonl \\
        --text-field question,answer merged-q4=m.gguf split=s.gguf+s-lora.gguf

Prints one JSON line per variant: perplexity, tokens, the bytes of the file(s), seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


def nll_sum(llm, ids: list[int]) -> tuple[float, int]:
    """Σ −log p(x_t | x_<t) over t = 1..n−1, and n−1."""
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)  # (T, V)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-sum(logp[t - 1, ids[t]] for t in range(1, len(ids)))), len(ids) - 1


def main() -> None:
    import llama_cpp
    from transformers import AutoTokenizer

    from qpissa.use.evaluate import read_texts, resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=MODEL.gguf[+LORA.gguf]")
    ap.add_argument("--tokenizer", required=True, help="model dir, training run or decompose output")
    ap.add_argument("--data", required=True)
    ap.add_argument("--text-field", default="question,answer")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    base, _ = resolve_model(args.tokenizer)
    tok = AutoTokenizer.from_pretrained(base)
    docs = [tok(t, add_special_tokens=True)["input_ids"] for t in read_texts(args.data, args.text_field, args.limit)]
    n_ctx = max(len(d) for d in docs) + 8
    for spec in args.variants:
        name, files = spec.split("=", 1)
        model, *lora = files.split("+")
        kwargs = {"lora_path": lora[0]} if lora else {}
        llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                              n_threads=args.threads, **kwargs)
        t0 = time.perf_counter()
        total, count = 0.0, 0
        for ids in docs:
            s, c = nll_sum(llm, ids)
            total, count = total + s, count + c
        print(json.dumps({"variant": name, "perplexity": round(math.exp(total / count), 4), "tokens": count,
                          "documents": len(docs), "bytes": sum(Path(f).stat().st_size for f in [model, *lora]),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        del llm


if __name__ == "__main__":
    main()
