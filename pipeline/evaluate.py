"""Test-split metrics of trained heads, in the shape ``dvc metrics`` compares."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)


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


def finetune_test_scores(model_path, *, fs, prepared_dir, expected: dict, device="auto", batch_size=32):
    """Probabilities (N, C) of the fine-tuned network on the feature cache's test rows.

    The test images are decoded from their files, checked against the content
    hashes the manifest recorded, and pushed through the network with its eval
    transform, so the network is scored on exactly the images the heads are.
    """
    import torch

    from pipeline.data.manifest import read_prepared
    from pipeline.finetune.train import load_finetuned, logits_for_rows, transform_of

    net, info = load_finetuned(model_path, expected)
    prepared = read_prepared(prepared_dir)
    sha = {path: digest for path, _, _, digest in prepared.rows}
    test = fs.splits == "test"
    rows = [(path, int(label), sha.get(path, "")) for path, label in zip(fs.paths[test], fs.labels[test])]
    logits, _ = logits_for_rows(
        net, root=prepared.root, rows=rows, transform=transform_of(info).build(), device=device, batch_size=batch_size
    )
    return torch.from_numpy(logits).softmax(1).numpy()


def run_evaluate(
    *, features_file, models_dir, top_k, reports_dir, finetuned_model=None, prepared_dir=None, device="auto",
    out_of_core: bool = False, chunk_rows: int = 65536,
) -> dict:
    """The ``evaluate`` stage: metrics.json, per_class.csv and confusion_<head>.csv.

    Args:
        finetuned_model: ``models/finetune.pt`` to score as ``finetune`` beside
            the heads, or None for the heads only.
        prepared_dir: the prepare stage's output, where the test images are
            found; needed with ``finetuned_model``.
        device: where the fine-tuned network runs (``auto``: CUDA when present).
        out_of_core: stream the test split ``chunk_rows`` rows at a time
            instead of loading the feature cache.
    """
    from pathlib import Path

    from pipeline.errors import PipelineError
    from pipeline.extract.local import CHECKED_ATTRS, read_features
    from pipeline.fileio import write_csv, write_json
    from pipeline.heads.batch import HEADS, load_head, scores

    if out_of_core:  # features stay on disk, read chunk_rows rows at a time
        from pipeline.heads.streaming import open_features

        fs = open_features(features_file, chunk_rows=chunk_rows)
        y = fs.labels_of("test")
    else:
        fs = read_features(features_file)
        X, y = fs.subset("test")
    if len(y) == 0:
        raise PipelineError(f"{features_file} has no test rows; check the prepare stage's split")
    expected = {k: fs.attrs[k] for k in CHECKED_ATTRS}
    expected["classes"] = fs.classes
    reports = Path(reports_dir)
    metrics, per_class = {}, []

    def report(name, pred, s):
        metrics[name] = head_metrics(y, pred, s, len(fs.classes), top_k)
        per_class.extend(per_class_rows(name, y, pred, fs.classes))
        write_csv(
            reports / f"confusion_{name}.csv",
            ["actual", "predicted"],
            [[fs.classes[a], fs.classes[p]] for a, p in zip(y, pred)],
        )
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics[name].items() if k != "n_test")
        print(f"evaluate: {name} on {len(y)} test images: {shown}", flush=True)

    for name in HEADS:
        est = load_head(Path(models_dir) / f"{name}.joblib", expected)["estimator"]
        if out_of_core:
            _, pred, s = fs.predict(est, "test")
        else:
            pred, s = est.predict(X), scores(est, X)
        report(name, pred, s)
    if finetuned_model is not None:
        if prepared_dir is None:
            raise TypeError("run_evaluate: finetuned_model needs prepared_dir (where the test images are listed)")
        probs = finetune_test_scores(
            finetuned_model, fs=fs, prepared_dir=prepared_dir, expected=expected, device=device
        )
        report("finetune", probs.argmax(1), probs)
    write_csv(reports / "per_class.csv", ["head", "class", "support", "accuracy", "precision", "f1"], per_class)
    write_json(reports / "metrics.json", metrics)
    return metrics
