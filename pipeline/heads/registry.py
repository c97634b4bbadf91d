"""The heads by name: the one place a head is declared.

Each entry gives the in-memory estimator (fitted on the whole train split,
C chosen by cross-validation), the loss of its streaming counterpart
(``heads.out_of_core``), and the defaults of its ``heads.<name>`` params
section. Everything else derives its list of heads from :data:`HEADS`:
the ``train_heads`` stage, ``pipeline.config``, ``predict --model`` and
``dvc.yaml``'s ``foreach`` (a test checks the last).

To add a head: one entry here, its ``heads.<name>`` section in params.yaml,
and its name in ``dvc.yaml``'s ``foreach``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class HeadSpec:
    estimator: Callable[[int, int], object]  # (max_iter, seed) -> unfitted scikit-learn classifier
    streaming_loss: str  # SGDClassifier loss of the out-of-core counterpart
    C: tuple[float, ...]  # default grid of inverse regularisation strengths
    max_iter: int
    description: str


# scikit-learn is imported when a head is built, not with this module: the
# params checks import it, and every stage (extract's start-up above all)
# would otherwise pay about a second for scikit-learn and SciPy.
def _logreg(max_iter: int, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=max_iter, random_state=seed)


def _linear_svc(max_iter: int, seed: int):
    from sklearn.svm import LinearSVC

    return LinearSVC(max_iter=max_iter, random_state=seed)


HEADS: dict[str, HeadSpec] = {
    "logreg": HeadSpec(
        _logreg,
        "log_loss", (0.01, 0.1, 1.0), 2000, "logistic regression",
    ),
    "svm": HeadSpec(
        _linear_svc,
        "hinge", (0.00001, 0.0001, 0.001, 0.01), 10000, "linear SVM",
    ),
}


def check_head(name: str) -> str:
    if name not in HEADS:
        raise PipelineError(f"unknown head '{name}'; accepted: {', '.join(HEADS)}")
    return name


def check_grid(name: str, C) -> list:
    """``heads.<name>.C`` as a list of candidates: a positive number or a non-empty list of them."""
    grid = [C] if np.isscalar(C) else list(C)
    if not grid or not all(isinstance(c, numbers.Real) and not isinstance(c, bool) and c > 0 for c in grid):
        raise PipelineError(f"heads.{name}.C must be a positive number or a list of them, found {C!r}")
    return grid


def check_train_labels(y: np.ndarray, classes: list[str], source) -> None:
    """Refuse to fit a head on no train rows, or with a class that has none."""
    if len(y) == 0:
        raise PipelineError(f"{source} has no train rows; check the prepare stage's split")
    missing = sorted(set(range(len(classes))) - set(np.unique(y).tolist()))
    if missing:
        raise PipelineError(f"classes without training images in {source}: {[classes[i] for i in missing]}")
