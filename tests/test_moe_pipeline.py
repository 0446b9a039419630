"""The rest of the pipeline on an MoE decompose output: train (experts stay 4-bit), resume, eval."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from moe_models import build

from qpissa.data import DataConfig, build_examples, load_records
from qpissa.train import TrainConfig, fit, load_model, train


@pytest.fixture(scope="module")
def moe_out(smollm2_dir: Path, tmp_path_factory) -> Path:
    from qpissa.decompose import decompose

    root = tmp_path_factory.mktemp("moe_train")
    src = build("qwen3_moe", root / "src", tokenizer=smollm2_dir)
    decompose(src, root / "out", rank=4, progress=False)
    return root / "out"


def cfg_for(out: Path, data: Path, run: Path, **kw) -> TrainConfig:
    base = dict(model=str(out), data=str(data), output=str(run), steps=3, batch_size=2, lr=1e-3, warmup_ratio=0.0,
                save_every=1, keep_last=3, seed=0, progress=False, data_cfg=DataConfig(max_length=96, skip_long_prompts=True))
    return TrainConfig(**(base | kw))


@pytest.mark.slow
def test_train_keeps_experts_4bit_and_changes_only_adapters(moe_out, tiny_data, tmp_path):
    from qpissa.moe import resident_bytes

    cfg = cfg_for(moe_out, tiny_data, tmp_path / "run")
    model, tok = load_model(cfg)[:2]
    examples = build_examples(load_records(tiny_data), tok, cfg.data_cfg)
    experts = [m for n, m in model.named_modules() if type(m).__name__ == "Qwen3MoeExperts"]
    assert len(experts) == 2
    dense = sum(2 * (m.gate_up_proj.numel() + m.down_proj.numel()) for m in experts)  # bf16 bytes
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    held_before = sum(resident_bytes(m) for m in experts)
    fit(cfg, model, tok, examples, [])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any(".experts.lora_A" in k or ".experts.base_layer.lora_B" in k for k in changed)  # expert LoRA trained
    held = sum(resident_bytes(m) for m in experts)
    assert held == held_before and held < 0.3 * dense, (held, dense)


@pytest.mark.slow
def test_resume_reproduces_losses(moe_out, tiny_data, tmp_path):
    full = train(cfg_for(moe_out, tiny_data, tmp_path / "full"))
    assert full["steps"] == 3
    cut = cfg_for(moe_out, tiny_data, tmp_path / "cut", stop_after=2)
    train(cut)
    train(replace(cut, stop_after=None, resume=True))
    losses = lambda run: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    want, got = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(got) == 3 and max(abs(a - b) for a, b in zip(want, got)) < 1e-5, (want, got)


@pytest.mark.slow
def test_calibrated_method_falls_back_on_experts_and_says_so(moe_out, gsm8k_dir, tmp_path):
    """cloq with calibration data: attention is calibrated, every expert runs uncalibrated LoftQ (T=1 LoftQ is CLoQ
    with H = I), and the report counts the fallbacks instead of hiding them."""
    from qpissa.decompose import decompose

    rep = decompose(moe_out.parent / "src", tmp_path / "cal", rank=4, method="cloq",
                    calib_data=str(gsm8k_dir / "train.jsonl"), calib_samples=4, calib_holdout=2, calib_seq_len=32,
                    progress=False)
    experts = [m for m in rep["modules"] if ".experts." in m["module"]]
    assert rep["experts"]["calibration_fallback"] == len(experts) == 16 and rep["experts"]["method"] == "loftq"
    assert all(m["expert"]["method"] == "loftq" and m["expert"]["fallback"] for m in experts)
    assert all(m.get("output") for m in rep["modules"] if ".experts." not in m["module"])  # attention: calibrated
    assert "16 of them fell back to the uncalibrated loftq" in (tmp_path / "cal" / "report.md").read_text()


@pytest.mark.slow
def test_eval_perplexity_on_moe_out(moe_out, gsm8k_dir, tmp_path, monkeypatch):
    """qpissa eval on an MoE decompose output: loads through qpissa.moe (experts 4-bit) and writes a finite perplexity."""
    import sys

    from qpissa.cli import main

    monkeypatch.setattr(sys, "argv", ["qpissa", "eval", str(moe_out), "--task", "perplexity", "--data",
                                      str(gsm8k_dir / "test.jsonl"), "--text-field", "question,answer", "--limit", "4",
                                      "-o", str(tmp_path / "ppl")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code in (0, None)
    summary = json.loads((tmp_path / "ppl" / "perplexity_summary.json").read_text())
    ppl = summary.get("perplexity")
    assert ppl is not None and 1 < ppl < float("inf"), summary


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_train_on_every_family_keeps_experts_4bit(family, smollm2_dir, tiny_data, tmp_path):
    """The other two families (Qwen3-MoE above): 2 steps after a default decompose; only adapter tensors change,
    expert LoRA included, and the experts' held bytes stay NF4-sized."""
    from qpissa.decompose import decompose
    from qpissa.moe import resident_bytes

    src = build(family, tmp_path / "src", tokenizer=smollm2_dir)
    decompose(src, tmp_path / "out", rank=4, progress=False)
    cfg = replace(cfg_for(tmp_path / "out", tiny_data, tmp_path / "run"), steps=2)
    model, tok = load_model(cfg)[:2]
    experts = [m for _, m in model.named_modules() if type(m).__name__.endswith("Experts")]
    assert len(experts) == 2, [type(m).__name__ for m in experts]
    held_before = sum(resident_bytes(m) for m in experts)
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as f:  # bf16 bytes of every expert matrix in the source
        dense = sum(2 * f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys()
                    if ".experts." in k)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fit(cfg, model, tok, build_examples(load_records(tiny_data), tok, cfg.data_cfg), [])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any(".experts." in k for k in changed)  # the expert LoRA trained
    assert sum(resident_bytes(m) for m in experts) == held_before < 0.3 * dense, (held_before, dense)
