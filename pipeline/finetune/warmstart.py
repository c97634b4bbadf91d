"""Fine-tuning's own warm-start head: logistic regression on the cached features of its training part.

Fine-tuning does not start from the user's ``models/logreg``. That head
is trained on the whole train split, fine-tuning's validation slice included,
and its C is whatever ``heads.logreg.C`` chose: starting from it would make
fine-tuning re-run after every edit of ``heads.*``, and would let the slice
that picks the best epoch be scored by a head that had already seen it.

So fine-tuning fits its own head, in seconds, on the feature cache's rows of
the photos it trains on (never the validation slice), with a fixed C
(``finetune.head_C``, chosen once and documented in params.yaml, not on these
photos). Its scaler folds into the network's linear layer (the heads'
``to_torch_linear``), so epoch 0 of fine-tuning predicts exactly what this
head predicts.

Example:
    >>> fs = open_cache("data/features/resnet50.h5")                        # doctest: +SKIP
    >>> head = fit_warm_start(fs, train_rows, C=0.1, seed=0, source="...")   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.extract.cache import FeatureSet
from pipeline.heads.registry import KINDS, check_train_labels

HEAD = "logreg"
MAX_ITER = 2000


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


def fit_warm_start(fs: FeatureSet, rows: Sequence[Row], *, C: float, seed: int, source) -> Pipeline:
    """Scaler + logistic regression (C fixed) fitted on the cached features of ``rows`` only.

    Args:
        fs: the feature cache, in memory.
        rows: the photos fine-tuning trains on (its validation slice excluded).
        C: ``finetune.head_C``.
        source: the cache's file name, for errors.

    Returns:
        the fitted ``Pipeline([("scale", ...), ("clf", ...)])``, the same shape as a user's head.
    """
    idx = cached_rows(fs, rows, source)
    X, y = fs.features[idx], fs.labels[idx]
    check_train_labels(y, fs.classes, source)
    clf = KINDS[HEAD].estimator(MAX_ITER, seed).set_params(C=float(C))
    return Pipeline([("scale", StandardScaler()), ("clf", clf)]).fit(X, y)
