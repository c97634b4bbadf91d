"""A fitted head, either kind: its scores, its torch layer, and its file.

Both kinds of head end as the same scikit-learn ``Pipeline([("scale",
StandardScaler), ("clf", linear classifier)])``, so everything here serves
both. A saved head carries the provenance of the features it was trained on,
and loading refuses a head whose backbone, weights, transform, decoder,
precision or classes differ from the current ones.

Only load head files this project wrote: joblib files are pickles, and
unpickling a file from elsewhere can run arbitrary code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import joblib
import numpy as np
import sklearn

from pipeline.errors import PipelineError
from pipeline.extract.cache import check_provenance
from pipeline.fileio import atomic_path

if TYPE_CHECKING:
    import torch


def scores(estimator, X) -> np.ndarray:
    """Per-class scores (N, n_classes) for ranking: probabilities or decision values."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    s = estimator.decision_function(X)
    if s.ndim == 1:  # binary: one column is the second class's margin
        s = np.stack([-s, s], axis=1)
    return s


def head_path(models_dir: str | Path, name: str) -> Path:
    """Where the head ``name`` is saved: ``models/<name>.joblib``."""
    return Path(models_dir) / f"{name}.joblib"


def save_head(path: str | Path, search, provenance: dict, classes: list[str], kind: str = "") -> None:
    """Save the refitted best pipeline with what it was trained on.

    Args:
        search: a fitted ``GridSearchCV`` (:func:`~pipeline.heads.batch.make_head`)
            or :class:`~pipeline.heads.streaming.StreamingHead`: both have
            ``best_estimator_``, ``best_params_`` and ``best_score_``.
    """
    bundle = {
        "estimator": search.best_estimator_,
        "kind": kind,
        "classes": list(classes),
        "provenance": dict(provenance),
        "best_C": float(search.best_params_["clf__C"]),
        "cv_accuracy": float(search.best_score_),
        "sklearn_version": sklearn.__version__,
    }
    with atomic_path(path, suffix=".joblib") as tmp:
        joblib.dump(bundle, tmp)


def load_head(path: str | Path, expected: dict | None = None) -> dict:
    """Load a head saved by :func:`save_head`, refusing a stale one.

    Args:
        expected: provenance keys (``CHECKED_ATTRS`` of the feature cache) and
            ``classes`` that the head must match.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"head {path} not found; run the train_heads stage first (dvc repro)")
    bundle = joblib.load(path)
    if not isinstance(bundle, dict) or "estimator" not in bundle:
        raise PipelineError(f"{path} is not a head saved by this project")
    found = dict(bundle["provenance"], classes=bundle["classes"])
    check_provenance(found, expected or {}, f"head {path}")
    return bundle


def to_torch_linear(estimator) -> torch.nn.Linear:
    """The fitted scaler + linear classifier as one ``torch.nn.Linear``.

    ``StandardScaler`` followed by ``w·x + b`` is itself linear, so it folds into
    weights ``w / scale`` and bias ``b - w·(mean / scale)``. A binary head's single
    margin ``z`` becomes two logits ``(0, z)``: their softmax equals scikit-learn's
    ``predict_proba`` for logistic regression, and their argmax its prediction.

    Args:
        estimator: a fitted ``Pipeline([("scale", StandardScaler), ("clf", linear)])``.

    Returns:
        ``nn.Linear(D, n_classes)`` in float32, so a backbone's features can be
        fed straight into it (fine-tuning starts here; visualisation
        differentiates through it).
    """
    # torch is imported by the callers that need a layer (fine-tuning, a
    # bundle's network); the heads' own stages never load it (seconds of start-up).
    import torch

    scaler, clf = estimator.named_steps["scale"], estimator.named_steps["clf"]
    mean = np.zeros(clf.coef_.shape[1]) if scaler.mean_ is None else scaler.mean_
    scale = np.ones_like(mean) if scaler.scale_ is None else scaler.scale_
    w = clf.coef_ / scale
    b = clf.intercept_ - w @ mean
    if w.shape[0] == 1:
        w = np.concatenate([np.zeros_like(w), w])
        b = np.concatenate([np.zeros_like(b), b])
    layer = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w).float())
        layer.bias.copy_(torch.from_numpy(b).float())
    return layer
