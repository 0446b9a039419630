"""Data pipeline: templates, label masking, errors, deterministic order (real SmolLM2 tokenizer, GSM8K rows)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpissa.data import (GSM8K_PROMPT, IGNORE_INDEX, DataConfig, DataPosition, batches, build_examples, collate,
                         epoch_order, gsm8k_response, load_records, pack, render)
from qpissa.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def rows(gsm8k_dir: Path) -> list[dict]:
    with open(gsm8k_dir / "train.jsonl") as fh:
        return [json.loads(next(fh)) for _ in range(12)]


def test_gsm8k_response_format() -> None:
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nSo 48+24 = <<48+24=72>>72.\n#### 1,072"
    assert gsm8k_response(answer) == "Natalia sold 48/2 = 24 clips in May.\nSo 48+24 = 72.\nThe answer is: 1072"


def test_masking_covers_exactly_the_prompt(tokenizer, rows) -> None:
    examples = build_examples(rows, tokenizer, DataConfig(template="gsm8k", max_length=1024))
    for rec, ex in zip(rows, examples):
        prompt, response = render(rec, "gsm8k")
        n_prompt = len(tokenizer(prompt)["input_ids"])
        assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
        assert ex.input_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ex.input_ids[:n_prompt]) == prompt
        assert tokenizer.decode(ex.labels[n_prompt:-1]) == response
        assert "The answer is: " + rec["answer"].split("####")[-1].strip().replace(",", "") in response


@pytest.mark.slow
def test_prompt_tokens_are_out_of_the_loss(smollm2_dir, tokenizer, rows) -> None:
    """HF's causal-LM loss with our labels == mean CE over response positions computed by hand."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ex = build_examples(rows[:2], tokenizer, DataConfig(max_length=160, skip_long_prompts=True))
    batch = collate(ex, tokenizer.pad_token_id or 0)
    with torch.no_grad():
        out = model(**batch)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    terms = []
    for b, e in enumerate(ex):
        n_prompt = len(tokenizer(render(rows[b], "gsm8k")[0])["input_ids"])
        for t in range(n_prompt, len(e.input_ids)):  # predict token t from position t-1
            terms.append(-float(logp[b, t - 1, e.input_ids[t]]))
    assert float(out.loss) == pytest.approx(sum(terms) / len(terms), rel=1e-4)


def test_alpaca_and_custom_templates() -> None:
    p, r = render({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, "alpaca")
    assert p.endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:") and r == " 5"
    p, r = render({"instruction": "Add.", "input": "2, 3", "output": "5"}, "alpaca")
    assert "### Input:\n2, 3" in p
    p, r = render({"q": "2+3?", "a": "5"}, "Q: {q}\nA: {a}")
    assert (p, r) == ("Q: 2+3?\nA: ", "5")
    assert GSM8K_PROMPT.format(question="x").endswith("### Response:")


def test_missing_column_names_the_column(rows) -> None:
    with pytest.raises(UserError, match="'instruction' is missing"):
        render(rows[0], "alpaca", where="train.jsonl row 0")
    with pytest.raises(UserError, match="'text' is missing"):
        render(rows[0], "{question} {text}")
    with pytest.raises(UserError, match="must be 'gsm8k', 'alpaca' or a format string"):
        render(rows[0], "no fields here")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unknown extension"):
        load_records(tmp_path / "x.txt")


def test_local_formats_load_the_same_rows(tmp_path: Path, rows) -> None:
    import datasets

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in ("d.parquet", "d.csv", "saved"):
        assert load_records(tmp_path / path) == rows


def test_max_length_smaller_than_prompt(tokenizer, rows) -> None:
    with pytest.raises(UserError, match=r"row 0: the prompt is \d+ tokens but --max-length is 16"):
        build_examples(rows, tokenizer, DataConfig(max_length=16))
    kept = build_examples(rows, tokenizer, DataConfig(max_length=90, skip_long_prompts=True))
    assert 0 < len(kept) < len(rows) and all(len(e.input_ids) <= 90 for e in kept)


def test_packing_keeps_masks(tokenizer, rows) -> None:
    plain = build_examples(rows, tokenizer, DataConfig(max_length=1024))
    packed = pack(plain, 64)
    assert all(len(e.input_ids) == 64 for e in packed[:-1])
    flat_ids = [t for e in plain for t in e.input_ids]
    flat_labels = [t for e in plain for t in e.labels]
    chunks = {(tuple(flat_ids[i:i + 64]), tuple(flat_labels[i:i + 64])) for i in range(0, len(flat_ids), 64)}
    assert all((tuple(e.input_ids), tuple(e.labels)) in chunks for e in packed)  # masks travel with tokens
    dropped = chunks - {(tuple(e.input_ids), tuple(e.labels)) for e in packed}
    assert all(set(labels) == {IGNORE_INDEX} for _, labels in dropped)  # only rows with nothing to learn go
    assert sum(t == IGNORE_INDEX for e in packed for t in e.labels) > 0


def test_collate_pads_right() -> None:
    from qpissa.data import Example

    b = collate([Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [8])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_order_is_reproducible_and_resumable(tokenizer, rows) -> None:
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1) != epoch_order(10, 0, 2)
    ex = build_examples(rows, tokenizer, DataConfig(max_length=1024))
    stream = batches(ex, 5, seed=3, pad_id=0, pos=DataPosition())
    first = [next(stream) for _ in range(5)]  # crosses the epoch border (12 // 5 = 2 batches per epoch)
    resumed = batches(ex, 5, seed=3, pad_id=0, pos=first[1][1])
    for (want, _), (got, _) in zip(first[2:], resumed):
        assert want["input_ids"].equal(got["input_ids"])
    assert first[2][1] == DataPosition(1, 5)
