"""The ``evaluate`` stage: test-split metrics of every model, in the shape ``dvc metrics`` compares.

Each model is loaded as a bundle (:mod:`pipeline.serve.bundle`). Heads are
scored on the feature cache's test rows; the fine-tuned network on the same
images, decoded from their files and checked against the content hashes the
manifest recorded, so every model is scored on exactly the same photos.

Outputs: ``reports/metrics.json`` (one entry per model), ``per_class.csv`` and
``confusion_<model>.csv``.
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
from pipeline.heads.model import scores
from pipeline.runtime import resolve_device
from pipeline.serve.bundle import BACKBONE_KEYS, FINETUNE, MODELS, Bundle, load_bundle


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


def image_scores(bundle: Bundle, root, rows: list[Row], batch_size: int = 32) -> np.ndarray:
    """Scores (N, C) of ``rows`` decoded from their files; any unusable photo is an error."""
    out = []
    for row, s, why in bundle.score_rows(root, rows, batch_size):
        if s is None:
            raise PipelineError(f"cannot use {row.path}: {why}; run dvc repro so that the prepare stage "
                                "lists the photos again")
        out.append(s)
    return np.stack(out) if out else np.zeros((0, len(bundle.classes)))


def run_evaluate(cfg: Config, *, features_dir, models_dir, reports_dir, prepared_dir,
                 models: Sequence[str] = MODELS) -> dict:
    """Score ``models`` on the test split and write the reports.

    Args:
        cfg: reads ``backbone.name`` (which cache), ``evaluate.top_k``,
            ``heads.out_of_core`` and ``heads.chunk_rows`` (stream the test
            split instead of loading the cache) and ``finetune.device`` (where
            the fine-tuned network runs).
        models: the heads and ``finetune``, each loaded from ``models_dir``.

    Returns:
        the metrics written to ``reports/metrics.json``.

    Example:
        >>> run_evaluate(load_config(), features_dir="data/features", models_dir="models",
        ...              reports_dir="reports", prepared_dir="data/prepared")   # doctest: +SKIP
    """
    features_file = head_features_paths(features_dir, cfg.backbone.name, cfg.heads.backbones)
    streamed = cfg.heads.out_of_core  # features stay on disk, read chunk_rows rows at a time
    fs = open_cache(features_file, stream=streamed, chunk_rows=cfg.heads.chunk_rows)
    X, y = (None, fs.labels_of("test")) if streamed else fs.subset("test")
    if len(y) == 0:
        raise PipelineError(f"{features_file[0]} has no test rows; check the prepare stage's split")
    made_with = {k: fs.attrs[k] for k in CHECKED_ATTRS}
    reports = Path(reports_dir)
    metrics, per_class = {}, []

    for name in models:
        if name == FINETUNE:
            # It sees images, not cached features: decoder and precision do not apply.
            expected = {k: made_with[k] for k in BACKBONE_KEYS}
            bundle = load_bundle(models_dir, name, {**expected, "classes": fs.classes})
            bundle.to(resolve_device(cfg.finetune.device, "finetune.device"))
            s = image_scores(bundle, *manifest_rows(fs, features_file[0], prepared_dir))
            pred = s.argmax(1)
        else:
            bundle = load_bundle(models_dir, name, {**made_with, "classes": fs.classes})
            if streamed:
                _, pred, s = fs.predict(bundle.estimator, "test", scores)
            else:
                pred, s = bundle.score_features(X)
        metrics[name] = head_metrics(y, pred, s, len(fs.classes), cfg.evaluate.top_k)
        per_class.extend(per_class_rows(name, y, pred, fs.classes))
        write_csv(reports / f"confusion_{name}.csv", ["actual", "predicted"],
                  [[fs.classes[a], fs.classes[p]] for a, p in zip(y, pred)])
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics[name].items() if k != "n_test")
        print(f"evaluate: {name} on {len(y)} test images: {shown}", flush=True)
    write_csv(reports / "per_class.csv", ["head", "class", "support", "accuracy", "precision", "f1"], per_class)
    write_json(reports / "metrics.json", metrics)
    return metrics
