"""The kinds of head by name: the code behind each ``kind`` a head declaration names.

The heads themselves are data: ``heads.train`` in params.yaml declares each
head by name (``logreg: {kind: logreg, C: [...]}``); dvc.yaml's ``foreach``
and :mod:`pipeline.config` read that one declaration, and neither imports
this module. Here each kind gives the in-memory estimator (fitted on the whole
train split, C chosen by cross-validation) and the loss of its streaming
counterpart (``heads.out_of_core``). The kinds' default C grid and iteration
cap are params defaults, so they live with the params checks
(:data:`pipeline.config.checks.HEAD_KINDS`; a test checks that both list the
same kinds).

To add a kind: one entry here and its defaults in ``HEAD_KINDS``. To add a
head of an existing kind: one entry under ``heads.train`` in params.yaml.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class KindSpec:
    estimator: Callable[[int, int], object]  # (max_iter, seed) -> unfitted scikit-learn classifier
    streaming_loss: str  # SGDClassifier loss of the out-of-core counterpart
    description: str


# scikit-learn is imported when a head is built, not with this module: the
# stages that only read a head's file would otherwise pay about a second for
# scikit-learn and SciPy at start-up.
def _logreg(max_iter: int, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=max_iter, random_state=seed)


def _linear_svc(max_iter: int, seed: int):
    from sklearn.svm import LinearSVC

    return LinearSVC(max_iter=max_iter, random_state=seed)


KINDS: dict[str, KindSpec] = {
    "logreg": KindSpec(_logreg, "log_loss", "logistic regression"),
    "svm": KindSpec(_linear_svc, "hinge", "linear SVM"),
}


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise PipelineError(f"unknown head kind '{kind}'; accepted: {', '.join(KINDS)}")
    return kind


def check_train_labels(y: np.ndarray, classes: list[str], source) -> None:
    """Refuse to fit a head on no train rows, or with a class that has none."""
    if len(y) == 0:
        raise PipelineError(f"{source} has no train rows; check the prepare stage's split")
    missing = sorted(set(range(len(classes))) - set(np.unique(y).tolist()))
    if missing:
        raise PipelineError(f"classes without training images in {source}: {[classes[i] for i in missing]}")
