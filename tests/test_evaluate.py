"""Evaluation on real SmolLM2-135M-Instruct and the real GSM8K test split.

Independent references: perplexity from a hand-written cross-entropy over the full sequence, batched
(padded) results against one-at-a-time results, and extraction re-run on the stored completions.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from qpissa.use import evaluate as ev
from qpissa.use.answers import answers_match, extract_answer
from qpissa.errors import UserError

SENTENCE = ("The quick brown fox jumps over the lazy dog. It was a sunny day and the children were playing "
            "in the park.")


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return ev.load_model(smollm2_dir)  # plain transformers, fp32


def _manual_nll(model, ids: list[int]) -> torch.Tensor:
    """−log p(x_t | x_<t), t = 1..n−1, from one full-context forward pass and a hand-written cross-entropy."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1].double()  # (n-1, V)
    return torch.logsumexp(logits, -1) - logits[torch.arange(len(ids) - 1), x[0, 1:]]


@pytest.mark.slow
def test_perplexity_of_a_sentence_matches_manual_cross_entropy(smol, tmp_path):
    model, tok = smol
    (tmp_path / "s.txt").write_text(SENTENCE)
    summary, _ = ev.evaluate_perplexity(model, tok, tmp_path / "s.txt", ev.PerplexityConfig())
    ids = tok(SENTENCE)["input_ids"]
    manual = math.exp(float(_manual_nll(model, ids).mean()))
    assert summary["tokens_scored"] == len(ids) - 1
    assert math.isclose(summary["perplexity"], manual, rel_tol=1e-5)
    assert 12 < summary["perplexity"] < 21  # asset README: ≈ 16 (measured here: 16.09)


@pytest.mark.parametrize("n, max_length, stride", [(1, 8, 4), (2, 8, 4), (8, 8, 4), (9, 8, 4), (100, 16, 5),
                                                   (100, 16, 15), (37, 64, 32)])
def test_windows_score_every_token_once(n, max_length, stride):
    scored = []
    for i, (start, first, end) in enumerate(ev.windows(n, max_length, stride)):
        assert 0 <= start < first < end <= n and end - start <= max_length
        if i > 0:
            assert first - start >= max_length - stride or start == 0  # guaranteed context
        scored += range(first, end)
    assert scored == list(range(1, n))


@pytest.mark.slow
def test_sliding_windows_and_padded_batches(smol, gsm8k_dir, tmp_path):
    """Several documents, short windows, padded batches: counts exact, first window = full-context NLL,
    and batch size 2 (right padding) equals batch size 1."""
    model, tok = smol
    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()[:2]]
    docs = [tok(r["answer"])["input_ids"] for r in rows]
    one = ev.token_nll(model, docs, ev.PerplexityConfig(max_length=32, stride=12, batch_size=1))
    padded = ev.token_nll(model, docs, ev.PerplexityConfig(max_length=32, stride=12, batch_size=2))
    for ids, a, b in zip(docs, one, padded):
        assert a.numel() == len(ids) - 1 and len(ids) > 40  # several windows per document
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4)
        full = _manual_nll(model, ids).float()
        torch.testing.assert_close(a[:31], full[:31], rtol=0, atol=2e-4)  # first window has full context
        start, first, end = ev.windows(len(ids), 32, 12)[1]  # a later window: its context only, by hand
        torch.testing.assert_close(a[first - 1:end - 1], _manual_nll(model, ids[start:end]).float()[first - start - 1:],
                                   rtol=0, atol=2e-4)


@pytest.mark.slow
def test_gsm8k_batched_greedy_equals_one_at_a_time(smol, gsm8k_dir, tmp_path):
    model, tok = smol
    cfg = ev.Gsm8kConfig(limit=3, batch_size=3, max_new_tokens=10, prompt_style="chat")
    summary, records = ev.evaluate_gsm8k(model, tok, gsm8k_dir / "test.jsonl", cfg)
    assert summary["n"] == 3 and [r["gold"] for r in records] == ["18", "3", "70000"]
    prompts = [ev.build_prompt(tok, r["question"], "chat") for r in records]
    assert prompts[0].startswith("<|im_start|>system") and prompts[0].endswith("<|im_start|>assistant\n")
    single = ev.generate_greedy(model, tok, prompts, max_new_tokens=10, batch_size=1)
    assert [r["completion"] for r in records] == [text for text, _ in single]  # left padding changes nothing
    for r in records:
        assert r["extracted"] == extract_answer(ev.cut_continuation(r["completion"]))
        assert r["correct"] == answers_match(r["extracted"], r["gold"])
    assert summary["accuracy"] == sum(r["correct"] for r in records) / 3


def test_prompt_styles(smol):
    _, tok = smol
    alpaca = ev.build_prompt(tok, "What is 2+2?", "alpaca")
    assert alpaca.startswith("Below is an instruction") and alpaca.endswith("### Response:")
    from qpissa.data import render

    assert alpaca == render({"question": "What is 2+2?", "answer": "#### 4"}, "gsm8k")[0]  # = training prompt
    assert ev.build_prompt(tok, "Q?", "plain", "Think.") == "Question: Q?\nThink.\nAnswer:"
    assert ev.cut_continuation(" 2+2=4. The answer is: 4\n\nQuestion: next 7") == "2+2=4. The answer is: 4"


def test_resolve_model_layouts(smollm2_decomposed, smollm2_dir, tmp_path):
    run = smollm2_decomposed["qpissa"]
    assert ev.resolve_model(smollm2_dir) == (smollm2_dir, None)
    assert ev.resolve_model(run["out"]) == (run["residual"], run["init"])
    # a decompose adapter belongs on its residual even though its config names the original model
    assert ev.resolve_model(run["init"]) == (run["residual"], run["init"])
    with pytest.raises(UserError, match="not a directory"):
        ev.resolve_model(tmp_path / "missing")
    with pytest.raises(UserError, match="no HF config.json"):
        ev.resolve_model(tmp_path)


@pytest.mark.slow
def test_cli_eval_perplexity_on_a_decompose_run(smollm2_decomposed, gsm8k_dir, tmp_path):
    """NF4 residual + PiSSA adapter, loaded by plain transformers+peft through the CLI."""
    run = smollm2_decomposed["qpissa"]
    cmd = [sys.executable, "-c", "from qpissa.cli import main; main()", "eval", str(run["out"]),
           "--task", "perplexity", "--data", str(gsm8k_dir / "test.jsonl"), "--text-field", "question,answer",
           "--limit", "2", "--max-length", "64", "--stride", "32", "--output", str(tmp_path / "ev")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "ev" / "perplexity_summary.json").read_text())
    assert summary["adapter"] == str(run["init"]) and summary["documents"] == 2
    assert "perplexity →" in proc.stdout and "perplexity →" not in proc.stderr  # results on stdout
    lines = (tmp_path / "ev" / "perplexity_examples.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["tokens_scored"] for x in lines) == summary["tokens_scored"]
    assert 1 < summary["perplexity"] < 100
    bad = subprocess.run(cmd[:5] + ["--task", "mmlu"] + cmd[7:], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:")


def test_loads_the_way_lm_eval_hf_model_loads(smollm2_decomposed):
    """lm-eval's ``--model hf --model_args pretrained=OUT/residual,peft=RUN/adapter`` makes these calls
    (lm_eval/models/huggingface.py, HFLM._create_model/_create_tokenizer); lm-eval itself is not installed here."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = smollm2_decomposed["qpissa"]
    model = AutoModelForCausalLM.from_pretrained(str(run["residual"]), revision="main", dtype="auto",
                                                 trust_remote_code=False, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(model, str(run["trained"]), revision="main")
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(run["residual"]), revision="main", trust_remote_code=False, use_fast=True)
    ids = tok.encode("Question: 2+2?\nAnswer:", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert any("lora_A" in n for n, _ in model.named_parameters())
