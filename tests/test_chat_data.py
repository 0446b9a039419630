"""Chat data (``--template chat``): the assistant-only mask against a hand-built ChatML mask and TRL's
``assistant_only_loss``, ShareGPT input, truncation/packing, errors, a 10-step run and eval's prompt.

Real SmolLM2-135M-Instruct tokenizer (ChatML template) and the chat fixture derived from GSM8K
(``tests/fixtures/chat``, see its SOURCE.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpissa.chat import assistant_spans, messages_of
from qpissa.data import (IGNORE_INDEX, DataConfig, build_examples, chat_example, load_records, pack,
                         resolve_template)
from qpissa.errors import UserError

CHAT = Path(__file__).resolve().parent / "fixtures" / "chat"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # the template's default


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    return _load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return load_records(CHAT / "train.jsonl")


def hand_built(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """ChatML written out by hand, piece by piece: headers and user/system turns −100, assistant content and
    its ``<|im_end|>`` trained, the ``\\n`` after it −100. Pieces end where BPE cannot merge (special tokens,
    newlines), which the caller checks by comparing with the whole-text tokenization."""
    pieces = [] if messages[0]["role"] == "system" else [(f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n", False)]
    for m in messages:
        if m["role"] == "assistant":
            pieces += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    ids, labels = [], []
    for text, trained in pieces:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [IGNORE_INDEX] * len(part)
    return ids, labels


def test_mask_equals_hand_built_chatml_mask(tokenizer, records) -> None:
    """Every fixture conversation (single-turn, system message, two questions): exact token-level equality."""
    examples = build_examples(records, tokenizer, DataConfig(template="chat", max_length=4096))
    kinds = set()
    for rec, ex in zip(records, examples):
        messages = rec["messages"]
        ids, labels = hand_built(tokenizer, messages)
        assert ex.input_ids == ids  # the pieces tokenize like the whole rendering: the comparison is meaningful
        assert ex.labels == labels
        n_assistant = sum(m["role"] == "assistant" for m in messages)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert sum(t == im_end for t in ex.labels) == n_assistant  # every turn learns to stop
        assert tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "".join(
            m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        kinds.add((messages[0]["role"] == "system", n_assistant))
    assert kinds == {(False, 1), (True, 1), (False, 2), (True, 2)}  # the fixture covers every shape


def test_mask_agrees_with_trl_assistant_only_loss(smollm2_dir: Path, records, tmp_path: Path) -> None:
    """TRL's SFTTrainer(assistant_only_loss=True) on a ChatML template it knows (Qwen2.5's, which TRL swaps for its
    ``{% generation %}`` training copy) labels the same tokens as we do, plus exactly two ``\\n`` per assistant turn
    that TRL's template puts inside the generation block: the header's and the one after ``<|im_end|>``."""
    pytest.importorskip("trl")
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import qwen2_5_chat_template

    tok = _load_tokenizer(smollm2_dir)
    tok.chat_template = qwen2_5_chat_template
    chosen = [records[0], records[8], records[12], records[17]]  # plain, system, system + 2 turns, 2 turns
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(smollm2_dir), processing_class=tok,
                         train_dataset=datasets.Dataset.from_list([{"messages": r["messages"]} for r in chosen]),
                         args=SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=None,
                                        report_to=[], use_cpu=True, bf16=False))
    ours = build_examples(chosen, tok, DataConfig(template="chat", max_length=4096))
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for ex, row in zip(ours, trainer.train_dataset):
        assert ex.input_ids == row["input_ids"]
        trained = [i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX]
        starts = [i for i in trained if i - 1 not in trained]  # first token of each assistant turn
        ends = [i for i in trained if i + 1 not in trained]  # its <|im_end|>
        extra = {i - 1 for i in starts} | {i + 1 for i in ends}
        assert [i for i, (a, b) in enumerate(zip(ex.labels, row["labels"])) if a != b] == sorted(extra)
        assert all([ex.input_ids[i]] == newline and row["labels"][i] == ex.input_ids[i] for i in extra)
        assert len(starts) == sum(m["role"] == "assistant" for m in row["messages"])


def test_sharegpt_rows_give_the_same_examples(tokenizer, records) -> None:
    cfg = DataConfig(template="chat", max_length=4096)
    sharegpt = load_records(CHAT / "sharegpt.jsonl")
    assert build_examples(sharegpt, tokenizer, cfg) == build_examples(records, tokenizer, cfg)
    mixed = {"conversations": [{"from": "human", "value": "Hi", "role": None, "content": None},
                               {"from": "gpt", "value": "Hello"}]}  # datasets fills absent keys with None
    assert messages_of(mixed, "row") == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_template_is_detected_only_when_left_at_its_default(records, gsm8k_dir: Path) -> None:
    cfg, note = resolve_template(DataConfig(), records, source="chat.jsonl")
    assert cfg.template == "chat" and note.startswith("chat.jsonl: a 'messages' column") and "\n" not in note
    assert resolve_template(DataConfig(template="{messages}"), records) == (DataConfig(template="{messages}"), "")
    gsm8k = load_records(gsm8k_dir / "train.jsonl")[:2]
    assert resolve_template(DataConfig(), gsm8k) == (DataConfig(), "")


def test_truncation_and_packing_keep_the_mask(tokenizer, records) -> None:
    full = build_examples(records, tokenizer, DataConfig(template="chat", max_length=4096))
    cut = build_examples(records, tokenizer, DataConfig(template="chat", max_length=128))
    for a, b in zip(full, cut):
        assert b.input_ids == a.input_ids[:128] and b.labels == a.labels[:128]
    assert any(len(a.input_ids) > 128 for a in full)  # some conversations were cut (their 2nd turn)
    packed = build_examples(records, tokenizer, DataConfig(template="chat", max_length=128, packing=True))
    assert packed == pack(cut, 128)  # each conversation truncated, then packed, masks travelling with tokens
    # a conversation whose first assistant token lies beyond max_length: one line, or skipped
    ex, first = chat_example(tokenizer, records[12], 16, "row 12")
    assert ex is None and first > 16
    with pytest.raises(UserError, match=rf"data row 0: the prompt is {first} tokens but --max-length is 16"):
        build_examples(records[12:13], tokenizer, DataConfig(template="chat", max_length=16))
    kept = build_examples(records[12:13] + records[:1], tokenizer,  # first assistant tokens at 79 and 60
                          DataConfig(template="chat", max_length=70, skip_long_prompts=True))
    assert kept == build_examples(records[:1], tokenizer, DataConfig(template="chat", max_length=70))
    assert kept[0].input_ids == full[0].input_ids[:70] and kept[0].labels[60:] == full[0].input_ids[60:70]


def test_user_errors_are_one_line(smollm2_dir: Path, records) -> None:
    tok = _load_tokenizer(smollm2_dir)
    cfg = DataConfig(template="chat")
    with pytest.raises(UserError, match="column 'messages' .* is missing"):
        build_examples([{"question": "q", "answer": "a"}], tok, cfg)
    with pytest.raises(UserError, match="no assistant turn"):
        build_examples([{"messages": [{"role": "user", "content": "Hi"}]}], tok, cfg)
    with pytest.raises(UserError, match="starts with an assistant turn"):
        build_examples([{"messages": [{"role": "assistant", "content": "Hi"}]}], tok, cfg)
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}[last] {% endif %}{{ m['role'] }}: "
                         "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(UserError, match="not prefix-stable .* first 2 messages"):
        assistant_spans(tok, records[0]["messages"], "row 0")
    tok.chat_template = None
    with pytest.raises(UserError, match="--template chat: the model's tokenizer has no chat template") as err:
        build_examples(records, tok, cfg)
    assert "\n" not in str(err.value)


def test_eval_prompt_is_the_training_prefix(tokenizer, records) -> None:
    """``qpissa eval --prompt-style chat`` gives the model exactly the tokens training put before an answer."""
    from qpissa.use.evaluate import build_prompt

    rec = records[0]
    ex = build_examples([rec], tokenizer, DataConfig(template="chat"))[0]
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    prompt = build_prompt(tokenizer, rec["messages"][0]["content"], "chat")
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == ex.input_ids[:first]


def test_run_template_picks_the_prompt_style(tmp_path: Path) -> None:
    from qpissa.use.evaluate import resolve_prompt_style

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    base = tmp_path / "out" / "residual"
    assert resolve_prompt_style("auto", base, run / "adapter") == ("alpaca", "")  # no config: as before
    (run / "config.json").write_text(json.dumps({"data_cfg": {"template": "chat"}}))
    assert resolve_prompt_style("auto", base, run / "adapter")[0] == "chat"
    assert resolve_prompt_style("plain", base, run / "adapter") == ("plain", "")  # an explicit choice wins
    (run / "config.json").write_text(json.dumps({"data_cfg": {"template": "Q: {q}\nA: {a}"}}))
    style, note = resolve_prompt_style("auto", base, run / "adapter")
    assert style == "alpaca" and "no eval counterpart" in note


@pytest.mark.slow
def test_chat_run_learns_and_eval_prompts_with_its_template(smollm2_decomposed, records, gsm8k_dir: Path,
                                                            tmp_path: Path) -> None:
    """`qpissa train` on chat data (template detected), 10 steps of one conversation each over two conversations
    (single-turn; system + two turns): steps 1-2 and 9-10 each see both once, and the loss falls between them.
    RUN/config.json keeps the template, and `qpissa eval --task gsm8k` then prompts with the chat template."""
    from typer.testing import CliRunner

    from qpissa.cli.entry import app

    out, data, run = smollm2_decomposed["qpissa"]["out"], tmp_path / "two.jsonl", tmp_path / "run"
    data.write_text("".join(json.dumps(records[i]) + "\n" for i in (0, 14)))
    res = CliRunner().invoke(app, ["train", str(out), "--data", str(data), "--steps", "10", "--batch-size", "1",
                                   "--lr", "1e-3", "--warmup-ratio", "0", "--max-length", "256", "--device", "cpu",
                                   "--no-progress", "--save-every", "0", "-o", str(run)])
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert len([ln for ln in res.stderr.splitlines() if "using --template chat" in ln]) == 1, res.stderr
    assert json.loads((run / "config.json").read_text())["data_cfg"]["template"] == "chat"
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 10 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses  # measured: 1.22 → 1.04

    res = CliRunner().invoke(app, ["eval", str(run), "--task", "gsm8k", "--data", str(gsm8k_dir / "test.jsonl"),
                                   "--limit", "1", "--batch-size", "1", "--max-new-tokens", "4", "--device", "cpu",
                                   "-o", str(tmp_path / "eval")])
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "prompt style: chat" in res.stderr
    assert json.loads((tmp_path / "eval" / "gsm8k_summary.json").read_text())["prompt_style"] == "chat"
