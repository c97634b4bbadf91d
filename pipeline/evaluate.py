"""The ``evaluate@<head>`` stage: one head's test-split metrics, in the shape ``dvc metrics`` compares.

The head is loaded with its recorded provenance and scored on the feature
cache's test rows, in seconds; a head made from other features than the
cache it is about to be scored on (another backbone, precision, decoder,
manifest or content) is refused with both sides named. The fine-tuned network
is scored by its own stage with the same functions (:mod:`pipeline.metrics`),
into ``reports/finetune_metrics.json``: a new C then never waits for a network
to be scored again on every test photo.

Outputs, per head: ``reports/metrics_<head>.json`` (the metrics under the
head's name, and ``made_from``), ``per_class_<head>.csv`` and
``confusion_<head>.csv``; and the head's model folder ``models/<head>/``: the
fitted head of ``data/heads/<head>/`` with its test metrics and what it was
trained on in ``config.json`` and its model card. A head reaches ``models/``
only once it has been scored.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.extract.cache import head_features_paths, open_cache
from pipeline.fileio import write_csv, write_json
from pipeline.heads.model import head_path, load_head, scores
from pipeline.model_folder import model_card, weights_path, write_model
from pipeline.metrics import head_metrics, per_class_rows
from pipeline.provenance import check_made_from, made_from, trained_on


def run_evaluate(cfg: Config, name: str, *, features_dir, heads_dir, prepared_dir, models_dir, reports_dir) -> dict:
    """Score the head ``name`` (of ``heads.train``) on the test split; write its reports and its model folder.

    Args:
        cfg: reads ``backbone.name`` and ``heads.backbones`` (which caches),
            ``evaluate.top_k``, ``heads.out_of_core`` and ``heads.chunk_rows``
            (stream the test split instead of loading the cache).

    Returns:
        the metrics written to ``reports/metrics_<name>.json``.

    Raises:
        PipelineError: the head's recorded provenance differs from the cache's.

    Example:
        >>> run_evaluate(load_config(), "logreg", features_dir="data/features", heads_dir="data/heads",
        ...              prepared_dir="data/prepared", models_dir="models",
        ...              reports_dir="reports")   # doctest: +SKIP
    """
    extra = cfg.heads.backbones
    features_file = head_features_paths(features_dir, cfg.backbone.name, extra)
    streamed = cfg.heads.out_of_core  # features stay on disk, read chunk_rows rows at a time
    fs = open_cache(features_file, stream=streamed, chunk_rows=cfg.heads.chunk_rows)
    X, y = (None, fs.labels_of("test")) if streamed else fs.subset("test")
    if len(y) == 0:
        raise PipelineError(f"{features_file[0]} has no test rows; check the prepare stage's split")
    path = head_path(heads_dir, name)
    estimator, config = load_head(path, {"classes": fs.classes})
    cache = " + ".join(map(str, features_file))
    check_made_from(config["made_from"], fs.attrs, extra, f"head {path}", cache)
    if streamed:
        _, pred, s = fs.predict(estimator, "test", scores)
    else:
        pred, s = estimator.predict(X), scores(estimator, X)
    metrics = head_metrics(y, pred, s, len(fs.classes), cfg.evaluate.top_k)
    reports = Path(reports_dir)
    write_csv(reports / f"per_class_{name}.csv", ["head", "class", "support", "accuracy", "precision", "f1"],
              per_class_rows(name, y, pred, fs.classes))
    write_csv(reports / f"confusion_{name}.csv", ["actual", "predicted"],
              [[fs.classes[a], fs.classes[p]] for a, p in zip(y, pred)])
    # Keyed by the head's name, so that `dvc metrics show` lines logreg.accuracy up with
    # finetune.accuracy; made_from names the features and commit the numbers belong to.
    write_json(reports / f"metrics_{name}.json", {name: metrics, "made_from": made_from(fs.attrs, extra)})
    # The same weights file, byte for byte (its recorded sha256 still holds), under the published name.
    config = dict(config, data=trained_on(fs, prepared_dir), metrics=metrics)
    write_model(head_path(models_dir, name), config, lambda p: shutil.copyfile(weights_path(path), p),
                model_card(config))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n_test")
    print(f"evaluate: {name} on {len(y)} test images: {shown}", flush=True)
    return metrics
