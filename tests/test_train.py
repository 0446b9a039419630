"""Training loop on real weights: SmolLM2-135M (Llama) + GSM8K, QPiSSA adapters from the real decompose.

The decompose fixture covers layer 0 (all seven projections) at r=8 to stay inside the test budget;
the loop itself does not care how many modules carry adapters.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qpissa.data import DataConfig, build_examples
from qpissa.errors import UserError
from qpissa.train import TrainConfig, TrainingDiverged, evaluate_loss, fit, load_model, train

TARGETS = [r"model\.layers\.0\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"]


@pytest.fixture(scope="session")
def decomposed(smollm2_dir: Path, tmp_path_factory) -> Path:
    from qpissa.decompose import decompose

    out = tmp_path_factory.mktemp("decomposed") / "out"
    decompose(smollm2_dir, out, method="qpissa", rank=8, iters=1, targets=TARGETS, loftq_baseline=False,
              progress=False)
    return out


def make_cfg(model: Path, data: Path, output: Path, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), output=str(output), steps=6, batch_size=2, lr=5e-4,
                warmup_ratio=0.0, save_every=2, keep_last=2, seed=0, progress=False,
                data_cfg=DataConfig(max_length=128, skip_long_prompts=True))
    base.update(kw)
    return TrainConfig(**base)


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every state-dict tensor that is not an adapter factor (NF4 bytes, absmax, norms, embeddings)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.fixture(scope="session")
def trained(decomposed: Path, tiny_data: Path, tmp_path_factory) -> dict:
    from qpissa.data import load_records

    cfg = make_cfg(decomposed, tiny_data, tmp_path_factory.mktemp("runs") / "full")
    model, tok = load_model(cfg)
    records = load_records(tiny_data)
    examples = build_examples(records, tok, cfg.data_cfg)
    before_state = frozen_state(model)
    loss_before = evaluate_loss(model, examples, 4, tok.pad_token_id, "cpu", "bf16")

    # one backward pass: which parameters receive gradients?
    from qpissa.data import collate

    batch = collate(examples[:2], tok.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    summary = fit(cfg, model, tok, examples, [])
    loss_after = evaluate_loss(model, examples, 4, tok.pad_token_id, "cpu", "bf16")
    return dict(cfg=cfg, model=model, tok=tok, summary=summary, before_state=before_state,
                after_state=frozen_state(model), loss_before=loss_before, loss_after=loss_after,
                with_grad=with_grad, examples=examples)


def read_losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_loss_decreases(trained) -> None:
    assert trained["loss_after"] < trained["loss_before"] - 0.05, (trained["loss_before"], trained["loss_after"])
    run = Path(trained["cfg"].output)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and r["memory_mb"] > 0 for r in rows)
    assert (run / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_frozen_base_is_bit_identical(trained, decomposed: Path) -> None:
    before, after = trained["before_state"], trained["after_state"]
    assert before.keys() == after.keys()
    nf4 = [k for k in before if k.endswith(".weight") and before[k].dtype == torch.uint8]
    assert len(nf4) == 7  # the packed NF4 bytes of every target module
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # ... and the stored residual equals what was trained on
    from safetensors.torch import load_file

    stored = load_file(str(decomposed / "residual" / "model.safetensors"))
    for key in nf4:
        name = key.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(stored[name], after[key]), key


@pytest.mark.slow
def test_only_adapter_parameters_get_gradients(trained) -> None:
    model, with_grad = trained["model"], trained["with_grad"]
    lora = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(lora) == 2 * 7
    assert with_grad == lora
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora


@pytest.mark.slow
def test_adapter_loads_in_plain_peft_with_same_logits(trained, decomposed: Path, tmp_path: Path) -> None:
    run = Path(trained["cfg"].output)
    ids = torch.tensor([trained["examples"][0].input_ids[:48]])
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained({str(decomposed / 'residual')!r})
        model = PeftModel.from_pretrained(base, {str(run / 'adapter')!r})
        ids = torch.load('ids.pt')
        with torch.no_grad():
            model.train()  # dropout is 0: same kernels as training (bitsandbytes' training matmul)
            torch.save(model(input_ids=ids).logits.float(), 'logits_train_mode.pt')
            model.eval()  # bitsandbytes repacks NF4 for its CPU inference kernel
            torch.save(model(input_ids=ids).logits.float(), 'logits_eval_mode.pt')
        assert not any(m == 'qpissa' or m.startswith('qpissa.') for m in sys.modules), 'qpissa imported'
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = trained["model"]
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
    model.train()
    same_kernels = torch.load(tmp_path / "logits_train_mode.pt")
    torch.testing.assert_close(same_kernels, ours, rtol=0, atol=1e-4)
    inference_kernel = torch.load(tmp_path / "logits_eval_mode.pt")  # bf16 rounding differs, values agree
    assert (inference_kernel - ours).abs().max() < 0.05 * ours.abs().max()
    top5 = inference_kernel.topk(5, dim=-1).indices  # (1, T, 5); near-ties may swap the top-1 in bf16
    assert (top5 == ours.argmax(-1, keepdim=True)).any(-1).all()
    # the trained adapter differs from the initial one: the comparison above is not vacuous
    from safetensors.torch import load_file

    init = load_file(str(decomposed / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert init.keys() == final.keys()
    assert max(float((final[k].float() - init[k].float()).abs().max()) for k in init) > 1e-4


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(trained, decomposed, tiny_data, tmp_path: Path) -> None:
    full_run = Path(trained["cfg"].output)
    assert sorted(p.name for p in full_run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # keep 2
    cfg = make_cfg(decomposed, tiny_data, tmp_path / "resumed", stop_after=3)
    first = train(cfg)
    assert first["steps"] == 3 and "adapter" not in first
    with pytest.raises(UserError, match="--resume"):
        train(cfg)
    second = train(replace(cfg, stop_after=None, resume=True))
    assert second["steps"] == 6
    want, got = read_losses(full_run), read_losses(tmp_path / "resumed")
    assert len(got) == 6
    assert max(abs(a - b) for a, b in zip(want, got)) < 1e-5, (want, got)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(decomposed, tiny_data, tmp_path: Path) -> None:
    cfg = make_cfg(decomposed, tiny_data, tmp_path / "nan", lr=1e9, schedule="constant", save_every=1,
                   steps=4, max_grad_norm=0.0)
    with pytest.raises(TrainingDiverged, match=r"(loss|gradient norm) became (nan|inf) at step \d; .*last good checkpoint: .*checkpoint-\d"):
        train(cfg)
    ckpts = sorted((tmp_path / "nan").glob("checkpoint-*"))
    assert ckpts and not (tmp_path / "nan" / "adapter").exists()


@pytest.mark.slow
def test_bad_inputs(decomposed: Path, tiny_data: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(decomposed / "residual", broken / "residual")
    with pytest.raises(UserError, match="adapter.*missing adapter_config.json"):
        train(make_cfg(broken, tiny_data, tmp_path / "r1"))
    shutil.copytree(decomposed / "adapter", broken / "adapter")
    f = broken / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = torch.zeros(8, 100, dtype=torch.bfloat16)
    save_file(tensors, str(f))
    with pytest.raises(UserError, match="has shape .*different models"):
        train(make_cfg(broken, tiny_data, tmp_path / "r2"))
    with pytest.raises(UserError, match="does not exist"):
        train(make_cfg(decomposed, tmp_path / "missing.jsonl", tmp_path / "r3"))
    # the CLI turns a user error into one line on stderr and exit code 2
    proc = subprocess.run([sys.executable, "-c", "from qpissa.cli import main; main()", "train", str(decomposed), "--data",
                           str(tiny_data), "--template", "{question} {solution}", "-o", str(tmp_path / "r4")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "'solution' is missing" in lines[0], proc.stderr[-2000:]


@pytest.mark.slow
def test_lora_and_full_baselines(smollm2_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    """--method lora (8-bit AdamW, gradient checkpointing) and --method full on the unquantized checkpoint."""
    lora = train(make_cfg(smollm2_dir, tiny_data, tmp_path / "lora", method="lora", lora_rank=4, steps=2,
                          optim="adamw8bit", grad_checkpointing=True, save_every=0))
    cfg_json = json.loads((Path(lora["adapter"]) / "adapter_config.json").read_text())
    assert cfg_json["r"] == 4 and set(cfg_json["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"}
    full = train(make_cfg(smollm2_dir, tiny_data, tmp_path / "full", method="full", steps=1, lr=1e-5,
                          save_every=0))
    assert full["train_loss"] is not None and (tmp_path / "full" / "model" / "model.safetensors").exists()
