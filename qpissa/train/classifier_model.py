"""The model of a classification run: ``AutoModelForSequenceClassification`` with a new head, ready to train.

from-out  OUT/residual (4-bit body, frozen) + OUT/adapter's factors (trainable), the head new and trained
          in full (PEFT ``modules_to_save``, so RUN/adapter holds it and plain PEFT restores it);
lora      the original checkpoint + a fresh LoRA on the same block linears decompose targets, head as above;
full      the original checkpoint in fp32, every parameter trainable.

The head (``classifier`` for BERT/RoBERTa/DeBERTa, ``score`` for Llama-style models, plus a pooler the
checkpoint lacks, e.g. DeBERTa's) is whatever the checkpoint does not hold: transformers reports it as
missing. An encoder's decompose adapter names modules of the bare model (``encoder.layer.0…``); inside the
classification model they live under its base prefix (``bert.encoder.layer.0…``), so the factors are copied
into a LoRA config naming the full paths, which is what RUN/adapter then records.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qpissa import distributed
from qpissa.classify import Labels
from qpissa.errors import UserError
from qpissa.quant import HEAD_MODULES
from qpissa.train.config import TrainConfig


def head_config(model_dir: Path, labels: Labels):
    """The model's config with the head's labels; a pre-quantized residual made before the head modules were
    kept out of quantization gets them added (else transformers would make the new head 4-bit)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    config.num_labels = labels.num_labels
    config.id2label = {i: n for i, n in (labels.id2label or {0: "LABEL_0"}).items()}
    config.label2id = {n: i for i, n in config.id2label.items()}
    config.problem_type = "regression" if labels.regression else "single_label_classification"
    q = getattr(config, "quantization_config", None)
    if isinstance(q, dict):
        skip = list(q.get("llm_int8_skip_modules") or [])
        q["llm_int8_skip_modules"] = skip + [m for m in HEAD_MODULES if m not in skip]
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos  # Llama-style: the head pools the last token
    return config


def load_sequence_classifier(model_dir: Path, labels: Labels, dtype, device_map) -> tuple[torch.nn.Module, list[str]]:
    """(model, names of the modules the checkpoint lacks: the new head), or one line when there is no such class."""
    from transformers import AutoModelForSequenceClassification

    config = head_config(model_dir, labels)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_dir, config=config, dtype=dtype, device_map=device_map, output_loading_info=True)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        raise UserError(f"{model_dir}: transformers has no sequence-classification class for model_type "
                        f"{config.model_type!r}; --task classification needs one (…ForSequenceClassification)") from None
    new = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
    return model, new


def _in_model(names: list[str], model: torch.nn.Module) -> dict[str, str]:
    """Adapter module name (of the bare model) → its path in ``model`` (under the base prefix if needed)."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    out = {}
    for name in names:
        if name in modules:
            out[name] = name
        elif f"{prefix}.{name}" in modules:
            out[name] = f"{prefix}.{name}"
        else:
            raise UserError(f"adapter module {name} is not in the classification model (nor {prefix}.{name}); use "
                            "the adapter/ and residual/ of one decompose run")
    return out


def _lora(model, targets: list[str], new: list[str], rank: int, alpha: float, rslora: bool,
          fan_in_fan_out: bool = False):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0, target_modules=targets,
                     fan_in_fan_out=fan_in_fan_out, modules_to_save=new, task_type="SEQ_CLS", init_lora_weights=True)
    return get_peft_model(model, cfg)


def load_classifier(cfg: TrainConfig, labels: Labels):
    """(model, tokenizer) for cfg.method with only the adapter and the head trainable (everything for full)."""
    from transformers import AutoTokenizer

    from qpissa.quant import keep_4bit_layout_trainable

    root = Path(cfg.model)
    device_map = {"": distributed.rank_device(cfg.device, distributed.detect())}
    if cfg.method == "from-out":
        residual, adapter = root / "residual", root / "adapter"
        if not (residual / "config.json").exists() or not (adapter / "adapter_config.json").exists():
            raise UserError(f"{root}: no residual/config.json or adapter/adapter_config.json; pass the output "
                            "directory of `qpissa decompose`, or --method lora|full with an HF checkpoint")
        from qpissa.adapters import read_adapter

        model, new = load_sequence_classifier(residual, labels, "auto", device_map)
        saved = read_adapter(adapter)
        where = _in_model(list(saved.factors), model)
        c = saved.config
        model = _lora(model, sorted(where.values()), new, c["r"], c["lora_alpha"], bool(c.get("use_rslora")),
                      bool(c.get("fan_in_fan_out")))
        mods = dict(model.base_model.model.named_modules())
        with torch.no_grad():
            for name, (a, b) in saved.factors.items():  # A (r×n), B (m×r)
                layer = mods[where[name]]
                layer.lora_A["default"].weight.copy_(a.to(layer.lora_A["default"].weight.dtype))
                layer.lora_B["default"].weight.copy_(b.to(layer.lora_B["default"].weight.dtype))
        tok_dir = residual
    else:
        from qpissa.hub import resolve_model

        src = resolve_model(cfg.model, cfg.revision)
        if not (src / "config.json").exists():
            raise UserError(f"{src}/config.json not found: --method {cfg.method} needs an HF model directory")
        if "quantization_config" in json.loads((src / "config.json").read_text()):
            raise UserError(f"{src} is a quantized checkpoint; --method {cfg.method} needs unquantized weights")
        full = cfg.method == "full"
        model, new = load_sequence_classifier(src, labels, torch.float32 if full else "auto", device_map)
        if not full:
            from qpissa.decompose.targets import BLOCK_INDEX, linear_modules

            torch.manual_seed(cfg.seed)
            blocks = [m for m in linear_modules(src)[0] if BLOCK_INDEX.search(m)]  # what decompose targets
            model = _lora(model, sorted(_in_model(blocks, model).values()), new, cfg.lora_rank,
                          cfg.lora_alpha or cfg.lora_rank, False)
        else:
            model.requires_grad_(True)
        tok_dir = src
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    keep_4bit_layout_trainable(model)
    if cfg.precision == "fp32":
        from qpissa.quant import compute_in_fp32

        compute_in_fp32(model)
    return model, tokenizer
