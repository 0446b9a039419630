"""``qpissa train --task classification``: data, labels and model for a sequence-classification head; the loop is
:func:`qpissa.train.loop.fit` with :class:`qpissa.train.task.ClassificationTask`.

Model: :mod:`qpissa.train.classifier_model` (4-bit body frozen, adapter + new head trainable; or LoRA / full).
Per optimizer step (the causal loop's recipe): loss = mean over the step's rows of CE(logits, label) (MSE for
--num-labels 1, regression); clip ‖g‖₂ ≤ max_grad_norm; AdamW with warmup + cosine/linear/constant decay.
Held-out (``--eval-data``, every ``--eval-every`` steps and at the end): loss and accuracy / macro-F1 / Matthews
(Pearson / Spearman for regression) in RUN/metrics.jsonl. Checkpoints (``--save-every``), ``--resume`` and
trackers (``--report-to``) as for a causal LM. The final RUN/adapter holds the trained factors and the head
(``modules_to_save``); RUN/config.json records the options and the label map (``id2label``), which
``qpissa eval --task classification`` reads back. One process (torchrun is refused).
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpissa import distributed
from qpissa.classify import Labels, check_rows, encode, infer_labels, text_fields
from qpissa.data import load_records
from qpissa.errors import UserError
from qpissa.train.config import TrainConfig
from qpissa.train.task import ClassificationTask


def run_labels(run: Path) -> tuple[Labels, dict[str, Any]]:
    """The head of a finished classification run (its label map) and its RUN/config.json."""
    try:
        saved = json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{run}: no readable config.json of a `qpissa train --task classification` run") from None
    if saved.get("task") != "classification":
        raise UserError(f"{run}: a {saved.get('task', 'causal-lm')} run; --task classification evaluates runs "
                        "trained with --task classification")
    id2label = {int(k): v for k, v in (saved.get("id2label") or {}).items()} or None
    return Labels(int(saved["num_labels"]), id2label, bool(saved.get("labels_from_strings"))), saved


def prepare_classification(cfg: TrainConfig) -> tuple[TrainConfig, Any, Any, ClassificationTask]:
    """Data, labels, model and task of a run (see the module docstring) for :func:`qpissa.train.loop.fit`."""
    from qpissa.train.classifier_model import load_classifier

    if distributed.detect().world_size > 1:
        raise UserError("--task classification runs in one process; start it without torchrun")
    if cfg.sorsa_gamma > 0 or cfg.kernels != "none" or cfg.data_cfg.packing or cfg.fsdp:
        raise UserError("--sorsa-gamma, --kernels, --packing and --fsdp apply to --task causal-lm only")
    records = load_records(cfg.data, cfg.data_split, cfg.data_config, cfg.data_limit)  # one line before weights
    text, pair = text_fields(records[0], cfg.text_field, cfg.text_pair_field, str(cfg.data))
    labels = infer_labels(records, cfg.label_field, cfg.num_labels, str(cfg.data))
    eval_records = (load_records(cfg.eval_data, cfg.eval_split, cfg.data_config,
                                 flags=("--eval-split", "--data-config"))[:cfg.eval_examples] if cfg.eval_data else [])
    check_rows(records, text, pair, cfg.label_field, labels, str(cfg.data))
    if eval_records:
        check_rows(eval_records, text, pair, cfg.label_field, labels, str(cfg.eval_data))
    cfg = replace(cfg, text_field=text, text_pair_field=pair, num_labels=labels.num_labels)
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    model, tokenizer = load_classifier(cfg, labels)
    max_len = cfg.data_cfg.max_length
    rows = encode(records, tokenizer, text, pair, cfg.label_field, labels, max_len, str(cfg.data))
    held = (encode(eval_records, tokenizer, text, pair, cfg.label_field, labels, max_len, str(cfg.eval_data))
            if eval_records else [])
    return cfg, model, tokenizer, ClassificationTask(rows, held, tokenizer, labels, cfg.batch_size, cfg.precision)
