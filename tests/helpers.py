"""Helpers shared by several test modules (fixtures live in conftest.py): ``from helpers import ...``."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every output file but manifest.json (it holds timings) and config.yaml (the CLI's record of its
    options, OUT's path included; the API writes none; tests/test_config_file.py checks it), parts included.

    adapter_config.json names its own OUT/residual as base model, so that path is checked and
    replaced by a placeholder before hashing (the rest of its bytes are compared as written).
    """
    digest = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name in ("manifest.json", "config.yaml"):
            continue
        data = p.read_bytes()
        if p.name == "adapter_config.json":
            base = json.loads(data)["base_model_name_or_path"]
            assert Path(base) == (root / "residual").resolve(), base
            data = data.replace(json.dumps(base).encode(), b'"OUT/residual"')
        digest[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return digest


def lora_pairs(adapter_dir: Path):
    """{module: (A, B)} in fp32, read with safetensors directly (not through qpissa)."""
    from safetensors.torch import load_file

    t = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"):
            (t[k].float(), t[k.replace("lora_A", "lora_B")].float()) for k in t if ".lora_A." in k}


def triton_interpreter() -> None:
    """Kernel tests run on CPU under Triton's interpreter. Call first in the module: sets TRITON_INTERPRET=1
    before triton or qpissa.kernels is imported; skips without triton or bitsandbytes, and when the kernels
    were already imported in compiler mode on a machine without a GPU."""
    os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton", reason="triton not installed: pip install triton (Linux) to test the kernels")
    pytest.importorskip("bitsandbytes")
    import torch

    from qpissa.kernels.nf4_dequant import interpreting

    if not interpreting() and not torch.cuda.is_available():
        pytest.skip("qpissa.kernels was imported before TRITON_INTERPRET=1 was set and there is no GPU",
                    allow_module_level=True)


def tiny_llama(dest: Path, layers: int = 2, hidden: int = 64, vocab: int = 2000, tokenizer: Path | None = None) -> Path:
    """A random bf16 Llama saved with ``save_pretrained`` (intermediate 2×hidden, 4 heads, 2 KV heads); with
    ``tokenizer`` (a model dir) its tokenizer files are copied and the vocabulary sized to it (train, calibration)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer is not None:
        vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                      tie_word_embeddings=tokenizer is not None)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(dest)
    if tokenizer is not None:
        copy_tokenizer(Path(tokenizer), Path(dest))
    return Path(dest)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(src: Path, dest: Path) -> None:
    """Copy the tokenizer files ``src`` (a model dir) has into ``dest``."""
    import shutil

    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dest / name)
