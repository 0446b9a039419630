"""``qpissa train --objective dpo|simpo``: the losses against their formulas, the pairs' tokens, the reference (the
STARTING policy, not the adapter-disabled residual), resume, --reference adapter, a start from an SFT run, bad input.

Slow tests train SmolLM2's QPiSSA output (``smollm2_decomposed``: 5 modules, r=8) on short arithmetic pairs
(≈20 tokens a sequence) so a step costs well under a second.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qpissa.data import DataConfig
from qpissa.errors import UserError
from qpissa.preference import build_pairs, collate_pairs
from qpissa.train import TrainConfig, TrainingDiverged, train
from qpissa.train.preference import REFERENCE_FILE, preference_loss, sequence_logps

NAMES = ("prompt", "chosen", "rejected")


def arithmetic_pairs(n: int, offset: int = 0) -> list[dict]:
    """Short plain-text pairs: the right sum is preferred to an off-by-one."""
    rows = []
    for i in range(offset, offset + n):
        a, b = 3 + 2 * i, 4 + i
        rows.append({"prompt": f"Question: what is {a} plus {b}?\nAnswer:", "chosen": f" {a} plus {b} is {a + b}.",
                     "rejected": f" {a} plus {b} is {a + b + 1 + i % 3}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pairs")
    return {"train": write_jsonl(root / "train.jsonl", arithmetic_pairs(8)),
            "eval": write_jsonl(root / "eval.jsonl", arithmetic_pairs(4, offset=20))}


def dpo_cfg(model: Path, data: dict[str, Path], run: Path, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data["train"]), eval_data=str(data["eval"]), output=str(run),
                objective="dpo", steps=4, batch_size=2, lr=1e-3, warmup_ratio=0.0, seed=0, progress=False,
                precision="fp32", data_cfg=DataConfig(max_length=64))
    return TrainConfig(**(base | kw))


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- fast: formulas and tokens

def test_losses_match_their_formulas() -> None:
    """sigmoid / ipo / simpo and the rewards, against the formulas written out per pair in plain Python."""
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(5, 2, generator=gen, dtype=torch.float64) * 40
    ref = logps + torch.randn(5, 2, generator=gen, dtype=torch.float64)
    lengths = torch.randint(3, 30, (5, 2), generator=gen)
    beta, gamma = 0.3, 0.7
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for objective, kind in (("dpo", "sigmoid"), ("dpo", "ipo"), ("simpo", "sigmoid")):
        losses, stats = preference_loss(logps, ref, lengths, objective, beta, kind, gamma)
        for i in range(5):
            (pc, pr), (rc, rr), (nc, nr) = logps[i].tolist(), ref[i].tolist(), lengths[i].tolist()
            if objective == "simpo":
                want = -math.log(sig(beta * (pc / nc - pr / nr) - gamma))
                reward_c, reward_r = beta * pc / nc, beta * pr / nr
            elif kind == "ipo":
                want = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
                reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
            else:
                want = -math.log(sig(beta * ((pc - rc) - (pr - rr))))
                reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
            assert float(losses[i]) == pytest.approx(want, rel=1e-9), (objective, kind, i)
            assert float(stats["rewards_chosen"][i]) == pytest.approx(reward_c, rel=1e-9)
            assert float(stats["rewards_margin"][i]) == pytest.approx(reward_c - reward_r, rel=1e-9, abs=1e-12)
            assert float(stats["rewards_accuracy"][i]) == float(reward_c > reward_r)
    same, stats = preference_loss(logps, logps.clone(), lengths, "dpo", beta)
    assert torch.allclose(same, torch.full_like(same, math.log(2))) and not stats["rewards_accuracy"].any()


def test_sequence_logps_equal_a_per_sequence_forward(smollm2_dir: Path) -> None:
    """Σ log p over the completion of padded (B, 2, T) rows = the same sum from each sequence alone, unpadded."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    pairs = build_pairs(arithmetic_pairs(3), tok, NAMES, max_length=64)
    batch = collate_pairs(pairs, tok.eos_token_id)
    assert batch["input_ids"].shape[:2] == (3, 2)
    with torch.no_grad():
        got, lengths, _ = sequence_logps(model, batch)
        for i, p in enumerate(pairs):
            for j, completion in enumerate((p.chosen, p.rejected)):
                ids = torch.tensor([p.prompt + completion])
                logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
                want = sum(float(logp[len(p.prompt) + k - 1, t]) for k, t in enumerate(completion))
                assert float(got[i, j]) == pytest.approx(want, abs=1e-4)
                assert int(lengths[i, j]) == len(completion)


def test_pairs_follow_trl_tokenization_and_truncation(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    row = arithmetic_pairs(1)[0]
    (pair,) = build_pairs([row], tok, NAMES, max_length=64)
    full = tok(row["prompt"] + row["chosen"])["input_ids"] + [tok.eos_token_id]  # TRL: tokenize prompt+completion
    assert pair.prompt + pair.chosen == full and tok.decode(pair.chosen).endswith(tok.eos_token)
    assert pair.prompt == tok(row["prompt"])["input_ids"]
    (cut,) = build_pairs([row], tok, NAMES, max_length=len(pair.prompt) + 3, max_prompt_length=4)
    assert cut.prompt == pair.prompt[-4:]  # the prompt keeps its end first ...
    assert cut.chosen == pair.chosen[:len(pair.prompt) + 3 - 4]  # ... then prompt + completion its start
    short = row | {"prompt": "Hi"}  # row 0 fits, row 1's prompt does not
    with pytest.raises(UserError, match=r"^pairs\.jsonl row 1: field 'prompt' is \d+ tokens but --max-length is 5;"):
        build_pairs([short, row], tok, NAMES, max_length=5, source="pairs.jsonl")
    assert len(build_pairs([row, row], tok, NAMES, max_length=5, skip_long_prompts=True,
                           max_prompt_length=2)) == 2  # the kept prompt end fits
    chat = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}]}
    (turns,) = build_pairs([chat], tok, NAMES, max_length=64)
    rendered = tok.apply_chat_template(chat["prompt"] + chat["chosen"], tokenize=False)
    assert tok.decode(turns.prompt + turns.chosen) == rendered
    assert tok.decode(turns.chosen).startswith("4<|im_end|>")  # the end-of-turn token is part of the completion


@pytest.mark.parametrize("row, field, what", [
    ({"prompt": "Q", "chosen": " a"}, "rejected", "missing"),
    ({"prompt": "Q", "chosen": "  ", "rejected": " b"}, "chosen", "empty completion"),
    ({"prompt": "Q", "chosen": " a", "rejected": " a"}, "chosen", "identical"),
    ({"prompt": "Q", "chosen": " a", "rejected": [{"role": "assistant", "content": "b"}]}, "prompt", "all be text"),
])
def test_bad_rows_are_one_line_before_weights(row, field, what, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", [*arithmetic_pairs(2), row])
    cfg = dpo_cfg(tmp_path / "no-model", {"train": data, "eval": data}, tmp_path / "run")
    with pytest.raises(UserError) as err:
        train(cfg)  # the model folder does not exist: the data is checked first
    msg = str(err.value)
    assert "\n" not in msg and f"{data} row 2" in msg and repr(field) in msg and what in msg, msg
    assert not (tmp_path / "run").exists()


def test_options_are_checked() -> None:
    with pytest.raises(UserError, match="--beta"):
        TrainConfig(model="m", data="d", output="o", objective="dpo", beta=0.0)
    with pytest.raises(UserError, match="--task classification"):
        TrainConfig(model="m", data="d", output="o", objective="dpo", task="classification")
    assert TrainConfig(model="m", data="d", output="o", objective="simpo").beta == 2.0
    assert TrainConfig(model="m", data="d", output="o", objective="dpo").beta == 0.1


# ----------------------------------------------------------------------------- slow: training on real weights

@pytest.fixture(scope="module")
def dpo_run(smollm2_decomposed, pairs_data, tmp_path_factory) -> dict:
    out = smollm2_decomposed["qpissa"]["out"]
    root = tmp_path_factory.mktemp("dpo")
    cfg = dpo_cfg(out, pairs_data, root / "full", eval_at_start=True, eval_every=2, save_every=2, keep_last=3,
                  report_to="tensorboard")
    return {"out": out, "root": root, "cfg": cfg, "summary": train(cfg)}


@pytest.mark.slow
def test_step0_is_log2_for_the_starting_policy_not_the_disabled_adapter(dpo_run, pairs_data, load_fp32) -> None:
    run, out = Path(dpo_run["cfg"].output), dpo_run["out"]
    rows = rows_of(run)
    assert rows[0]["step"] == 0 and rows[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["eval_rewards_chosen"] == pytest.approx(0, abs=1e-6)
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the first step's pairs, before any update
    assert rows[-1]["eval_rewards_margin"] > rows[0]["eval_rewards_margin"]  # training moved the policy its way
    for key in ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"):
        assert all(key in r for r in rows[1:]) and f"eval_{key}" in rows[-1]
    assert (run / "loss.png").stat().st_size > 0 and list((run / "tensorboard").iterdir())

    # independent reference: plain transformers + peft, one sequence at a time, residual + the STARTING adapter
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "residual")
    records = [json.loads(x) for x in Path(pairs_data["eval"]).read_text().splitlines()]
    pairs = build_pairs(records, tok, NAMES, max_length=64)
    stored = load_file(str(run / REFERENCE_FILE))["eval"]
    model = load_fp32(out / "residual", out / "adapter")
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        start, lengths, _ = sequence_logps(model, batch)
        assert torch.allclose(stored.float(), start, atol=1e-3), (stored, start)
        with model.disable_adapter():  # the usual reference of a fresh LoRA: here the residual alone
            disabled, _, _ = sequence_logps(model, batch)
    loss, stats = preference_loss(start, disabled, lengths, "dpo", 0.1)
    assert abs(float(loss.mean()) - math.log(2)) > 0.05 and float(stats["rewards_chosen"].abs().min()) > 0.5, (
        loss, stats)


@pytest.mark.slow
def test_resume_reuses_the_reference_and_repeats_the_losses(dpo_run, pairs_data) -> None:
    cut = replace(dpo_run["cfg"], output=str(dpo_run["root"] / "cut"), stop_after=2, report_to="none")
    train(cut)
    ref = Path(cut.output) / REFERENCE_FILE
    stamp = ref.stat().st_mtime_ns
    summary = train(replace(cut, stop_after=None, resume=True))
    assert ref.stat().st_mtime_ns == stamp  # read back, not recomputed from the resumed (trained) adapter
    want, got = rows_of(Path(dpo_run["cfg"].output)), rows_of(Path(cut.output))
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in ("loss", "eval_loss", "rewards_margin", "eval_rewards_accuracy"):
            assert (key in a) == (key in b) and abs(a.get(key, 0) - b.get(key, 0)) < 1e-5, (key, a, b)
    assert summary["eval_rewards_accuracy"] == dpo_run["summary"]["eval_rewards_accuracy"]


@pytest.mark.slow
def test_reference_adapter_equals_precomputed(dpo_run) -> None:
    cfg = replace(dpo_run["cfg"], output=str(dpo_run["root"] / "adapter-ref"), reference="adapter", steps=2,
                  eval_every=0, save_every=0, report_to="none")
    train(cfg)
    got, want = rows_of(Path(cfg.output)), rows_of(Path(dpo_run["cfg"].output))
    assert not (Path(cfg.output) / REFERENCE_FILE).exists()
    assert got[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # the same schedule only for step 1 (total steps differ): the first update's loss and rewards agree
    assert got[1]["loss"] == pytest.approx(want[1]["loss"], abs=1e-5)
    assert got[2]["rewards_margin"] != 0.0


@pytest.mark.slow
def test_dpo_from_an_sft_run_and_simpo(dpo_run, pairs_data, tiny_data, load_fp32) -> None:
    """The SFT run's RUN/adapter is the start (and the reference); SimPO's step-0 loss is its formula."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out, root = dpo_run["out"], dpo_run["root"]
    sft = root / "sft"
    train(TrainConfig(model=str(out), data=str(tiny_data), output=str(sft), steps=2, lr=5e-3, batch_size=2,
                      warmup_ratio=0.0, progress=False, data_cfg=DataConfig(max_length=128, skip_long_prompts=True)))
    cfg = replace(dpo_run["cfg"], model=str(sft), output=str(root / "after-sft"), steps=1, eval_every=0,
                  save_every=0, report_to="none")
    train(cfg)
    tok = AutoTokenizer.from_pretrained(out / "residual")
    records = [json.loads(x) for x in Path(pairs_data["eval"]).read_text().splitlines()]
    batch = collate_pairs(build_pairs(records, tok, NAMES, max_length=64), tok.pad_token_id)
    stored = load_file(str(Path(cfg.output) / REFERENCE_FILE))["eval"].float()
    with torch.no_grad():
        from_sft, lengths, _ = sequence_logps(load_fp32(out / "residual", sft / "adapter"), batch)
        from_out, _, _ = sequence_logps(load_fp32(out / "residual", out / "adapter"), batch)
    assert torch.allclose(stored, from_sft, atol=1e-3) and not torch.allclose(stored, from_out, atol=1e-2)

    simpo = replace(dpo_run["cfg"], objective="simpo", beta=2.0, output=str(root / "simpo"), steps=2, eval_every=0,
                    save_every=0, report_to="none")
    summary = train(simpo)
    first = rows_of(Path(simpo.output))[0]
    want = preference_loss(from_out, None, lengths, "simpo", 2.0, simpo_gamma=simpo.simpo_gamma)[0].mean()
    assert first["eval_loss"] == pytest.approx(float(want), abs=1e-4)
    assert not (Path(simpo.output) / REFERENCE_FILE).exists() and summary["task"] == "simpo"


@pytest.mark.slow
def test_nan_stops_with_the_last_good_checkpoint(dpo_run) -> None:
    # the pair losses are numerically stable (logsigmoid, logsumexp): only non-finite weights make them NaN
    cfg = replace(dpo_run["cfg"], output=str(dpo_run["root"] / "nan"), lr=math.inf, schedule="constant", save_every=1,
                  max_grad_norm=0.0, eval_at_start=False, eval_every=0, report_to="none")
    with pytest.raises(TrainingDiverged, match=r"became (nan|inf) at step \d; .*last good checkpoint"):
        train(cfg)
    assert not (Path(cfg.output) / "adapter").exists()
