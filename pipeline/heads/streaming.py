"""The streaming heads, for feature caches larger than memory (``heads.out_of_core: true``).

:class:`StreamingHead` is fed a cache opened with
``open_cache(path, stream=True, chunk_rows=...)`` and never holds it whole:

1. one streaming pass over the train rows fits the
   :class:`~sklearn.preprocessing.StandardScaler` with ``partial_fit``;
2. for each candidate ``C``, an :class:`~sklearn.linear_model.SGDClassifier`
   (the head's ``streaming_loss`` in the registry: ``log_loss`` for
   ``logreg``, ``hinge`` for ``svm``; averaged SGD) learns with
   ``partial_fit`` over ``epochs`` passes on the train rows less a stratified
   hold-out (:func:`~pipeline.data.manifest.stratified_holdout`); all
   candidates learn from the same reads;
3. a streaming pass scores them on the hold-out; the best ``C`` (the first of
   equals, as ``GridSearchCV``) is refitted on the whole train split.

``C`` means what it means for the in-memory heads: the objective
``C·Σ loss + ½‖w‖²`` divided by ``C·n`` is SGD's ``mean loss + α·½‖w‖²`` with
``α = 1 / (C·n)``, so the same ``heads.<name>.C`` grid applies.

Each training batch of at most ``chunk_rows`` rows is assembled from
``pieces`` contiguous ranges at random places in the file (and shuffled), so a
batch mixes classes although the manifest, and so the cache, is sorted by
class; every read is contiguous and at most ``chunk_rows`` rows. Peak memory is
about ``2 · chunk_rows · feature_dim · 4`` bytes plus the cache's per-row
columns (labels, splits).

The fitted head's ``best_estimator_`` is scikit-learn's ``Pipeline([("scale",
StandardScaler), ("clf", SGDClassifier)])``, the shape of the in-memory heads,
so :mod:`pipeline.heads.model` saves, loads, scores and folds it as it is.
(With more than two classes SGD's log-loss model is one-vs-rest:
``predict_proba`` normalises the per-class sigmoids, so it differs from a
softmax of the torch layer's logits, while the predicted class is the same.)

Example:
    >>> fs = open_cache("data/features/resnet50.h5", stream=True, chunk_rows=65536)   # doctest: +SKIP
    >>> head = StreamingHead("logreg", C=[0.01, 0.1, 1.0]).fit(fs)                      # doctest: +SKIP
    >>> y, pred, s = fs.predict(head.best_estimator_, "test", scores)                   # doctest: +SKIP
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from pipeline.config.checks import check_grid
from pipeline.data.manifest import stratified_holdout
from pipeline.errors import PipelineError
from pipeline.extract.cache import StreamedFeatures
from pipeline.heads.registry import KINDS, check_kind, check_train_labels


def _whole(value, lo: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= lo


class StreamingHead(ClassifierMixin, BaseEstimator):
    """A linear head learned by averaged SGD over a streamed cache, C chosen on a hold-out.

    Args:
        name: a kind of head (``logreg`` or ``svm``, :data:`~pipeline.heads.registry.KINDS`);
            its ``streaming_loss`` is used.
        C: a number or a list of candidates, as a head's ``C``.
        epochs: passes over the train rows per fit.
        seed: the hold-out and the order of the batches.
        val_fraction: share of each class's train rows held out to choose C
            (only with several candidates).
        pieces: contiguous ranges a training batch is drawn from.

    Attributes:
        best_estimator_: the ``Pipeline(scale, clf)`` refitted on the whole train split.
        best_params_: ``{"clf__C": C}``, as ``GridSearchCV``.
        best_score_: held-out accuracy of the chosen C (NaN when a single C was
            given and nothing was held out).
        scores_: C -> held-out accuracy.
        n_train_, n_validation_: train rows, and how many of them were held out.
        classes_: the class indices.
    """

    def __init__(self, name: str = "logreg", C=1.0, epochs: int = 10, seed: int = 0,
                 val_fraction: float = 0.2, pieces: int = 8):
        self.name = name
        self.C = C
        self.epochs = epochs
        self.seed = seed
        self.val_fraction = val_fraction
        self.pieces = pieces

    def fit(self, features: StreamedFeatures, y=None) -> StreamingHead:
        """Learn from the train rows of ``features`` (labels come from the cache; ``y`` is ignored).

        Raises:
            PipelineError: bad settings, no train rows, a class without train rows.
        """
        check_kind(self.name)
        grid = check_grid(self.name, self.C)
        if not _whole(self.epochs, 1):
            raise PipelineError(f"heads.epochs must be a positive integer, found {self.epochs!r}")
        if not 0 < self.val_fraction < 1:
            raise PipelineError(f"the held-out fraction must be in (0, 1), found {self.val_fraction!r}")
        if not _whole(self.pieces, 1):
            raise PipelineError(f"pieces must be a positive integer, found {self.pieces!r}")
        fs = features
        train, labels = fs.mask("train"), fs.labels
        check_train_labels(labels[train], fs.classes, fs.path)
        self.classes_ = np.arange(len(fs.classes))

        scaler = StandardScaler()
        for X, _ in fs.chunks("train"):
            scaler.partial_fit(X)
        # Step 1 / E‖x‖²: standardised features have E‖x‖² = number of non-constant features.
        eta0 = 1.0 / max(1, int(np.sum(scaler.var_ > 0)))
        rng = np.random.default_rng(self.seed)

        def fit(Cs, use):
            n = int(use.sum())
            clfs = [_sgd(KINDS[self.name].streaming_loss, 1.0 / (c * n), eta0, self.seed) for c in Cs]
            for _ in range(self.epochs):
                for X, y_ in _batches(fs, use, rng, self.pieces):
                    X = scaler.transform(X)
                    for clf in clfs:
                        clf.partial_fit(X, y_, classes=self.classes_)
            return clfs

        self.scores_, self.n_validation_, best = {}, 0, grid[0]
        if len(grid) > 1:
            val = self._holdout(train, labels)
            clfs = fit(grid, train & ~val)
            correct = np.zeros(len(grid))
            for X, y_ in _rows(fs, val):
                X = scaler.transform(X)
                correct += [np.sum(clf.predict(X) == y_) for clf in clfs]
            self.n_validation_ = int(val.sum())
            acc = correct / self.n_validation_
            self.scores_ = {float(c): float(a) for c, a in zip(grid, acc)}
            best = grid[int(np.argmax(acc))]  # the first of equals, as GridSearchCV
        self.best_estimator_ = Pipeline([("scale", scaler), ("clf", fit([best], train)[0])])
        self.best_params_ = {"clf__C": float(best)}
        self.best_score_ = self.scores_.get(float(best), float("nan"))
        self.n_train_ = int(train.sum())
        return self

    def _holdout(self, train: np.ndarray, labels: np.ndarray) -> np.ndarray:
        # Keyed by row index, not path: the cache is in manifest order, and no
        # per-row strings need to be held in memory.
        rows = np.flatnonzero(train)
        held = stratified_holdout(rows.tolist(), labels[rows].tolist(), self.val_fraction, self.seed)
        val = np.zeros(len(train), dtype=bool)
        val[rows[held]] = True
        return val

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.predict(X)

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.decision_function(X)

    @available_if(lambda self: hasattr(getattr(self, "best_estimator_", None), "predict_proba"))
    def predict_proba(self, X) -> np.ndarray:
        return self.best_estimator_.predict_proba(X)


def _sgd(loss: str, alpha: float, eta0: float, seed: int) -> SGDClassifier:
    # Averaged SGD with a constant step (Polyak-Ruppert averaging): converges far
    # closer to the exact optimum in a few epochs than scikit-learn's default
    # decaying "optimal" step, and is insensitive to the order of the batches.
    # Each step shrinks w by (1 - eta0·alpha): keep that factor positive under strong regularisation.
    eta0 = min(eta0, 0.5 / alpha)
    return SGDClassifier(
        loss=loss, penalty="l2", alpha=alpha, learning_rate="constant", eta0=eta0, average=True, random_state=seed
    )


def _rows(fs: StreamedFeatures, use: np.ndarray):
    """``(X, y)`` of the rows in ``use``, in file order, one contiguous read of at most ``chunk_rows`` each."""
    labels = fs.labels
    for s, e in fs.ranges():
        m = use[s:e]
        if m.any():
            yield fs.read(s, e)[m], labels[s:e][m]


def _batches(fs: StreamedFeatures, use: np.ndarray, rng, pieces: int):
    """One epoch: batches of at most ``chunk_rows`` rows of ``use``, each from ``pieces`` random ranges."""
    step = max(1, fs.chunk_rows // pieces)
    starts = [s for s in range(0, fs.n, step) if use[s : s + step].any()]
    order = rng.permutation(len(starts))
    labels = fs.labels
    for g in range(0, len(order), pieces):
        Xs, ys = [], []
        for k in order[g : g + pieces]:
            s, e = starts[k], min(starts[k] + step, fs.n)
            m = use[s:e]
            Xs.append(fs.read(s, e)[m])
            ys.append(labels[s:e][m])
        X, y = np.concatenate(Xs), np.concatenate(ys)
        perm = rng.permutation(len(y))
        yield X[perm], y[perm]
