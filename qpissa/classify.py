"""Records → sequence-classification rows: text (and pair) fields, labels checked and mapped to class ids.

What ``qpissa train --task classification`` and ``qpissa eval --task classification`` read, following the
habits of Hugging Face's ``run_glue.py``: one text field or a pair (tokenized together, so BERT sees
``[CLS] a [SEP] b [SEP]``), integer labels used as class ids, string labels mapped to ids in sorted order
(``id2label`` is saved with the run), ``--num-labels 1`` a regression target (float, MSE loss). Every bad
row is one line naming the file, the row and the field, before any weights are read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from qpissa.errors import UserError


@dataclass(frozen=True)
class Labels:
    """What the head predicts: ``num_labels`` classes named by ``id2label``, or regression (num_labels 1)."""

    num_labels: int
    id2label: dict[int, str] | None = None  # classes; None for regression
    from_strings: bool = False  # the data's labels are names (mapped through id2label), not ids

    @property
    def regression(self) -> bool:
        return self.num_labels == 1

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in (self.id2label or {}).items()}


# run_glue.py's text columns per GLUE task (and plain ``text``), tried in order when --text-field is not given
KNOWN_FIELDS: tuple[tuple[str, str | None], ...] = (
    ("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"), ("question", "sentence"),
    ("sentence", None), ("text", None))


def text_fields(record: dict[str, Any], text_field: str | None, pair_field: str | None,
                source: str) -> tuple[str, str | None]:
    """(text, pair) columns: as given, else the first GLUE layout the data has (``run_glue.py``'s habit)."""
    if text_field is not None:
        return text_field, pair_field
    if pair_field is not None:
        raise UserError("--text-pair-field needs --text-field (the first text of the pair)")
    for a, b in KNOWN_FIELDS:
        if a in record and (b is None or b in record):
            return a, b
    raise UserError(f"{source}: no known text column (columns present: {sorted(record)}); name it with --text-field "
                    "(and --text-pair-field for a pair)")


def _where(source: str, row: int, field: str) -> str:
    return f"{source} row {row} field {field!r}"


def _value(record: dict[str, Any], field: str, source: str, row: int, what: str) -> Any:
    if field not in record:
        raise UserError(f"{_where(source, row, field)}: no such {what} column (columns present: {sorted(record)}); "
                        f"pick it with --{what}-field")
    return record[field]


def infer_labels(records: Sequence[dict[str, Any]], label_field: str, num_labels: int | None,
                 source: str) -> Labels:
    """The head's label set from the training data (and ``--num-labels``, checked against it)."""
    if num_labels is not None and num_labels < 1:
        raise UserError(f"--num-labels {num_labels}: pass 1 (regression) or the number of classes (≥ 2)")
    values = [_value(r, label_field, source, i, "label") for i, r in enumerate(records)]
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
            raise UserError(f"{_where(source, i, label_field)}: the label is empty; every training row needs one")
    if num_labels == 1:
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UserError(f"{_where(source, i, label_field)}: label {v!r} is not a number; --num-labels 1 is "
                                "regression (a float target); give the number of classes for class labels")
        return Labels(1)
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        if num_labels is not None and num_labels != len(names):
            raise UserError(f"{source} field {label_field!r}: --num-labels {num_labels} but the data has "
                            f"{len(names)} label names ({', '.join(names[:8])}); drop --num-labels or fix it")
        if len(names) < 2:
            raise UserError(f"{source} field {label_field!r}: every row has the label {names[0]!r}; a classifier "
                            "needs at least two classes")
        return Labels(len(names), dict(enumerate(names)), from_strings=True)
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
            raise UserError(f"{_where(source, i, label_field)}: label {v!r} is not a class id (an integer ≥ 0) or a "
                            "name; for a real-valued target pass --num-labels 1 (regression)")
        if v < 0:
            raise UserError(f"{_where(source, i, label_field)}: label {v!r} is negative (GLUE test splits are "
                            "unlabelled, -1: train and evaluate on labelled splits)")
    top = int(max(values)) + 1
    if num_labels is not None and top > num_labels:
        row = next(i for i, v in enumerate(values) if v >= num_labels)
        raise UserError(f"{_where(source, row, label_field)}: label {values[row]!r} but --num-labels {num_labels} "
                        f"allows 0..{num_labels - 1}; raise --num-labels or drop it to count the classes")
    n = num_labels or max(top, 2)
    return Labels(n, {i: str(i) for i in range(n)})


def label_id(value: Any, labels: Labels, where: str) -> float | int:
    """One record's label as the head's target: a class id, or a float for regression."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{where}: the label is empty")
    if labels.regression:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: label {value!r} is not a number (this head is a regression, --num-labels 1)")
        return float(value)
    if labels.from_strings:
        if value not in labels.label2id:
            raise UserError(f"{where}: label {value!r} is not one the head was trained on "
                            f"({', '.join(sorted(labels.label2id))})")
        return labels.label2id[value]
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise UserError(f"{where}: label {value!r} is not a class id (this head takes 0..{labels.num_labels - 1})")
    if not 0 <= value < labels.num_labels:
        raise UserError(f"{where}: label {value!r} is outside 0..{labels.num_labels - 1}, the classes of this head")
    return int(value)


def texts_of(record: dict[str, Any], text_field: str, pair_field: str | None, source: str, row: int) -> list[str]:
    """The record's text (and pair): present, strings, not blank; else one line naming file, row and field."""
    texts = []
    for field, what in ((text_field, "text"), (pair_field, "text-pair")):
        if field is None:
            continue
        value = _value(record, field, source, row, what)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise UserError(f"{_where(source, row, field)}: the text is empty")
        if not isinstance(value, str):
            raise UserError(f"{_where(source, row, field)}: {type(value).__name__} {value!r} is not text")
        texts.append(value)
    return texts


def row_label(record: dict[str, Any], label_field: str, labels: Labels, source: str, row: int) -> float | int:
    """The head's target for one record's ``label_field`` (:func:`label_id`), the row named in any error."""
    return label_id(_value(record, label_field, source, row, "label"), labels, _where(source, row, label_field))


def check_rows(records: Sequence[dict[str, Any]], text_field: str, pair_field: str | None, label_field: str | None,
               labels: Labels | None, source: str) -> None:
    """Every row's texts and label, before any weights are read (what :func:`encode` would refuse)."""
    for i, rec in enumerate(records):
        texts_of(rec, text_field, pair_field, source, i)
        if label_field is not None and labels is not None:
            row_label(rec, label_field, labels, source, i)


@dataclass
class Row:
    """One tokenized example: ``features`` as the tokenizer returns them (ids, mask, token types) and the target."""

    features: dict[str, list[int]]
    label: float | int | None


def encode(records: Sequence[dict[str, Any]], tokenizer, text_field: str, pair_field: str | None,
           label_field: str | None, labels: Labels | None, max_length: int, source: str) -> list[Row]:
    """Tokenize (text, pair) per record, truncated to ``max_length``; labels mapped (None: no labels read)."""
    rows = []
    for i, rec in enumerate(records):
        texts = texts_of(rec, text_field, pair_field, source, i)
        features = dict(tokenizer(*texts, truncation=True, max_length=max_length))
        labelled = label_field is not None and labels is not None
        target = row_label(rec, label_field, labels, source, i) if labelled else None
        rows.append(Row({k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")},
                        target))
    if not rows:
        raise UserError(f"{source}: no rows to classify")
    return rows


def collate(rows: Sequence[Row], tokenizer, regression: bool) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids/attention_mask(/token_type_ids) (B, T) and labels (B,)."""
    batch = dict(tokenizer.pad([r.features for r in rows], return_tensors="pt"))
    if all(r.label is not None for r in rows):
        batch["labels"] = torch.tensor([r.label for r in rows], dtype=torch.float32 if regression else torch.long)
    return batch


@torch.no_grad()
def predict(model, rows: Sequence[Row], tokenizer, labels: Labels, batch_size: int, device: str,
            precision: str = "bf16") -> tuple[list[float | int], list[list[float]], float | None]:
    """(predicted class ids or values, logits per row, mean loss over labelled rows or None), in row order."""
    was_training = model.training
    model.eval()
    preds, logits, loss_sum, n = [], [], 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, tokenizer, labels.regression).items()}
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(**batch)
        z = out.logits.float()  # (B, num_labels)
        if "labels" in batch:
            loss_sum += float(out.loss) * len(chunk)
            n += len(chunk)
        logits += z.tolist()
        preds += z[:, 0].tolist() if labels.regression else z.argmax(-1).tolist()
    model.train(was_training)
    return preds, logits, (loss_sum / n if n else None)


def scores(preds: Sequence[float | int], gold: Sequence[float | int], labels: Labels) -> dict[str, float]:
    """Every metric of :mod:`qpissa.classify_metrics` that applies to this head."""
    from qpissa.classify_metrics import classification_scores, regression_scores

    if labels.regression:
        return regression_scores(preds, gold)
    return classification_scores([int(p) for p in preds], [int(g) for g in gold], labels.num_labels)
