"""The documented TRL path: examples/trl_sft.py trains a ``qpissa decompose`` output with TRL's SFTTrainer.

The test runs the example's own ``main`` (tiny settings) on SmolLM2's QPiSSA output, with evaluations between the
training steps: the loss falls, only the adapter factors change (the stored NF4 bytes and every other parameter
are identical afterwards), no Linear4bit was repacked by an evaluation, and the saved adapter is fp32 with
OUT/adapter's tensor names (what ``qpissa convert``/``merge`` read).
"""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_sft.py"


def load_example():
    spec = importlib.util.spec_from_file_location("trl_sft_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_needs_no_qpissa_and_formats_like_qpissa(gsm8k_dir: Path) -> None:
    """The example stands alone (TRL users need not import qpissa) and renders GSM8K as qpissa's gsm8k template."""
    from qpissa.data import render

    imported = {a.name for n in ast.walk(ast.parse(EXAMPLE.read_text())) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(ast.parse(EXAMPLE.read_text())) if isinstance(n, ast.ImportFrom)}
    assert not [m for m in imported if m and m.split(".")[0] == "qpissa"], imported
    example = load_example()
    for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()[:20]:
        row = json.loads(line)
        ours = example.gsm8k_prompt_completion(row)
        assert (ours["prompt"], ours["completion"]) == render(row, "gsm8k")


def test_trl_sft_trains_only_the_adapter(smollm2_decomposed, tiny_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("trl")
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    out = smollm2_decomposed["qpissa"]["out"]
    example = load_example()
    trainer = example.main([str(out), "--data", str(tiny_data), "--eval-data", str(tiny_data), "--eval-examples", "4",
                            "--eval-steps", "4", "--steps", "4", "--batch-size", "2", "--max-length", "128",
                            "--lr", "1e-3", "--warmup-ratio", "0", "--no-grad-checkpointing", "-o", str(tmp_path)])
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2  # before the first step (eval_on_start), then after step 4
    assert evals[-1] < evals[0] - 0.05, evals

    model = trainer.model
    linear4bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 5
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linear4bit)  # not repacked
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)

    stored = load_file(str(out / "residual" / "model.safetensors"))
    state = model.state_dict()
    frozen = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in state.items()
              if "lora_" not in k}
    assert frozen.keys() <= stored.keys() | {"lm_head.weight"}  # tied to embed_tokens
    assert sum(k.endswith(".weight") and v.dtype == torch.uint8 for k, v in frozen.items()) == 5  # NF4 bytes
    for key, value in frozen.items():
        want = stored.get(key, stored["model.embed_tokens.weight"])
        assert torch.equal(value.cpu(), want), key  # NF4 bytes, absmax, quant maps, norms, embeddings

    init = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == init.keys()
    assert all(v.dtype == torch.float32 for v in final.values())
    moved = [float((final[k] - init[k].float()).abs().max()) for k in init]
    assert min(moved) > 0, moved  # every factor trained


DPO_EXAMPLE = EXAMPLE.parent / "trl_dpo.py"


@pytest.mark.slow
def test_trl_dpo_reference_is_the_starting_adapter(smollm2_decomposed, tmp_path: Path) -> None:
    """examples/trl_dpo.py: at TRL's first evaluation (before any step) the DPO loss is log 2 and the rewards 0 — its
    frozen "ref" adapter is the starting QPiSSA adapter, not the residual — then training moves the margin; the saved
    adapter holds only the trained factors, fp32, under OUT/adapter's names, and the ref copy never moved."""
    pytest.importorskip("trl")
    import math

    from safetensors.torch import load_file
    from test_dpo import arithmetic_pairs, write_jsonl

    out = smollm2_decomposed["qpissa"]["out"]
    train_data = write_jsonl(tmp_path / "train.jsonl", arithmetic_pairs(8))
    eval_data = write_jsonl(tmp_path / "eval.jsonl", arithmetic_pairs(4, offset=20))
    spec = importlib.util.spec_from_file_location("trl_dpo_example", DPO_EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main([str(out), "--data", str(train_data), "--eval-data", str(eval_data), "--eval-steps", "4",
                            "--steps", "4", "--batch-size", "2", "--max-length", "64", "--lr", "1e-3",
                            "-o", str(tmp_path / "run")])
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=2e-3), evals[0]  # bf16 autocast noise only
    assert abs(evals[0]["eval_rewards/chosen"]) < 1e-2 and evals[-1]["eval_rewards/margins"] > 0.05, evals

    model = trainer.model
    assert set(model.peft_config) == {"default", "ref"}
    init = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ref = {k.replace(".ref.", "."): v for k, v in model.state_dict().items() if ".ref." in k}
    assert len(ref) == len(init) and all(torch.equal(ref[k].cpu().float(), init[k].float()) for k in init)
    final = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == init.keys() and all(v.dtype == torch.float32 for v in final.values())
    assert min(float((final[k] - init[k].float()).abs().max()) for k in init) > 0
