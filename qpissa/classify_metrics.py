"""Classification and regression scores, and the metric GLUE reports for each of its tasks.

accuracy; macro-F1 (mean over classes of 2·TP / (2·TP + FP + FN), a class never predicted nor present
counts 0 as in scikit-learn's ``zero_division=0``); binary F1 of class 1 (GLUE's MRPC/QQP F1); Matthews
correlation, multiclass (Gorodkin's R_K, = scikit-learn's ``matthews_corrcoef``); Pearson r and Spearman
ρ (Pearson of average ranks, ties shared) for regression.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# the metric(s) each GLUE task reports (Wang et al. 2019, Table 1); the first one is the headline
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"), "mnli": ("accuracy",), "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",), "qnli": ("accuracy",), "rte": ("accuracy",), "wnli": ("accuracy",),
    "ax": ("matthews",),
}


def task_metrics(glue_task: str | None, regression: bool) -> tuple[str, ...]:
    """The headline metric(s): GLUE's for a GLUE subset name, else accuracy (classes) or Pearson (regression)."""
    if glue_task and glue_task.lower() in GLUE_METRICS:
        return GLUE_METRICS[glue_task.lower()]
    return ("pearson", "spearman") if regression else ("accuracy",)


def confusion(pred: Sequence[int], gold: Sequence[int], k: int) -> np.ndarray:
    """C[i, j] = number of rows with gold class i predicted as j; (k, k)."""
    c = np.zeros((k, k), dtype=np.int64)
    np.add.at(c, (np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return c


def matthews(c: np.ndarray) -> float:
    """Multiclass Matthews correlation from a confusion matrix (0 when a margin is constant)."""
    t, p = c.sum(axis=1).astype(float), c.sum(axis=0).astype(float)  # true / predicted counts per class
    n, correct = float(c.sum()), float(np.trace(c))
    den = math.sqrt((n * n - float(p @ p)) * (n * n - float(t @ t)))
    return 0.0 if den == 0 else (correct * n - float(t @ p)) / den


def classification_scores(pred: Sequence[int], gold: Sequence[int], num_labels: int) -> dict[str, float]:
    """accuracy, macro_f1, matthews (and f1 of class 1 for two classes)."""
    c = confusion(pred, gold, num_labels)
    tp = np.diag(c).astype(float)
    fp, fn = c.sum(axis=0) - tp, c.sum(axis=1) - tp
    den = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)
    out = {"accuracy": float(tp.sum() / c.sum()), "macro_f1": float(f1.mean()), "matthews": matthews(c)}
    if num_labels == 2:
        out["f1"] = float(f1[1])
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based; tied values share the mean of their ranks)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float(x @ x) * float(y @ y))
    return 0.0 if den == 0 else float(x @ y) / den


def regression_scores(pred: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """pearson, spearman, mse."""
    p, g = np.asarray(pred, dtype=float), np.asarray(gold, dtype=float)
    return {"pearson": pearson(p, g), "spearman": pearson(_ranks(p), _ranks(g)), "mse": float(((p - g) ** 2).mean())}
