"""Fine-tuning's own warm-start head: logistic regression on the cached features of its training part.

Fine-tuning does not start from the user's ``models/logreg``. That head
is trained on the whole train split, fine-tuning's validation slice included,
and its C is whatever ``heads.logreg.C`` chose: starting from it would make
fine-tuning re-run after every edit of ``heads.*``, and would let the slice
that picks the best epoch be scored by a head that had already seen it.

So fine-tuning fits its own head, in seconds, on the feature cache's rows of
the photos it trains on (never the validation slice), with C chosen by
stratified cross-validation over ``finetune.head_C`` on those photos, as the
heads choose theirs: epoch 0 is then a logistic regression of the user's
head's quality. Its scaler folds into the network's linear layer (the heads'
``to_torch_linear``), so epoch 0 of fine-tuning predicts exactly what this
head predicts. When no epoch beats it on the validation slice, the stage
refits the same head on the whole train split (:func:`fit_warm_start` on all
of it), so its model is never a head fitted on less data than the user's.

Example:
    >>> fs = open_cache("data/features/resnet50.h5")                                 # doctest: +SKIP
    >>> head = fit_warm_start(fs, train_rows, C=[0.01, 0.1, 1.0], seed=0, source="...")   # doctest: +SKIP
    >>> head.named_steps["clf"].C                                                    # doctest: +SKIP
    0.1
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.pipeline import Pipeline

from pipeline.config import HeadsConfig
from pipeline.config.checks import HEAD_KINDS
from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.extract.cache import FeatureSet
from pipeline.finetune.network import build_network
from pipeline.heads.batch import make_head
from pipeline.heads.registry import check_train_labels

HEAD = "logreg"
MAX_ITER = HEAD_KINDS[HEAD]["max_iter"]
CV_FOLDS = HeadsConfig.cv_folds  # heads.cv_folds's default: the guard's head is then the user's logreg


def cached_rows(fs: FeatureSet, rows: Sequence[Row], source) -> np.ndarray:
    """Indices into ``fs`` of ``rows``, refusing a cache that does not hold them as the manifest lists them.

    Raises:
        PipelineError: a row is missing from the cache or has another content
            hash there (the cache is older than the manifest).
    """
    index = {str(p): i for i, p in enumerate(fs.paths)}
    out = []
    for row in rows:
        i = index.get(row.path)
        if i is None or str(fs.sha256[i]) != row.sha256 or int(fs.labels[i]) != row.label:
            why = "does not hold" if i is None else "holds another version of"
            raise PipelineError(f"{source} {why} {row.path}; the cache is stale: run dvc repro")
        out.append(i)
    return np.asarray(out, dtype=np.int64)


def fit_warm_start(fs: FeatureSet, rows: Sequence[Row], *, C, seed: int, source) -> Pipeline:
    """Scaler + logistic regression fitted on the cached features of ``rows`` only, C by cross-validation.

    Args:
        fs: the feature cache, in memory.
        rows: the photos fine-tuning trains on (its validation slice excluded),
            or the whole train split for the guard's head.
        C: ``finetune.head_C``: a number, or candidates chosen among by
            stratified :data:`CV_FOLDS`-fold cross-validation on ``rows``.
        source: the cache's file name, for errors.

    Returns:
        the fitted ``Pipeline([("scale", ...), ("clf", ...)])``, the same shape
        as a user's head; its C is ``named_steps["clf"].C``.
    """
    idx = cached_rows(fs, rows, source)
    X, y = fs.features[idx], fs.labels[idx]
    check_train_labels(y, fs.classes, source)
    return make_head(HEAD, C=C, max_iter=MAX_ITER, cv_folds=CV_FOLDS, seed=seed, y=y).fit(X, y).best_estimator_


def keep_or_refit(net, best_epoch: int, fs: FeatureSet, rows: Sequence[Row], *, C, seed: int, source):
    """The model a fine-tuning run ends with: ``(network, what it is)``.

    The fine-tuned network where an epoch beat the warm start on validation;
    otherwise the guard's head: the warm start's logistic regression refit on
    ``rows`` (the whole train split), C by cross-validation again, on the
    same backbone. Fine-tuning then never ends below the user's logreg head
    for want of data or of a good C.
    """
    if best_epoch:
        return net, "fine-tuned"
    head = fit_warm_start(fs, rows, C=C, seed=seed, source=source)
    kept = f"logreg head (C={float(head.named_steps['clf'].C):g}, refit on all {len(rows)} train photos)"
    return build_network(net.features, head), kept
