"""Known architectures' linear layers from config.json alone equal what the meta model finds (the slow path),
and decomposing a known architecture imports neither transformers nor bitsandbytes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qpissa.decompose import architectures, targets
from qpissa.decompose.architectures import LAYOUTS, known_linear_modules

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 100, "head_dim": 16, "pad_token_id": 0}


def config_dir(tmp_path: Path, arch: str, **overrides) -> Path:
    """A model folder holding only config.json: a small config of ``arch``'s model_type, as transformers writes it."""
    from transformers import AutoConfig

    layout = LAYOUTS[arch]
    options = dict(SMALL)
    if layout.model_type == "bert":
        options = {k: v for k, v in options.items() if k not in ("num_key_value_heads", "head_dim")}
    config = AutoConfig.for_model(layout.model_type, **options, **overrides)
    config.architectures = [arch]
    folder = tmp_path / arch
    folder.mkdir()
    config.to_json_file(str(folder / "config.json"))
    return folder


def meta_linear_modules(model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """What targets.linear_modules finds on the meta model, with the config.json shortcut off."""
    with monkeypatch.context() as m:
        m.setattr(targets, "known_linear_modules", lambda config: None)
        return targets.linear_modules(model_dir)


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_layout_equals_meta_model(arch, tmp_path, monkeypatch):
    folder = config_dir(tmp_path, arch)
    fast = known_linear_modules(json.loads((folder / "config.json").read_text()))
    assert fast is not None
    slow = meta_linear_modules(folder, monkeypatch)
    assert list(fast[0].items()) == list(slow[0].items())  # names, order and Conv1D flags
    assert fast[1:] == slow[1:]
    assert targets.linear_modules(folder) == fast  # the shortcut is what linear_modules returns


def test_real_models_take_the_shortcut_with_the_same_answer(minilm_dir, smollm2_dir, monkeypatch):
    for folder in (minilm_dir, smollm2_dir):
        fast = known_linear_modules(json.loads((folder / "config.json").read_text()))
        assert fast is not None, folder
        slow = meta_linear_modules(folder, monkeypatch)
        assert list(fast[0].items()) == list(slow[0].items()) and fast[1:] == slow[1:]


def test_structural_options_and_unknown_configs_use_the_meta_model(tmp_path):
    base = json.loads((config_dir(tmp_path, "BertModel") / "config.json").read_text())
    assert known_linear_modules(base) is not None
    for option in architectures.STRUCTURAL_OPTIONS:
        assert known_linear_modules({**base, option: True}) is None, option
    assert known_linear_modules({**base, "model_type": "roberta"}) is None  # another model_type
    assert known_linear_modules({**base, "architectures": ["BertForMaskedLM"]}) is None  # another head
    assert known_linear_modules({**base, "architectures": ["BertModel", "BertForMaskedLM"]}) is None
    assert known_linear_modules({**base, "num_hidden_layers": "3"}) is None
    assert known_linear_modules({k: v for k, v in base.items() if k != "architectures"}) is None


@pytest.mark.slow
def test_decompose_imports_neither_transformers_nor_bitsandbytes(tmp_path):
    """A Llama checkpoint through the CLI in a fresh interpreter: config.json gives the targets, our CPU NF4 code
    quantizes, dequantizes and serializes (each import costs ≈1 s of a ≈5 s SmolLM2 run)."""
    folder = config_dir(tmp_path, "LlamaForCausalLM", tie_word_embeddings=True)
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for i in range(3):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)),
                            ("self_attn.v_proj", (32, 64)), ("self_attn.o_proj", (64, 64)),
                            ("mlp.gate_proj", (128, 64)), ("mlp.up_proj", (128, 64)), ("mlp.down_proj", (64, 128))):
            layers[p + name + ".weight"] = torch.randn(shape, generator=gen)
        layers[p + "input_layernorm.weight"] = torch.ones(64)
        layers[p + "post_attention_layernorm.weight"] = torch.ones(64)
    layers["model.embed_tokens.weight"] = torch.randn(100, 64, generator=gen)
    layers["model.norm.weight"] = torch.ones(64)
    save_file(layers, str(folder / "model.safetensors"))
    code = ("import sys\n"
            "from qpissa.cli import main\n"
            f"sys.argv = ['qpissa', 'decompose', {str(folder)!r}, '-o', {str(tmp_path / 'out')!r}, '--rank', '4',"
            " '--quiet']\n"
            "try:\n    main()\nexcept SystemExit as err:\n    assert not err.code, err.code\n"
            "print('imported:', sorted(m for m in ('transformers', 'bitsandbytes', 'peft') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "imported: []" in out.stdout
    config = json.loads((tmp_path / "out" / "residual" / "config.json").read_text())
    # lm_head (not a target) and the sequence-classification heads a …ForSequenceClassification adds
    assert config["quantization_config"]["llm_int8_skip_modules"] == ["lm_head", "classifier", "score",
                                                                       "pooler.dense", "head.dense"]
