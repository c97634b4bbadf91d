"""The ``train_heads`` stage for one head, in memory or streamed: fit -> save -> report.

``heads.out_of_core`` picks the way: the in-memory head
(:func:`~pipeline.heads.batch.make_head`, C by cross-validation) on the cache
loaded whole, or the :class:`~pipeline.heads.streaming.StreamingHead` (C by a
hold-out) on the cache streamed ``chunk_rows`` rows at a time. Both are checked,
saved, summarised and reported by the same code.
"""

from __future__ import annotations

import numpy as np

from pipeline.config.checks import check_grid
from pipeline.extract.cache import open_cache
from pipeline.fileio import write_json
from pipeline.heads.batch import make_head
from pipeline.heads.model import head_path, save_head
from pipeline.heads.registry import KINDS, check_kind, check_train_labels
from pipeline.heads.streaming import StreamingHead
from pipeline.provenance import made_from


def train_head(
    *, name: str, kind: str | None = None, features_file, heads_dir, C, max_iter: int = 2000, cv_folds: int = 5,
    seed: int = 0, report_path=None, out_of_core: bool = False, chunk_rows: int = 65536, epochs: int = 10,
    extra_backbones=(),
) -> dict:
    """Fit head ``name`` on the train split of ``features_file`` and save it as the folder ``heads_dir/<name>``.

    The folder is the head's model folder less its test metrics; ``evaluate``
    scores it and publishes it under ``models/`` with them.

    Args:
        kind: ``logreg`` or ``svm`` (:data:`~pipeline.heads.registry.KINDS`); default: ``name``.
        features_file: a cache, or the list of caches whose features are concatenated
            (``backbone.name``'s, then each of ``extra_backbones``).
        C: a number or a list of candidates (``heads.train.<name>.C``).
        max_iter, cv_folds: the in-memory head's (unused out of core).
        out_of_core, chunk_rows, epochs: stream the cache instead
            (``heads.out_of_core``, ``heads.chunk_rows``, ``heads.epochs``).

    Returns:
        ``{"best_C", "cv_accuracy", "n_train"}``, also written to ``report_path``
        keyed by the head's name. ``cv_accuracy`` is the cross-validated accuracy,
        or out of core the held-out accuracy that chose C (None for a single C).
    """
    kind = check_kind(kind or name)
    grid = check_grid(name, C)  # before reading a cache that may be large
    fs = open_cache(features_file, stream=out_of_core, chunk_rows=chunk_rows)
    if out_of_core:
        head = StreamingHead(kind, C=grid, epochs=epochs, seed=seed).fit(fs)
        n_train = head.n_train_
        how = (f"held-out accuracy ({head.best_score_:.4f} on {head.n_validation_} images)"
               if head.n_validation_ else "being the only candidate")
        how_fit = f" (out of core, SGD, {epochs} epochs, {chunk_rows} rows per chunk)"
    else:
        X, y = fs.subset("train")
        check_train_labels(y, fs.classes, features_file)
        head = make_head(kind, C=grid, max_iter=max_iter, cv_folds=cv_folds, seed=seed, y=y).fit(X, y)
        n_train = len(y)
        how = f"{head.n_splits_}-fold CV (accuracy {head.best_score_:.4f})"
        how_fit = ""
    provenance = made_from(fs.attrs, extra_backbones)
    save_head(head_path(heads_dir, name), head, attrs=fs.attrs, made_from=provenance, classes=fs.classes,
              kind=kind, description=KINDS[kind].description)
    acc = float(head.best_score_)
    summary = {
        "best_C": float(head.best_params_["clf__C"]),
        "cv_accuracy": round(acc, 6) if np.isfinite(acc) else None,
        "n_train": int(n_train),
    }
    print(f"train_heads: {name} ({kind}){how_fit}: C={summary['best_C']:g} chosen by {how}; "
          f"trained on {n_train} images", flush=True)
    if report_path:
        # Keyed by head so `dvc metrics show` gives logreg.best_C, svm.best_C columns;
        # made_from says which features (and commit) the numbers belong to.
        write_json(report_path, {name: summary, "made_from": provenance})
    return summary
