"""The heads by name: the one place a head is declared.

Each entry gives the in-memory estimator (fitted on the whole train split,
C chosen by cross-validation), the loss of its streaming counterpart
(``heads.out_of_core``), and the defaults of its ``heads.<name>`` params
section. ``dvc.yaml``'s ``foreach`` lists the same names (a test checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class HeadSpec:
    estimator: Callable[[int, int], object]  # (max_iter, seed) -> unfitted scikit-learn classifier
    streaming_loss: str  # SGDClassifier loss of the out-of-core counterpart
    C: tuple[float, ...]  # default grid of inverse regularisation strengths
    max_iter: int
    description: str


HEADS: dict[str, HeadSpec] = {
    "logreg": HeadSpec(
        lambda max_iter, seed: LogisticRegression(max_iter=max_iter, random_state=seed),
        "log_loss", (0.01, 0.1, 1.0), 2000, "logistic regression",
    ),
    "svm": HeadSpec(
        lambda max_iter, seed: LinearSVC(max_iter=max_iter, random_state=seed),
        "hinge", (0.00001, 0.0001, 0.001, 0.01), 10000, "linear SVM",
    ),
}


def check_head(name: str) -> str:
    if name not in HEADS:
        raise PipelineError(f"unknown head '{name}'; accepted: {', '.join(HEADS)}")
    return name
