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

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.extract.cache import CHECKED_ATTRS, head_features_paths, open_cache
from pipeline.fileio import write_csv, write_json
from pipeline.heads.model import head_path, load_head, scores
from pipeline.heads.registry import HEADS
from pipeline.metrics import head_metrics, per_class_rows


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
