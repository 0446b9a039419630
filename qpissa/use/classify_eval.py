"""``qpissa eval --task classification``: a trained classification run scored on labelled data.

The model is loaded with plain transformers + peft, as a user would: ``AutoModelForSequenceClassification``
on OUT/residual with the run's labels, then ``PeftModel.from_pretrained(model, RUN/adapter)`` (which restores
the trained head from ``modules_to_save``), or RUN/model after ``--method full``. Scores: accuracy, macro-F1,
Matthews (and F1 of class 1 with two classes), or Pearson/Spearman for regression
(:mod:`qpissa.classify_metrics`); the summary names the headline metric GLUE reports for the task when
``--data-config`` is a GLUE subset (sst2 → accuracy, cola → matthews, stsb → pearson, …).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qpissa.classify import Labels, encode, predict, scores
from qpissa.classify_metrics import task_metrics
from qpissa.errors import UserError


@dataclass
class ClassificationConfig:
    text_pair_field: str | None = field(default=None, metadata={
        "help": "classification: the second text column (default: the run's)"})
    label_field: str | None = field(default=None, metadata={"help": "classification: the label column (default: "
                                                                    "the run's)"})


def run_of(base: Path, adapter: Path | None) -> Path:
    """The training run a (base, adapter) pair comes from: RUN of RUN/adapter or RUN/model."""
    return adapter.parent if adapter is not None else base.parent


def load_classifier(base: Path, adapter: Path | None, labels: Labels, device: str) -> tuple[torch.nn.Module, Any]:
    """Plain ``AutoModelForSequenceClassification`` (+ ``PeftModel``: adapter and head) and the tokenizer."""
    from transformers import AutoTokenizer

    from qpissa.train.classifier_model import load_sequence_classifier

    model, _ = load_sequence_classifier(base, labels, "auto" if adapter is not None else torch.float32,
                                        {"": device})
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def evaluate_classification(model, tokenizer, labels: Labels, records: list[dict[str, Any]], run_cfg: dict[str, Any],
                            cfg: ClassificationConfig, text_field: str | None, batch_size: int, device: str,
                            source: str, glue_task: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, one record per row: prediction, gold label, logits) on ``records``."""
    text = text_field or run_cfg.get("text_field")
    pair = cfg.text_pair_field if text_field or cfg.text_pair_field else run_cfg.get("text_pair_field")
    label_field = cfg.label_field or run_cfg.get("label_field") or "label"
    if text is None:
        raise UserError(f"{source}: the run does not name its text column; pass --text-field")
    max_length = (run_cfg.get("data_cfg") or {}).get("max_length") or 512  # as trained
    rows = encode(records, tokenizer, text, pair, label_field, labels, max_length, source)
    preds, logits, loss = predict(model, rows, tokenizer, labels, batch_size, device, precision="fp32")
    gold = [r.label for r in rows]
    values = scores(preds, gold, labels)
    headline = task_metrics(glue_task, labels.regression)
    summary = {"task": "classification", "glue_task": glue_task, "metric": headline[0],
               "metrics": list(headline), "value": values[headline[0]], **values, "loss": loss,
               "examples": len(rows), "num_labels": labels.num_labels, "text_field": text, "text_pair_field": pair,
               "label_field": label_field}
    name = (lambda i: labels.id2label.get(int(i), str(i))) if labels.id2label else (lambda v: v)
    out = [{"row": i, "prediction": name(p), "label": name(g), "logits": z}
           for i, (p, g, z) in enumerate(zip(preds, gold, logits))]
    return summary, out
