"""What differs between a causal-LM run and a classification run inside the one training loop (:func:`fit`).

A task supplies the shuffled global micro-batches (resumable from a :class:`~qpissa.data.DataPosition`), the
number of loss units in a batch — response tokens for a causal LM (its loss is a mean over them), labelled rows
for a classifier (a mean over rows) — so that ``fit`` weights every micro-batch's mean loss by its share of the
step's units and the step's gradient is the mean over the whole global batch, and the held-out metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Protocol, Sequence

import torch

from qpissa.data import DataPosition, Example, batches, shuffled_batches


class Task(Protocol):
    """What :func:`qpissa.train.loop.fit` asks of a task (:class:`CausalTask`, :class:`ClassificationTask`,
    :class:`qpissa.train.preference.PreferenceTask`, which also has ``forward``, ``prepare`` and ``__len__``)."""

    name: Any
    config_extra: Any

    def stream(self, batch_size: int, seed: int, pos: DataPosition) -> Iterator[tuple[dict[str, torch.Tensor], DataPosition]]: ...

    def units(self, batch: dict[str, torch.Tensor]) -> int: ...

    def __len__(self) -> int: ...  # training rows: --epochs counts steps from it

    def has_eval(self) -> bool: ...

    def evaluate(self, model, device: str) -> dict[str, float]: ...


@dataclass
class CausalTask:
    """Next-token CE on the response tokens (``--task causal-lm``); held-out: mean CE."""

    examples: list[Example]
    eval_examples: list[Example]
    pad_id: int
    batch_size: int  # held-out batch size
    precision: str = "bf16"
    name: ClassVar[str] = "causal-lm"

    @property
    def config_extra(self) -> dict[str, Any]:
        """What RUN/config.json records besides the options: nothing for a causal LM."""
        return {}

    def __len__(self) -> int:
        return len(self.examples)

    def stream(self, batch_size: int, seed: int, pos: DataPosition) -> Iterator[tuple[dict[str, torch.Tensor], DataPosition]]:
        return batches(self.examples, batch_size, seed, self.pad_id, pos)

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())  # response tokens the shifted CE averages over

    def has_eval(self) -> bool:
        return bool(self.eval_examples)

    def evaluate(self, model, device: str) -> dict[str, float]:
        from qpissa.train.metrics import evaluate_loss

        return {"eval_loss": evaluate_loss(model, self.eval_examples, self.batch_size, self.pad_id, device,
                                           self.precision)}


@dataclass
class ClassificationTask:
    """CE over labels (MSE for regression, ``--num-labels 1``) of a sequence-classification head; held-out: loss
    and the GLUE metrics (:func:`qpissa.classify.scores`)."""

    rows: Sequence[Any]  # qpissa.classify.Row
    held: Sequence[Any]
    tokenizer: Any
    labels: Any  # qpissa.classify.Labels
    batch_size: int
    precision: str = "bf16"
    name: ClassVar[str] = "classification"

    @property
    def config_extra(self) -> dict[str, Any]:
        """The label map ``qpissa eval --task classification`` reads back from RUN/config.json."""
        return {"id2label": self.labels.id2label, "labels_from_strings": self.labels.from_strings}

    def __len__(self) -> int:
        return len(self.rows)

    def stream(self, batch_size: int, seed: int, pos: DataPosition) -> Iterator[tuple[dict[str, torch.Tensor], DataPosition]]:
        from qpissa.classify import collate as collate_rows

        return shuffled_batches(self.rows, batch_size, seed, pos,
                                lambda chunk: collate_rows(chunk, self.tokenizer, self.labels.regression))

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])  # rows: the head's loss is a mean over them

    def has_eval(self) -> bool:
        return bool(self.held)

    def evaluate(self, model, device: str) -> dict[str, float]:
        from qpissa.classify import predict, scores

        preds, _, loss = predict(model, self.held, self.tokenizer, self.labels, self.batch_size, device, self.precision)
        return {"eval_loss": loss, **{f"eval_{k}": v for k, v in scores(preds, [r.label for r in self.held],
                                                                         self.labels).items()}}
