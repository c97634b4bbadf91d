"""The in-memory heads: the whole train split in memory, C chosen by cross-validation.

Each head is scikit-learn's own ``Pipeline(StandardScaler, estimator)`` (the
estimator from :data:`~pipeline.heads.registry.KINDS`) inside a
``GridSearchCV`` over the head's C grid with stratified, shuffled folds.

Example:
    >>> search = make_head("logreg", C=[0.01, 0.1, 1.0], y=y).fit(X, y)   # doctest: +SKIP
    >>> search.best_params_["clf__C"], search.best_estimator_             # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.config.checks import check_grid
from pipeline.errors import PipelineError
from pipeline.heads.registry import KINDS, check_kind


def make_head(kind: str, *, C, max_iter: int = 2000, cv_folds: int = 5, seed: int = 0, y=None) -> GridSearchCV:
    """An unfitted head: scaler + estimator, C picked by stratified CV.

    Args:
        kind: a kind of :data:`~pipeline.heads.registry.KINDS` (``logreg``, ``svm``).
        C: a number or a list of candidate inverse regularisation strengths.
        y: the training labels, if known, to shrink ``cv_folds`` for classes
            with fewer examples than folds.
    """
    check_kind(kind)
    grid = check_grid(kind, C)
    folds = int(cv_folds)
    if y is not None:
        folds = min(folds, int(np.bincount(np.asarray(y)).min(initial=folds) or folds))
    if folds < 2:
        raise PipelineError(
            f"cross-validation needs at least 2 training images per class; found a class with {folds}"
        )
    pipe = Pipeline([("scale", StandardScaler()), ("clf", KINDS[kind].estimator(max_iter, seed))])
    return GridSearchCV(
        pipe,
        {"clf__C": grid},
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        scoring="accuracy",
        refit=True,
        n_jobs=1,
    )
