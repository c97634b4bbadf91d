"""The ``evaluate`` stage: test-split metrics of the heads, in the shape ``dvc metrics`` compares.

Each head is loaded as a bundle (:mod:`pipeline.serve.bundle`) and scored on
the feature cache's test rows, in seconds. The fine-tuned network is scored by
its own stage with the same functions (:func:`head_metrics` on the photos
:func:`manifest_rows` lists, the same test photos), into
``reports/finetune_metrics.json``: a new C then never waits for a network to
be scored again on every test photo.

Outputs: ``reports/metrics.json`` (one entry per head), ``per_class.csv`` and
``confusion_<head>.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from pipeline.config import Config
from pipeline.data.manifest import Row, read_prepared
from pipeline.errors import PipelineError
from pipeline.extract.cache import CHECKED_ATTRS, head_features_paths, open_cache
from pipeline.fileio import write_csv, write_json
from pipeline.heads.model import head_path, load_head, scores
from pipeline.heads.registry import HEADS


def head_metrics(y_true, y_pred, scores, n_classes: int, top_k=(3, 5)) -> dict:
    """accuracy, mean per-class accuracy, top-k (only where k < classes), macro F1, n_test."""
    y_true = np.asarray(y_true)
    labels = np.arange(n_classes)
    m = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # Balanced accuracy is the mean over classes of per-class recall.
        "mean_class_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
    }
    for k in sorted(set(top_k)):
        if n_classes > k:
            m[f"top{k}_accuracy"] = float(top_k_accuracy_score(y_true, scores, k=k, labels=labels))
    m["macro_f1"] = float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    m["n_test"] = int(len(y_true))
    return m


def per_class_rows(head: str, y_true, y_pred, classes: list[str]) -> list[list]:
    """Rows head, class, support, accuracy (= recall), precision, f1."""
    labels = np.arange(len(classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return [
        [head, c, int(s[i]), round(float(r[i]), 6), round(float(p[i]), 6), round(float(f[i]), 6)]
        for i, c in enumerate(classes)
    ]


def manifest_rows(fs, features_file, prepared_dir) -> tuple[Path, list[Row]]:
    """The cache's test rows as the manifest lists them: ``(dataset root, rows)``, in cache order.

    Raises:
        PipelineError: the cache holds a test image the manifest does not
            list, or one whose content hash differs (the cache is stale).
    """
    prepared = read_prepared(prepared_dir)
    listed = {r.path: r for r in prepared.split("test")}
    test = fs.splits == "test"
    rows = []
    for path, sha in zip(fs.paths[test], fs.sha256[test]):
        row = listed.get(str(path))
        if row is None or row.sha256 != sha:
            why = "does not list it" if row is None else "records another content hash"
            raise PipelineError(f"{features_file} holds test image {path} but {prepared_dir}/manifest.csv {why}; "
                                "the cache is stale: run dvc repro")
        rows.append(row)
    return prepared.root, rows


def run_evaluate(cfg: Config, *, features_dir, models_dir, reports_dir,
                 models: Sequence[str] = tuple(HEADS)) -> dict:
    """Score the heads ``models`` on the test split and write the reports.

    Args:
        cfg: reads ``backbone.name`` (which cache), ``evaluate.top_k``,
            ``heads.out_of_core`` and ``heads.chunk_rows`` (stream the test
            split instead of loading the cache).
        models: heads, each loaded from ``models_dir``.

    Returns:
        the metrics written to ``reports/metrics.json``.

    Example:
        >>> run_evaluate(load_config(), features_dir="data/features", models_dir="models",
        ...              reports_dir="reports")   # doctest: +SKIP
    """
    features_file = head_features_paths(features_dir, cfg.backbone.name, cfg.heads.backbones)
    streamed = cfg.heads.out_of_core  # features stay on disk, read chunk_rows rows at a time
    fs = open_cache(features_file, stream=streamed, chunk_rows=cfg.heads.chunk_rows)
    X, y = (None, fs.labels_of("test")) if streamed else fs.subset("test")
    if len(y) == 0:
        raise PipelineError(f"{features_file[0]} has no test rows; check the prepare stage's split")
    made_with = {k: fs.attrs[k] for k in CHECKED_ATTRS if k in fs.attrs}
    reports = Path(reports_dir)
    metrics, per_class = {}, []

    for name in models:
        estimator = load_head(head_path(models_dir, name), {**made_with, "classes": fs.classes})["estimator"]
        if streamed:
            _, pred, s = fs.predict(estimator, "test", scores)
        else:
            pred, s = estimator.predict(X), scores(estimator, X)
        metrics[name] = head_metrics(y, pred, s, len(fs.classes), cfg.evaluate.top_k)
        per_class.extend(per_class_rows(name, y, pred, fs.classes))
        write_csv(reports / f"confusion_{name}.csv", ["actual", "predicted"],
                  [[fs.classes[a], fs.classes[p]] for a, p in zip(y, pred)])
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics[name].items() if k != "n_test")
        print(f"evaluate: {name} on {len(y)} test images: {shown}", flush=True)
    write_csv(reports / "per_class.csv", ["head", "class", "support", "accuracy", "precision", "f1"], per_class)
    write_json(reports / "metrics.json", metrics)
    return metrics
