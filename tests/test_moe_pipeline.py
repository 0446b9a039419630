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


def _routed_grams(src: Path, seqs: list[torch.Tensor], layer: int) -> dict[int, tuple[int, torch.Tensor, torch.Tensor]]:
    """Independent per-expert statistics of one layer: the whole model in fp32 (no block streaming), the router's
    top-k read from ``mlp.gate``'s output, the hidden states from ``mlp``'s input, gate/up/down from the per-expert
    checkpoint tensors and an explicit SiLU. expert → (tokens, H of gate_up's input, H of down's input)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    mlp = model.model.layers[layer].mlp
    seen: dict[str, list[torch.Tensor]] = {"x": [], "top": []}
    h1 = mlp.register_forward_pre_hook(lambda m, a: seen["x"].append(a[0].reshape(-1, a[0].shape[-1])))
    h2 = mlp.gate.register_forward_hook(lambda m, a, out: seen["top"].append(out[2].reshape(-1, out[2].shape[-1])))
    with torch.no_grad():
        for ids in seqs:
            model(input_ids=ids)
    h1.remove(), h2.remove()
    x, top = torch.cat(seen["x"]).double(), torch.cat(seen["top"])
    weights = load_file(src / "model.safetensors")
    out = {}
    for e in range(4):
        xe = x[(top == e).any(-1)]
        w = lambda n: weights[f"model.layers.{layer}.mlp.experts.{e}.{n}.weight"].double()  # noqa: E731
        inner = torch.nn.functional.silu(xe @ w("gate_proj").T) * (xe @ w("up_proj").T)
        out[e] = (xe.shape[0], xe.T @ xe, inner.T @ inner)
    return out


@pytest.mark.slow
def test_experts_are_calibrated_on_their_routed_tokens(moe_out, gsm8k_dir, tmp_path):
    """Per-expert H from the tokens the router sends each expert, against an independent whole-model computation;
    an expert routed fewer than --calib-expert-tokens falls back to the uncalibrated method and the report counts it."""
    from qpissa.decompose import DecomposeConfig, decompose
    from qpissa.decompose.calibration import BlockwiseCalibrator, load_calibration
    from qpissa.decompose.experts import find_experts
    from qpissa.decompose.targets import find_targets
    from qpissa.formats import scan_checkpoint

    src = moe_out.parent / "src"
    data = load_calibration(src, gsm8k_dir / "train.jsonl", 4, 2, 32)
    tensors = scan_checkpoint(src)
    targets = find_targets(src, tensors, None)[0] + find_experts(tensors, None, src)[0]
    calibrator = BlockwiseCalibrator(src, tensors, targets, data)
    want = _routed_grams(src, data.calib, layer=1)
    for e, (tokens, h_gate_up, h_down) in want.items():
        got_gu, _ = calibrator.stats(f"model.layers.1.mlp.experts.{e}.gate_up_proj")
        got_down, _ = calibrator.stats(f"model.layers.1.mlp.experts.{e}.down_proj")
        assert tokens > 0 and got_gu is not None
        torch.testing.assert_close(got_gu, h_gate_up, rtol=1e-4, atol=1e-4 * h_gate_up.abs().max().item())
        torch.testing.assert_close(got_down, h_down, rtol=1e-4, atol=1e-4 * h_down.abs().max().item())

    counts = sorted(n for n, _, _ in want.values())
    threshold = counts[1] + 1  # the two least-routed experts of layer 1 fall back
    low = sum(n < threshold for n, _, _ in want.values())
    low += sum(n < threshold for n, _, _ in _routed_grams(src, data.calib, layer=0).values())
    rep = decompose(src, tmp_path / "cal", config=DecomposeConfig(
        rank=4, method="cloq", calib_data=str(gsm8k_dir / "train.jsonl"), calib_samples=4, calib_holdout=2,
        calib_seq_len=32, calib_expert_tokens=threshold, progress=False))
    experts = [m for m in rep["modules"] if ".experts." in m["module"]]
    fell = [m for m in experts if m["expert"]["fallback"]]
    assert len(experts) == 16 and len(fell) == 2 * low and rep["experts"]["calibration_fallback"] == 2 * low
    assert rep["experts"]["calibrated"] == 16 - 2 * low and rep["experts"]["method"] == "cloq"
    assert all(m["expert"]["method"] == "loftq" for m in fell)
    calibrated = [m for m in experts if m["expert"]["calibrated"]]
    assert all(m["expert"]["method"] == "cloq" and m.get("output") for m in calibrated)
    # the calibrated expert's output error on its held-out routed tokens is below QLoRA's on the same tokens
    assert all(m["output"]["method"] < m["output"]["qlora"] for m in calibrated)
    text = (tmp_path / "cal" / "report.md").read_text()
    assert f"{16 - 2 * low} calibrated on the tokens routed" in text
    assert f"{2 * low} of them fell back to the uncalibrated loftq" in text


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


@pytest.mark.slow
def test_compare_runs_on_an_moe_model(moe_out, gsm8k_dir, tmp_path):
    """qpissa compare on the tiny Qwen3-MoE: every method's decompose quantizes the experts, each run trains and
    evaluates through qpissa.moe, and the summary has QPiSSA's init error far below QLoRA's."""
    from qpissa.compare import CompareConfig, compare

    study = tmp_path / "study"
    compare(CompareConfig(model=str(moe_out.parent / "src"), data=str(gsm8k_dir / "train.jsonl"),
                          eval_data=str(gsm8k_dir / "test.jsonl"), methods="qlora,qpissa", seeds="0", steps=2,
                          rank=16, batch_size=2, max_length=96, skip_long_prompts=True, eval_every=2, eval_examples=4,
                          output=str(study), progress=False))
    runs = {r["method"]: r for r in json.loads((study / "results.json").read_text())["runs"]}
    assert all(r["status"] == "complete" and r["eval_loss"] is not None for r in runs.values())
    assert runs["qpissa(5)"]["init_reduction_vs_qlora"] > 0.5
    for name in ("qlora", "qpissa-T5"):
        rep = json.loads((study / "decompose" / name / "report.json").read_text())
        assert rep["experts"]["matrices"] == 16 and rep["experts"]["residual"] == "nf4"
        experts = 2 * 4 * (2 * 64 * 64 + 64 * 64)  # layers × experts × (gate_up 128×64 + down 64×64)
        assert rep["coverage"]["groups"]["quantized_4bit"]["params"] >= experts  # (the tiny model is mostly embedding)
