"""The scores every scorer reports, in one shape: evaluate, finetune, compare, predict and the benchmarks.

Below every stage module in the import graph, so that fine-tuning and the
benchmarks score with the heads' keys without importing the evaluate stage.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)


def head_metrics(y_true, y_pred, scores, n_classes: int, top_k=(3, 5)) -> dict:
    """accuracy, mean per-class accuracy, top-k (only where k < classes), macro F1, n_test."""
    y_true = np.asarray(y_true)
    labels = np.arange(n_classes)
    m = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # Balanced accuracy is the mean over classes of per-class recall.
        "mean_class_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
    }
    for k in sorted(set(top_k)):
        if n_classes > k:
            m[f"top{k}_accuracy"] = float(top_k_accuracy_score(y_true, scores, k=k, labels=labels))
    m["macro_f1"] = float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    m["n_test"] = int(len(y_true))
    return m


def per_class_rows(head: str, y_true, y_pred, classes: list[str]) -> list[list]:
    """Rows head, class, support, accuracy (= recall), precision, f1."""
    labels = np.arange(len(classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return [
        [head, c, int(s[i]), round(float(r[i]), 6), round(float(p[i]), 6), round(float(f[i]), 6)]
        for i, c in enumerate(classes)
    ]
