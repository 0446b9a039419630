"""What a model folder is for: a causal LM (train, eval, generate) or an encoder; how to load ours.

``qpissa train`` and ``qpissa eval`` by default fine-tune / score next-token prediction, so they need a
causal LM head (``…ForCausalLM``); an encoder such as all-MiniLM-L6-v2 (``BertModel``) has none: it is
fine-tuned with a sequence-classification head (``--task classification``). Its decompose output loads
with plain transformers + peft, via ``AutoModel`` (or ``AutoModelForSequenceClassification``).
"""
from __future__ import annotations

import json
from pathlib import Path

from qpissa.errors import UserError

EXAMPLE_HINT = "qpissa example smollm2 out/smollm2-hf && qpissa decompose out/smollm2-hf -o out/smollm2"


def architecture(model_dir: str | Path) -> tuple[str, str]:
    """(architecture class, model_type) from ``config.json``; '?' where absent."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "?", "?"
    return (config.get("architectures") or ["?"])[0], str(config.get("model_type", "?"))


def is_causal_lm(model_dir: str | Path) -> bool:
    """True for ``…ForCausalLM`` / ``…LMHeadModel`` classes that transformers maps to AutoModelForCausalLM
    (its table only read for names without the suffix: importing transformers costs a second)."""
    arch, _ = architecture(model_dir)
    if arch.endswith("ForCausalLM"):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return arch in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def require_causal_lm(model_dir: str | Path, command: str) -> None:
    """One clear line instead of a traceback deep inside transformers when MODEL is an encoder."""
    if is_causal_lm(model_dir):
        return
    arch, model_type = architecture(model_dir)
    task = {"train": "qpissa train OUT --task classification --data FILE --text-field COLUMN",
            "eval": "qpissa eval RUN --task classification --data FILE"}.get(command, "--task classification")
    raise UserError(f"{model_dir}: {arch} ({model_type}) has no causal language-model head; `qpissa {command}` "
                    f"of next-token prediction needs a causal LM (…ForCausalLM). Fine-tune this encoder with a "
                    f"classification head: `{task}` (or load it with transformers.AutoModel + peft.PeftModel); "
                    f"for a causal LM: {EXAMPLE_HINT}")


def nf4_experts(out_dir: str | Path) -> bool:
    """True when OUT/residual holds NF4 MoE experts, which only :func:`qpissa.moe.load` loads 4-bit."""
    from qpissa.moe import CONFIG_KEY

    config = json.loads((Path(out_dir) / "residual" / "config.json").read_text())
    return CONFIG_KEY in config


def load_heading(out_dir: str | Path) -> str:
    """The line before :func:`load_snippet`."""
    if nf4_experts(out_dir):
        return ("load it with qpissa (transformers + bitsandbytes cannot load 4-bit MoE experts yet; "
                "--experts-dtype bfloat16 gives a plain transformers + peft residual):")
    return "load it with plain transformers + peft:"


def load_snippet(out_dir: str | Path) -> str:
    """Python that loads a decompose output: plain transformers + peft (the right Auto class), or
    ``qpissa.moe.load`` for NF4 MoE experts."""
    residual, adapter = Path(out_dir) / "residual", Path(out_dir) / "adapter"
    if nf4_experts(out_dir):
        return ("from qpissa.moe import load\n"
                f"model = load({str(out_dir)!r}, is_trainable=True)  # NF4 experts + linears, PEFT LoRA on top")
    auto = "AutoModelForCausalLM" if is_causal_lm(residual) else "AutoModel"
    quantized = "quantization_config" in json.loads((residual / "config.json").read_text())
    peft = f"model = PeftModel.from_pretrained(model, {str(adapter)!r}, is_trainable=True)"
    if (adapter / "adapter_config.json").is_file() and \
            json.loads((adapter / "adapter_config.json").read_text()).get("target_parameters"):
        peft = ("from qpissa.adapters import native_targets  # PEFT 0.21 rewrites MoE targets otherwise\n"
                f"with native_targets():\n    {peft}")
    return (f"from transformers import {auto}\n"
            "from peft import PeftModel\n"
            f"model = {auto}.from_pretrained({str(residual)!r})"
            f"{'  # 4-bit NF4, frozen' if quantized else ''}\n" + peft)
