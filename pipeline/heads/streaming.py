"""Linear heads on feature caches larger than memory (``heads.out_of_core: true``).

The in-memory heads (:mod:`pipeline.heads`) load the whole train split. Here
the cache is read ``chunk_rows`` rows at a time and never held whole:

1. one streaming pass reads labels and splits and fits the
   :class:`~sklearn.preprocessing.StandardScaler` with ``partial_fit`` on the
   train rows;
2. for each candidate ``C``, an :class:`~sklearn.linear_model.SGDClassifier`
   (``log_loss`` for ``logreg``, ``hinge`` for ``svm``, averaged SGD) learns
   with ``partial_fit`` over ``epochs`` passes on a stratified part of the
   train split; all candidates learn from the same reads;
3. a streaming pass scores them on the held-out rest (``val_fraction``); the
   best ``C`` is refitted on the whole train split for ``epochs`` passes.

``C`` means what it means for the in-memory heads: the objective
``C·Σ loss + ½‖w‖²`` divided by ``C·n`` is SGD's ``mean loss + α·½‖w‖²`` with
``α = 1 / (C·n)``, so the same ``heads.<name>.C`` grid applies.

Each training batch of at most ``chunk_rows`` rows is assembled from
``pieces`` contiguous ranges at random places in the file (and shuffled), so a
batch mixes classes although the manifest, and so the cache, is sorted by
class; every read is contiguous and at most ``chunk_rows`` rows. Peak memory is
about ``2 · chunk_rows · feature_dim · 4`` bytes plus one byte per row and a
label per row.

The result is scikit-learn's ``Pipeline([("scale", StandardScaler), ("clf",
SGDClassifier)])``, which :func:`~pipeline.heads.save_head`,
:func:`~pipeline.heads.load_head`, :func:`~pipeline.heads.scores` and
:func:`~pipeline.heads.to_torch_linear` take as they are. (With more than two
classes SGD's log-loss model is one-vs-rest: ``predict_proba`` normalises the
per-class sigmoids, so it differs from a softmax of the torch layer's logits,
while the predicted class is the same.)

Example:
    >>> search = fit_out_of_core("data/features/resnet50.h5", name="logreg",
    ...                          C=[0.01, 0.1, 1.0], chunk_rows=65536)   # doctest: +SKIP
    >>> fs = open_features("data/features/resnet50.h5")                  # doctest: +SKIP
    >>> y, pred, s = fs.predict(search.best_estimator_, "test")          # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.errors import PipelineError
from pipeline.extract.local import CHECKED_ATTRS, check_provenance
from pipeline.extract.ray_executor import check_shards

#: head name -> SGDClassifier loss: the out-of-core counterparts of the in-memory heads.
LOSSES = {"logreg": "log_loss", "svm": "hinge"}


# ---------------------------------------------------------------- reading


class StreamedFeatures:
    """A feature cache opened for chunked reading: like :class:`~pipeline.extract.local.FeatureSet`
    without the ``features`` array.

    ``labels``, ``splits`` and ``paths`` (one entry per row) are read on first
    use, ``chunk_rows`` at a time; features are only ever read in chunks.

    Args:
        path: the HDF5 cache (an ordinary or a virtual master file).
        chunk_rows: the most rows one read brings into memory.
    """

    def __init__(self, path: str | Path, chunk_rows: int = 65536):
        self.path = Path(path)
        self.chunk_rows = _check_chunk_rows(chunk_rows)
        with self._open() as h5:
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
            self.n, self.dim = h5["features"].shape
        self.classes = json.loads(self.attrs["classes"])
        self._cols: dict[str, np.ndarray] = {}

    def _open(self) -> h5py.File:
        if not self.path.is_file():
            raise PipelineError(f"feature cache {self.path} not found; run the extract stage first (dvc repro)")
        try:
            h5 = h5py.File(self.path, "r")
            for name in ("features", "labels", "splits", "paths"):
                h5[name]
        except (OSError, KeyError) as e:
            raise PipelineError(f"cannot read feature cache {self.path} ({e}); delete it and run dvc repro") from None
        try:
            check_shards(h5, self.path)  # a sharded (virtual) cache written by the ray engine
        except PipelineError:
            h5.close()
            raise
        return h5

    def ranges(self):
        """``(start, stop)`` of consecutive chunks covering the file."""
        for s in range(0, self.n, self.chunk_rows):
            yield s, min(s + self.chunk_rows, self.n)

    def _column(self, name: str) -> np.ndarray:
        if name not in self._cols:
            parts = []
            with self._open() as h5:
                ds = h5[name].asstr() if name in ("splits", "paths") else h5[name]
                for s, e in self.ranges():
                    parts.append(np.asarray(ds[s:e]))
            self._cols[name] = np.concatenate(parts) if parts else np.empty(0, dtype=object)
        return self._cols[name]

    @property
    def labels(self) -> np.ndarray:
        return self._column("labels")

    @property
    def splits(self) -> np.ndarray:
        return self._column("splits")

    @property
    def paths(self) -> np.ndarray:
        return self._column("paths")

    def mask(self, split: str) -> np.ndarray:
        """Boolean per row: is it in ``split``? Built chunk by chunk, one byte per row."""
        key = f"mask:{split}"
        if key not in self._cols:
            if "splits" in self._cols:
                self._cols[key] = self._cols["splits"] == split
            else:
                out = np.zeros(self.n, dtype=bool)
                with self._open() as h5:
                    ds = h5["splits"].asstr()
                    for s, e in self.ranges():
                        out[s:e] = np.asarray(ds[s:e]) == split
                self._cols[key] = out
        return self._cols[key]

    def labels_of(self, split: str) -> np.ndarray:
        return self.labels[self.mask(split)]

    def chunks(self, split: str):
        """Yield ``(X, y)`` of ``split``'s rows, in file order, at most ``chunk_rows`` rows per read."""
        mask, labels = self.mask(split), self.labels
        with self._open() as h5:
            feats = h5["features"]
            for s, e in self.ranges():
                m = mask[s:e]
                if m.any():
                    yield _checked(feats[s:e][m], self.path), labels[s:e][m]

    def predict(self, estimator, split: str = "test"):
        """Stream ``split`` through a fitted head.

        Returns:
            ``(y_true, y_pred, scores)``, what :func:`~pipeline.evaluate.head_metrics`
            takes; scores as by :func:`~pipeline.heads.scores`.
        """
        from pipeline.heads.batch import scores

        ys, preds, ss = [], [], []
        for X, y in self.chunks(split):
            ys.append(y)
            preds.append(estimator.predict(X))
            ss.append(scores(estimator, X))
        if not ys:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, len(self.classes)))
        return np.concatenate(ys), np.concatenate(preds), np.concatenate(ss)


def open_features(path: str | Path, expected: dict | None = None, chunk_rows: int = 65536) -> StreamedFeatures:
    """Open a feature cache for streaming, refusing one that does not match ``expected``.

    The out-of-core counterpart of :func:`~pipeline.extract.local.read_features`:
    same checks, nothing loaded yet.
    """
    fs = StreamedFeatures(path, chunk_rows)
    found = {k: fs.attrs.get(k) for k in CHECKED_ATTRS}
    found["classes"] = fs.classes
    check_provenance(found, expected or {}, f"feature cache {fs.path}")
    return fs


def _check_chunk_rows(chunk_rows) -> int:
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 2:
        raise PipelineError(f"heads.chunk_rows must be an integer of at least 2, found {chunk_rows!r}")
    return chunk_rows


def _checked(X: np.ndarray, path: Path) -> np.ndarray:
    # A virtual master whose shard is missing reads as NaN rows (its fill value).
    if not np.isfinite(X).all():
        raise PipelineError(
            f"feature cache {path} has rows that are NaN or infinite; a shard of a virtual cache "
            f"may be missing (see {path.stem}.shards/): run dvc repro (or dvc checkout) to restore it"
        )
    return X


# ---------------------------------------------------------------- training


@dataclass
class OutOfCoreSearch:
    """The outcome of :func:`fit_out_of_core`, in :class:`~sklearn.model_selection.GridSearchCV`'s
    shape so :func:`~pipeline.heads.save_head` saves it as it is.

    ``best_score_`` is the accuracy on the held-out part of the train split
    (NaN when a single C was given and nothing was held out).
    """

    best_estimator_: Pipeline
    best_params_: dict
    best_score_: float
    scores_: dict = field(default_factory=dict)  # C -> held-out accuracy
    n_train_: int = 0
    n_validation_: int = 0


def _sgd(loss: str, alpha: float, eta0: float, seed: int) -> SGDClassifier:
    # Averaged SGD with a constant step (Polyak-Ruppert averaging): converges far
    # closer to the exact optimum in a few epochs than scikit-learn's default
    # decaying "optimal" step, and is insensitive to the order of the batches.
    # Each step shrinks w by (1 - eta0·alpha): keep that factor positive under strong regularisation.
    eta0 = min(eta0, 0.5 / alpha)
    return SGDClassifier(
        loss=loss, penalty="l2", alpha=alpha, learning_rate="constant", eta0=eta0, average=True, random_state=seed
    )


def _holdout(labels: np.ndarray, train: np.ndarray, fraction: float, rng) -> np.ndarray:
    """Stratified: ``fraction`` of each class's train rows (at least one, never all)."""
    val = np.zeros(len(labels), dtype=bool)
    idx = np.flatnonzero(train)
    for c in np.unique(labels[idx]):
        rows = idx[labels[idx] == c]
        k = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        if k > 0:
            val[rng.choice(rows, size=k, replace=False)] = True
    return val


def _batches(fs: StreamedFeatures, use: np.ndarray, rng, pieces: int):
    """One epoch: batches of at most ``chunk_rows`` rows of ``use``, each from ``pieces`` random ranges."""
    step = max(1, fs.chunk_rows // pieces)
    starts = [s for s in range(0, fs.n, step) if use[s : s + step].any()]
    order = rng.permutation(len(starts))
    labels = fs.labels
    with fs._open() as h5:
        feats = h5["features"]
        for g in range(0, len(order), pieces):
            Xs, ys = [], []
            for k in order[g : g + pieces]:
                s = starts[k]
                m = use[s : s + step]
                Xs.append(_checked(feats[s : s + step][m], fs.path))
                ys.append(labels[s : s + step][m])
            X, y = np.concatenate(Xs), np.concatenate(ys)
            perm = rng.permutation(len(y))
            yield X[perm], y[perm]


def fit_out_of_core(
    features_file,
    *,
    name: str,
    C,
    epochs: int = 10,
    chunk_rows: int = 65536,
    seed: int = 0,
    val_fraction: float = 0.2,
    pieces: int = 8,
    expected: dict | None = None,
) -> OutOfCoreSearch:
    """Fit an out-of-core linear head on the train split of ``features_file``.

    Args:
        name: ``logreg`` (log-loss) or ``svm`` (hinge).
        C: a number or a list of candidates, as ``heads.<name>.C``.
        epochs: passes over the train rows per fit.
        chunk_rows: the most rows in memory at once (and per read).
        val_fraction: share of each class's train rows held out to choose C
            (only with several candidates).
        pieces: contiguous ranges a training batch is drawn from.

    Raises:
        PipelineError: bad settings, no train rows, a class without train rows.
    """
    from pipeline.heads.batch import check_head

    check_head(name)
    if name not in LOSSES:
        raise PipelineError(f"head '{name}' has no out-of-core version; accepted: {', '.join(LOSSES)}")
    grid = [C] if np.isscalar(C) else list(C)
    if not grid or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in grid):
        raise PipelineError(f"heads.{name}.C must be a positive number or a list of them, found {C!r}")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise PipelineError(f"heads.epochs must be a positive integer, found {epochs!r}")
    if not 0 < val_fraction < 1:
        raise PipelineError(f"the held-out fraction must be in (0, 1), found {val_fraction!r}")
    fs = open_features(features_file, expected, chunk_rows)
    rng = np.random.default_rng(seed)
    classes = np.arange(len(fs.classes))

    # Pass 1: the train rows, their labels, and the scaler.
    train = fs.mask("train")
    labels = fs.labels
    n_train = int(train.sum())
    if n_train == 0:
        raise PipelineError(f"{features_file} has no train rows; check the prepare stage's split")
    missing = sorted(set(classes) - set(np.unique(labels[train])))
    if missing:
        raise PipelineError(f"classes without training images in {features_file}: {[fs.classes[i] for i in missing]}")
    scaler = StandardScaler()
    for X, _ in fs.chunks("train"):
        scaler.partial_fit(X)

    # Step 1 / E‖x‖²: standardised features have E‖x‖² = number of non-constant features.
    eta0 = 1.0 / max(1, int(np.sum(scaler.var_ > 0)))

    def fit(Cs, use, n):
        clfs = [_sgd(LOSSES[name], 1.0 / (c * n), eta0, seed) for c in Cs]
        for _ in range(epochs):
            for X, y in _batches(fs, use, rng, pieces):
                X = scaler.transform(X)
                for clf in clfs:
                    clf.partial_fit(X, y, classes=classes)
        return clfs

    scores_: dict = {}
    n_val = 0
    best = grid[0]
    if len(grid) > 1:
        val = _holdout(labels, train, val_fraction, rng)
        fit_rows = train & ~val
        n_val = int(val.sum())
        clfs = fit(grid, fit_rows, int(fit_rows.sum()))
        correct = np.zeros(len(grid))
        with fs._open() as h5:
            feats = h5["features"]
            for s, e in fs.ranges():
                m = val[s:e]
                if m.any():
                    X = scaler.transform(_checked(feats[s:e][m], fs.path))
                    y = labels[s:e][m]
                    correct += [np.sum(clf.predict(X) == y) for clf in clfs]
        acc = correct / max(n_val, 1)
        scores_ = {float(c): float(a) for c, a in zip(grid, acc)}
        best = grid[int(np.argmax(acc))]  # the first of equals, as GridSearchCV
    clf = fit([best], train, n_train)[0]
    pipe = Pipeline([("scale", scaler), ("clf", clf)])
    return OutOfCoreSearch(
        best_estimator_=pipe,
        best_params_={"clf__C": float(best)},
        best_score_=scores_.get(float(best), float("nan")),
        scores_=scores_,
        n_train_=n_train,
        n_validation_=n_val,
    )


def train_head_out_of_core(
    *, name: str, features_file, models_dir, C, epochs: int, chunk_rows: int, seed: int, report_path=None
) -> dict:
    """The ``train_heads`` stage for one head when ``heads.out_of_core`` is true.

    Returns:
        ``{"best_C", "cv_accuracy", "n_train"}`` as :func:`~pipeline.heads.train_head`
        (``cv_accuracy`` is the held-out accuracy that chose C), also written to
        ``report_path``.
    """
    from pipeline.fileio import write_json
    from pipeline.heads.batch import save_head

    search = fit_out_of_core(features_file, name=name, C=C, epochs=epochs, chunk_rows=chunk_rows, seed=seed)
    fs = open_features(features_file, chunk_rows=chunk_rows)
    save_head(Path(models_dir) / f"{name}.joblib", search, {k: fs.attrs[k] for k in CHECKED_ATTRS}, fs.classes)
    acc = search.best_score_
    summary = {
        "best_C": float(search.best_params_["clf__C"]),
        "cv_accuracy": round(float(acc), 6) if np.isfinite(acc) else None,
        "n_train": int(search.n_train_),
    }
    how = (f"held-out accuracy {acc:.4f} on {search.n_validation_} images" if np.isfinite(acc)
           else "the only candidate")
    print(
        f"train_heads: {name} (out of core, SGD, {epochs} epochs, {chunk_rows} rows per chunk): "
        f"C={summary['best_C']:g}, {how}; trained on {summary['n_train']} images",
        flush=True,
    )
    if report_path:
        write_json(report_path, {name: summary})
    return summary
