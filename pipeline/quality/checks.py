"""The three checks, on feature rows: label issues, near-duplicates (and leaks), outliers.

Each returns :class:`Suspect` records that point at rows of the cache; the
stage turns them into paths and pictures (:mod:`pipeline.quality.stage`).

Example:
    >>> nb = nearest(normalise(X), 10)                                     # doctest: +SKIP
    >>> label_issues(X, y, folds=5, C=0.01, seed=0)                        # doctest: +SKIP
    >>> duplicates(nb, splits, labels, sizes, 0.9) + outliers(nb, 2.0)[0]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.heads.batch import make_head
from pipeline.quality.knn import Neighbours


@dataclass(frozen=True)
class Suspect:
    """One suspect photo.

    Attributes:
        row: its row in the feature cache (and the manifest).
        kind: one of :data:`pipeline.quality.suspects.KINDS`.
        score: the higher, the more suspect: 1 - cleanlab's label quality
            (label_issue), cosine similarity to the partner (near_duplicate,
            train_test_leak), robust SDs below the median neighbour similarity (outlier).
        suggested: the class index the evidence points to, where there is one.
        partner: for a duplicate or leak, the row of the copy that is kept.
    """

    row: int
    kind: str
    score: float
    suggested: int | None = None
    partner: int | None = None


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, *, folds: int, C: float, seed: int) -> np.ndarray:
    """Each row's class probabilities from a model that never saw it: stratified K folds over every row.

    The model is the logreg head's own pipeline (scaler + the ``logreg`` kind of
    :data:`~pipeline.heads.registry.KINDS`, built by :func:`~pipeline.heads.batch.make_head`,
    which also shrinks the folds for a class with fewer rows), at a fixed C:
    an audit of the data, not a reported accuracy, and no head of models/ is fitted this way.

    Returns:
        ``(n, number of distinct labels in y)``, columns in label order.
    """
    from sklearn.model_selection import cross_val_predict
    from threadpoolctl import threadpool_limits

    search = make_head("logreg", C=[C], cv_folds=folds, seed=seed, y=y)
    model = search.estimator.set_params(clf__C=C)
    # One BLAS thread: the products are thin (rows x features @ features x classes), and two
    # OpenBLAS threads on a 2-core machine with one core busy took 9 s where one took 1.6 s
    # (4,000 x 1,280, 20 classes): its threads spin while they wait for the busy core.
    with threadpool_limits(1, user_api="blas"):
        return cross_val_predict(model, X, y, cv=search.cv, method="predict_proba")


def label_issues(X: np.ndarray, y: np.ndarray, *, folds: int, C: float, seed: int) -> list[Suspect]:
    """Rows whose label the out-of-fold probabilities contradict, by cleanlab's confident learning.

    ``cleanlab.filter.find_label_issues`` (pruning by the estimated noise rate)
    decides which rows; ``cleanlab.rank.get_label_quality_scores`` (the given
    label's own probability) scores them; the suggested class is the most probable one.
    """
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        from pipeline.errors import PipelineError

        raise PipelineError("the quality stage needs cleanlab: pip install -e '.[quality]'") from None
    present, labels = np.unique(y, return_inverse=True)  # cleanlab wants labels 0..K-1, each present
    if len(present) < 2:
        return []
    probs = out_of_fold_probabilities(X, labels, folds=folds, C=C, seed=seed)
    issues = np.flatnonzero(find_label_issues(labels, probs))
    quality = get_label_quality_scores(labels, probs)
    best = probs.argmax(axis=1)
    return [Suspect(int(i), "label_issue", float(1 - quality[i]), suggested=int(present[best[i]])) for i in issues]


def duplicates(nb: Neighbours, splits, labels, sizes, threshold: float) -> list[Suspect]:
    """Near-copies: rows joined by a similarity of at least ``threshold``, one kept per group.

    Pairs are read off the kNN graph (a row with more than k copies keeps k of
    them as neighbours, and the groups join the rest). Each group keeps its
    largest file (the original rather than a smaller re-encoding; ties: the
    first row); every other member is a suspect with the kept one as its
    partner: a ``train_test_leak`` where the two are in different splits, a
    ``near_duplicate`` where not. Excluding the suspects leaves one photo of each group.

    Args:
        splits, labels, sizes: per row: split name, class index, file size in bytes.
    """
    n = len(nb.index)
    rows, cols = np.nonzero(nb.similarity >= threshold)
    parent = np.arange(n)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    best = {}  # row -> its highest similarity to another member
    for i, c in zip(rows.tolist(), cols.tolist()):
        j, s = int(nb.index[i, c]), float(nb.similarity[i, c])
        parent[root(i)] = root(j)
        best[i], best[j] = max(best.get(i, s), s), max(best.get(j, s), s)
    groups: dict[int, list[int]] = {}
    for i in sorted(best):
        groups.setdefault(root(i), []).append(i)
    out = []
    for members in groups.values():
        keep = max(members, key=lambda i: (sizes[i], -i))
        for m in members:
            if m == keep:
                continue
            kind = "train_test_leak" if splits[m] != splits[keep] else "near_duplicate"
            suggested = int(labels[keep]) if labels[m] != labels[keep] else None
            out.append(Suspect(m, kind, best[m], suggested=suggested, partner=keep))
    return out


def outliers(nb: Neighbours, z: float) -> tuple[list[Suspect], dict]:
    """Rows far from every other: a mean similarity to their k neighbours ``z`` robust SDs below the median.

    The robust SD is 1.4826 x the median absolute deviation: a few outliers do
    not move it, and the rule follows the data set's own spread, not a cosine
    value that differs from one backbone to the next.

    Returns:
        ``(suspects, stats)``: stats holds the median, the robust SD and the cut-off similarity.
    """
    if nb.similarity.shape[1] == 0:
        return [], {}
    density = nb.similarity.mean(axis=1)
    median = float(np.median(density))
    sd = 1.4826 * float(np.median(np.abs(density - median)))
    stats = {"median_neighbour_similarity": round(median, 4), "robust_sd": round(sd, 4),
             "cutoff_similarity": round(median - z * sd, 4)}
    if sd == 0:
        return [], stats
    score = (median - density) / sd
    return [Suspect(int(i), "outlier", float(score[i])) for i in np.flatnonzero(score >= z)], stats
