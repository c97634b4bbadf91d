"""Classifier heads trained on cached features, in the scikit-learn manner.

Each head is scikit-learn's own ``Pipeline(StandardScaler, estimator)``, with C
chosen by stratified cross-validation on the train split. A saved head carries
the provenance of the features it was trained on, and loading refuses a head
whose backbone, weights, transform or classes differ from the current ones.

Only load head files this project wrote: joblib files are pickles, and
unpickling a file from elsewhere can run arbitrary code.
"""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from pipeline.errors import PipelineError
from pipeline.extract.local import check_provenance
from pipeline.fileio import atomic_path


def _logreg(max_iter: int, seed: int):
    return LogisticRegression(max_iter=max_iter, random_state=seed)


def _svm(max_iter: int, seed: int):
    return LinearSVC(max_iter=max_iter, random_state=seed)


#: name -> builder(max_iter, seed) of the final estimator; the scaler is added in front.
HEADS = {"logreg": _logreg, "svm": _svm}


def check_head(name: str) -> str:
    if name not in HEADS:
        raise PipelineError(f"unknown head '{name}'; accepted: {', '.join(HEADS)}")
    return name


def make_head(name: str, *, C, max_iter: int = 2000, cv_folds: int = 5, seed: int = 0, y=None) -> GridSearchCV:
    """An unfitted head: scaler + estimator, C picked by stratified CV.

    Args:
        C: a number or a list of candidate inverse regularisation strengths.
        y: the training labels, if known, to shrink ``cv_folds`` for classes
            with fewer examples than folds.
    """
    check_head(name)
    grid = [C] if np.isscalar(C) else list(C)
    if not grid or not all(isinstance(c, (int, float)) and c > 0 for c in grid):
        raise PipelineError(f"heads.{name}.C must be a positive number or a list of them, found {C!r}")
    folds = int(cv_folds)
    if y is not None:
        folds = min(folds, int(np.bincount(np.asarray(y)).min(initial=folds) or folds))
    if folds < 2:
        raise PipelineError(
            f"cross-validation needs at least 2 training images per class; found a class with {folds}"
        )
    pipe = Pipeline([("scale", StandardScaler()), ("clf", HEADS[name](max_iter, seed))])
    return GridSearchCV(
        pipe,
        {"clf__C": grid},
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        scoring="accuracy",
        refit=True,
        n_jobs=1,
    )


def scores(estimator, X) -> np.ndarray:
    """Per-class scores (N, n_classes) for ranking: probabilities or decision values."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    s = estimator.decision_function(X)
    if s.ndim == 1:  # binary: one column is the second class's margin
        s = np.stack([-s, s], axis=1)
    return s


def save_head(path: str | Path, search: GridSearchCV, provenance: dict, classes: list[str]) -> None:
    """Save the refitted best pipeline with what it was trained on."""
    bundle = {
        "estimator": search.best_estimator_,
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
        expected: provenance keys (backbone, weights, weights_sha256, transform)
            and ``classes`` that the head must match.
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


def train_head(
    *, name: str, features_file, models_dir, C, max_iter: int, cv_folds: int, seed: int, report_path=None,
    out_of_core: bool = False, chunk_rows: int = 65536, epochs: int = 10,
) -> dict:
    """The ``train_heads`` stage for one head: fit it on the train split and save it.

    Returns:
        ``{"best_C", "cv_accuracy", "n_train"}``, also written to ``report_path``.
    """
    from pipeline.extract.local import CHECKED_ATTRS, read_features
    from pipeline.fileio import write_json

    check_head(name)
    if out_of_core:  # features larger than memory: SGD over HDF5 chunks (max_iter, cv_folds unused)
        from pipeline.heads.streaming import train_head_out_of_core

        return train_head_out_of_core(name=name, features_file=features_file, models_dir=models_dir, C=C,
                                      epochs=epochs, chunk_rows=chunk_rows, seed=seed, report_path=report_path)
    fs = read_features(features_file)
    X, y = fs.subset("train")
    if len(y) == 0:
        raise PipelineError(f"{features_file} has no train rows; check the prepare stage's split")
    missing = sorted(set(range(len(fs.classes))) - set(np.unique(y)))
    if missing:
        raise PipelineError(
            f"classes without training images in {features_file}: {[fs.classes[i] for i in missing]}"
        )
    search = make_head(name, C=C, max_iter=max_iter, cv_folds=cv_folds, seed=seed, y=y)
    search.fit(X, y)
    save_head(Path(models_dir) / f"{name}.joblib", search, {k: fs.attrs[k] for k in CHECKED_ATTRS}, fs.classes)
    summary = {
        "best_C": float(search.best_params_["clf__C"]),
        "cv_accuracy": round(float(search.best_score_), 6),
        "n_train": int(len(y)),
    }
    print(
        f"train_heads: {name}: C={summary['best_C']:g} chosen by {search.n_splits_}-fold CV "
        f"(accuracy {summary['cv_accuracy']:.4f}) on {len(y)} images",
        flush=True,
    )
    if report_path:
        # Keyed by head so `dvc metrics show` gives logreg.best_C, svm.best_C columns.
        write_json(report_path, {name: summary})
    return summary


def to_torch_linear(estimator):
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
