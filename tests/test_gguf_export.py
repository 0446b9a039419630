"""``qpissa export --format gguf`` (fast tier): the files read back with the gguf reader and transformers' GGUF loader.

Independent references: transformers' own GGUF loader (it undoes llama.cpp's q/k row order itself), PEFT's
``merge_and_unload`` for merged weights, and the gguf package's dequantizers for quantized tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf_models as gm
from qpissa.errors import UserError
from qpissa.use.gguf_export import ExportConfig, export_gguf

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny llama and qwen3 models, each with a random PEFT LoRA (r=4, s=2) on q/k/v/down as a "training run"."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gguf_tiny")
    out = {}
    for fam in ("llama", "qwen3"):
        model_dir = gm.build(fam, root / fam)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                         init_lora_weights=False)
        torch.manual_seed(1)
        peft = get_peft_model(base, cfg)
        peft.save_pretrained(root / f"{fam}-run" / "adapter")
        adapter_cfg = root / f"{fam}-run" / "adapter" / "adapter_config.json"
        conf = json.loads(adapter_cfg.read_text())
        conf["base_model_name_or_path"] = str(model_dir)
        adapter_cfg.write_text(json.dumps(conf))
        out[fam] = model_dir
        out[f"{fam}-run"] = root / f"{fam}-run"
    return out


def _reference(model_dir: Path, run: Path | None = None) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if run is not None:
        model = PeftModel.from_pretrained(model, run / "adapter").merge_and_unload()
    return model.state_dict()


def _loaded(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("fam", ["llama", "qwen3"])
def test_merged_run_loads_back_in_transformers(tiny, tmp_path, fam):
    """A training run exported merged (f16): transformers' GGUF loader gives W + s·B·A (PEFT's merge) back."""
    summary = export_gguf(tiny[f"{fam}-run"], tmp_path / "m.gguf")
    assert summary["merged_adapter"] and summary["architecture"] == fam and summary["f16_fallback"] == 0
    ref, got = _reference(tiny[fam], tiny[f"{fam}-run"]), _loaded(tmp_path / "m.gguf")
    assert set(ref) == set(got)
    for k in ref:  # f16 storage: relative rounding 2^-11
        assert torch.allclose(got[k], ref[k], rtol=1e-3, atol=1e-5), k
    delta = ref["model.layers.0.self_attn.q_proj.weight"] - _reference(tiny[fam])["model.layers.0.self_attn.q_proj.weight"]
    assert delta.abs().max() > 1e-2  # the adapter is really in there
    assert (tmp_path / "m.Modelfile").read_text().splitlines()[1:] == ["FROM ./m.gguf"]


@pytest.mark.parametrize("fam", ["qwen2", "gemma3_text"])
def test_plain_model_loads_back(tmp_path, fam):
    """Qwen2 (q/k/v biases) and Gemma 3 (norms stored +1, tied embedding) read back as the checkpoint."""
    model_dir = gm.build(fam, tmp_path / fam)
    summary = export_gguf(model_dir, tmp_path / "p.gguf")
    assert not summary["merged_adapter"] and summary["notes"] == []
    ref, got = _reference(model_dir), _loaded(tmp_path / "p.gguf")
    assert set(ref) == set(got)
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-3, atol=1e-5), k


def test_moe_experts_stacked(tmp_path):
    """Qwen3-MoE experts (one matrix each on disk) become one (E, m, n) tensor per layer and projection, in expert
    order; the expert counts are in the metadata; a config llama.cpp routes differently is noted."""
    from safetensors.torch import load_file

    import moe_models

    model_dir = moe_models.build("qwen3_moe", tmp_path / "moe", tokenizer=gm.build_tokenizer(tmp_path / "tok"))
    summary = export_gguf(model_dir, tmp_path / "m.gguf")
    assert summary["architecture"] == "qwen3moe" and "norm_topk_prob" in summary["notes"][0]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["qwen3moe.expert_count"].contents() == moe_models.EXPERTS
    assert reader.fields["qwen3moe.expert_used_count"].contents() == 2
    t = next(x for x in reader.tensors if x.name == "blk.1.ffn_down_exps.weight")
    ref = load_file(str(model_dir / "model.safetensors"))
    want = torch.stack([ref[f"model.layers.1.mlp.experts.{e}.down_proj.weight"].float()
                        for e in range(moe_models.EXPERTS)])  # (E, H, I)
    np.testing.assert_allclose(np.asarray(t.data, dtype=np.float32), want.numpy(), rtol=1e-3, atol=1e-6)


def test_tokenizer_and_chat_template_in_metadata(tiny, tmp_path):
    from transformers import AutoTokenizer

    export_gguf(tiny["qwen3"], tmp_path / "q.gguf")
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    f = reader.fields
    assert f["tokenizer.ggml.model"].contents() == "gpt2" and f["tokenizer.ggml.pre"].contents() == "qwen2"
    assert f["tokenizer.chat_template"].contents() == gm.CHATML
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == gm.VOCAB
    hf = AutoTokenizer.from_pretrained(tiny["qwen3"])
    assert [tokens[i] for i in range(len(hf))] == hf.convert_ids_to_tokens(list(range(len(hf))))
    assert [types[hf.convert_tokens_to_ids(s)] for s in gm.SPECIALS] == [3, 3, 3]  # control
    assert tokens[-1] == f"[PAD{gm.VOCAB - 1}]" and types[-1] == 5  # unused ids past the tokenizer
    assert f["tokenizer.ggml.eos_token_id"].contents() == hf.eos_token_id
    assert f["tokenizer.ggml.add_bos_token"].contents() is False
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="q.gguf")
    text = "Natalia sold 48 clips in April, and then 1/2 as many!"
    assert back(text)["input_ids"] == hf(text)["input_ids"]


def test_split_adapter_files(tiny, tmp_path):
    """--split adapter: the base is the model without the adapter; the LoRA holds A, B (q/k rows in llama.cpp's
    order), α = s·r; the Modelfile names both."""
    summary = export_gguf(tiny["llama-run"], tmp_path / "s.gguf", ExportConfig(split="adapter", quant="q8_0"))
    assert summary["lora_modules"] == 8 and summary["lora_alpha"] == pytest.approx(8.0)
    assert (tmp_path / "s.Modelfile").read_text().splitlines()[1:] == ["FROM ./s.gguf", "ADAPTER ./s-lora.gguf"]
    base = _reference(tiny["llama"])
    reader = gguf.GGUFReader(tmp_path / "s.gguf")
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert down.tensor_type == gguf.GGMLQuantizationType.Q8_0
    w = gguf.quants.dequantize(down.data, down.tensor_type)
    assert np.abs(w - base["model.layers.1.mlp.down_proj.weight"].numpy()).max() < 0.01  # residual, not merged
    lora = gguf.GGUFReader(tmp_path / "s-lora.gguf")
    f = lora.fields
    assert f["general.type"].contents() == "adapter" and f["adapter.type"].contents() == "lora"
    assert f["general.architecture"].contents() == "llama"
    t = {x.name: np.asarray(x.data, dtype=np.float32) for x in lora.tensors}
    assert len(t) == 16 and {x.tensor_type.name for x in lora.tensors} == {"F16"}
    a, b = t["blk.0.attn_q.weight.lora_a"], t["blk.0.attn_q.weight.lora_b"]  # (r, n), (m, r)
    assert a.shape == (4, 64) and b.shape == (64, 4)
    merged = _reference(tiny["llama"], tiny["llama-run"])["model.layers.0.self_attn.q_proj.weight"].numpy()
    q = base["model.layers.0.self_attn.q_proj.weight"].numpy()
    heads, d = 4, 16
    perm = np.arange(64).reshape(heads, 2, d // 2).swapaxes(1, 2).reshape(-1)  # llama.cpp's pairwise RoPE rows
    np.testing.assert_allclose(2.0 * b @ a, (merged - q)[perm], atol=2e-3)


def test_quant_fallback_counted(tmp_path):
    """q4_0 on a model whose MLP rows (intermediate 80) are not a multiple of 32: down_proj stays f16, counted."""
    from typer.testing import CliRunner

    from qpissa.cli.entry import app

    model_dir = gm.build("qwen2", tmp_path / "odd", intermediate=80)
    res = CliRunner().invoke(app, ["export", str(model_dir), "--format", "gguf", "-o", str(tmp_path / "o.gguf"),
                                   "--quant", "q4_0"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "kept f16" in res.output and "blk.0.ffn_down.weight, blk.1.ffn_down.weight" in res.output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "o.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.bias"] == "F32"


def test_unmapped_architecture_writes_nothing(minilm_dir, tmp_path):
    with pytest.raises(UserError, match=r"model_type 'bert' has no GGUF mapping; supported: gemma3_text, llama"):
        export_gguf(minilm_dir, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_refuses_overwrite_and_split_without_adapter(tiny, tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"keep")
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        export_gguf(tiny["qwen3"], tmp_path / "x.gguf")
    assert (tmp_path / "x.gguf").read_bytes() == b"keep"
    with pytest.raises(UserError, match="--split adapter needs an adapter"):
        export_gguf(tiny["qwen3"], tmp_path / "y.gguf", ExportConfig(split="adapter"))
