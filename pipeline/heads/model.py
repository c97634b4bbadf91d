"""A fitted head, either kind: its scores, its torch layer, and its model folder.

Both kinds of head end as the same scikit-learn ``Pipeline([("scale",
StandardScaler), ("clf", linear classifier)])``, so everything here serves
both. A head is saved as a model folder (:mod:`pipeline.model_folder`): its
learned arrays (the scaler's mean and scale, the classifier's coef and
intercept) in safetensors, and in ``config.json`` the estimator's class and
parameters, from an allowlist, with what the head was made from. Loading
rebuilds the same scikit-learn objects from those arrays, so a loaded head
scores bit for bit as the fitted one, and nothing in the file can run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import PipelineError
from pipeline.model_folder import read_model, weights_path, write_model
from pipeline.provenance import model_record

if TYPE_CHECKING:
    import torch

#: The estimators a head folder may name, with the fitted attributes that scoring
#: reads: the allowlist (nothing else is ever built from a config.json).
ESTIMATORS = {
    "LogisticRegression": ("sklearn.linear_model", ("coef_", "intercept_", "classes_", "n_iter_")),
    "LinearSVC": ("sklearn.svm", ("coef_", "intercept_", "classes_", "n_iter_")),
    "SGDClassifier": ("sklearn.linear_model", ("coef_", "intercept_", "classes_", "t_")),
}
SCALER_ATTRS = ("mean_", "scale_", "var_", "n_samples_seen_")


def scores(estimator, X) -> np.ndarray:
    """Per-class scores (N, n_classes) for ranking: probabilities or decision values."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    s = estimator.decision_function(X)
    if s.ndim == 1:  # binary: one column is the second class's margin
        s = np.stack([-s, s], axis=1)
    return s


def head_path(models_dir: str | Path, name: str) -> Path:
    """Where the head ``name`` is saved: the folder ``<models_dir>/<name>``."""
    return Path(models_dir) / name


def _plain(value):
    """A parameter value as JSON (numpy scalars as Python numbers)."""
    return value.item() if hasattr(value, "item") else value


def estimator_arrays(estimator) -> tuple[dict, dict[str, np.ndarray]]:
    """A fitted ``Pipeline(scale, clf)`` as data: ``(record, arrays)``.

    ``record`` names the classifier's class (one of :data:`ESTIMATORS`) and its
    parameters; ``arrays`` holds the fitted attributes, as safetensors stores them.
    """
    scaler, clf = estimator.named_steps["scale"], estimator.named_steps["clf"]
    cls = type(clf).__name__
    if cls not in ESTIMATORS:
        raise PipelineError(f"cannot save a head of class {cls}; accepted: {', '.join(ESTIMATORS)}")
    arrays = {}
    for prefix, obj, names in (("scale.", scaler, SCALER_ATTRS), ("clf.", clf, ESTIMATORS[cls][1])):
        for attr in names:
            value = getattr(obj, attr, None)
            if value is not None:
                arrays[prefix + attr] = np.ascontiguousarray(np.atleast_1d(np.asarray(value)))
    params = {k: _plain(v) for k, v in clf.get_params().items()}
    record = {"class": cls, "params": params,
              "scale_params": {k: _plain(v) for k, v in scaler.get_params().items()}}
    json.dumps(record)  # every parameter must be plain data
    return record, arrays


def rebuild_estimator(record: dict, arrays: dict[str, np.ndarray], where: str):
    """The ``Pipeline(scale, clf)`` that :func:`estimator_arrays` describes, ready to score."""
    import importlib

    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    cls = record.get("class")
    if cls not in ESTIMATORS:
        raise PipelineError(f"{where} names estimator {cls!r}; accepted: {', '.join(ESTIMATORS)} "
                            "(a head of this project)")
    module, names = ESTIMATORS[cls]
    clf = getattr(importlib.import_module(module), cls)(**record["params"])
    scaler = StandardScaler(**record.get("scale_params", {}))
    for prefix, obj, attrs in (("scale.", scaler, SCALER_ATTRS), ("clf.", clf, names)):
        for attr in attrs:
            if prefix + attr in arrays:
                value = arrays[prefix + attr]
                # Scalars were stored as one-element arrays; the scaler's count and SGD's t_ are numbers.
                setattr(obj, attr, value[0].item() if attr in ("n_samples_seen_", "t_") else value)
    dim = arrays["clf.coef_"].shape[1]
    scaler.n_features_in_ = clf.n_features_in_ = dim
    return Pipeline([("scale", scaler), ("clf", clf)])


def save_head(folder, search, *, attrs: dict, made_from: dict, classes: list[str], kind: str,
              description: str, data: dict | None = None, metrics: dict | None = None) -> dict:
    """Save the refitted best pipeline as the model folder ``folder``, with what it was trained on.

    Args:
        search: a fitted ``GridSearchCV`` (:func:`~pipeline.heads.batch.make_head`)
            or :class:`~pipeline.heads.streaming.StreamingHead`: both have
            ``best_estimator_``, ``best_params_`` and ``best_score_``.
        attrs: the feature cache's attributes (backbone, preprocessing, decoder, precision).
        made_from: :func:`pipeline.provenance.made_from`'s record.
        data: what the head was trained on (source, split and class counts), for the model card.

    Returns:
        the config written.
    """
    from safetensors.numpy import save_file

    from pipeline.model_folder import model_card

    record, arrays = estimator_arrays(search.best_estimator_)
    probabilities = hasattr(search.best_estimator_, "predict_proba")
    ovr = score_mode(search.best_estimator_, len(classes)) == "ovr"
    config = model_record(
        name=Path(folder).name, kind="head", classes=classes,
        backbone={"name": str(attrs["backbone"]), "weights": str(attrs["weights"]),
                  "weights_sha256": str(attrs["weights_sha256"]), "transform": str(attrs["transform"]),
                  "input_size": int(attrs.get("input_size", 0) or 0), "feature_dim": int(attrs["feature_dim"])},
        preprocessing={**json.loads(attrs["preprocessing"]), "decoder": str(attrs["decoder"])},
        precision=str(attrs["precision"]), made_from=made_from,
        scores=("probabilities (one-vs-rest sigmoids, normalised)" if ovr else
                "probabilities" if probabilities else "a softmax of the SVM's decision values, not probabilities"),
        head={**record, "kind": kind, "description": description, "probabilities": probabilities,
              "best_C": float(search.best_params_["clf__C"]), "cv_accuracy": float(search.best_score_)},
        data=data or {}, metrics=metrics or {},
    )
    write_model(folder, config, lambda path: save_file(arrays, str(path)), model_card(config))
    return config


def load_head(folder, expected: dict | None = None) -> tuple[object, dict]:
    """A head's folder, checked (:func:`~pipeline.model_folder.read_model`), as ``(estimator, config)``.

    Args:
        expected: ``classes`` and backbone keys the head must match.
    """
    config = read_model(folder, expected)
    return head_estimator(folder, config), config


def head_estimator(folder, config: dict):
    """The fitted head of a folder whose ``config.json`` :func:`~pipeline.model_folder.read_model` has checked."""
    from safetensors.numpy import load_file

    if config["kind"] != "head":
        raise PipelineError(f"{folder} is a {config['kind']} model, not a head of heads.train")
    arrays = load_file(str(weights_path(folder)))
    estimator = rebuild_estimator(config["head"], arrays, f"model {folder}")
    rows = arrays["clf.coef_"].shape[0]
    if rows != (1 if len(config["classes"]) == 2 else len(config["classes"])) or \
            len(arrays["clf.classes_"]) != len(config["classes"]):
        raise PipelineError(f"model {folder}: config.json lists {len(config['classes'])} classes but its weights "
                            f"score {len(arrays['clf.classes_'])}; copy the model folder again, or run dvc repro")
    return estimator


def to_torch_linear(estimator) -> torch.nn.Linear:
    """The fitted scaler + linear classifier as one ``torch.nn.Linear``.

    ``StandardScaler`` followed by ``w·x + b`` is itself linear, so it folds into
    weights ``w / scale`` and bias ``b - w·(mean / scale)``. A binary head's single
    margin ``z`` becomes two logits ``(0, z)``: their softmax equals scikit-learn's
    ``predict_proba`` for logistic regression, and their argmax its prediction.

    Args:
        estimator: a fitted ``Pipeline([("scale", StandardScaler), ("clf", linear)])``.

    Returns:
        ``nn.Linear(D, n_classes)`` in float32, so a backbone's features can be
        fed straight into it (fine-tuning starts here; visualisation
        differentiates through it).
    """
    # torch is imported by the callers that need a layer (fine-tuning, a
    # bundle's network); the heads' own stages never load it (seconds of start-up).
    import torch

    scaler, clf = estimator.named_steps["scale"], estimator.named_steps["clf"]
    mean = np.zeros(clf.coef_.shape[1]) if scaler.mean_ is None else scaler.mean_
    scale = np.ones_like(mean) if scaler.scale_ is None else scaler.scale_
    w = clf.coef_ / scale
    b = clf.intercept_ - w @ mean
    if w.shape[0] == 1:
        w = np.concatenate([np.zeros_like(w), w])
        b = np.concatenate([np.zeros_like(b), b])
    layer = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w).float())
        layer.bias.copy_(torch.from_numpy(b).float())
    return layer


def score_mode(estimator, n_classes: int) -> str:
    """How a head's scores follow from its linear layer's logits (:func:`to_torch_linear`), as :func:`scores` gives them.

    ``softmax``: logistic regression (a binary head's logits are ``(0, z)``, whose
    softmax is the sigmoid), and any multi-class margin; ``margins``: a binary
    decision function, which :func:`scores` turns into ``(-z, z)`` before the
    softmax a bundle applies; ``ovr``: SGD's multi-class log-loss, one sigmoid
    per class, normalised.
    """
    clf = estimator.named_steps["clf"]
    if hasattr(estimator, "predict_proba"):
        return "ovr" if type(clf).__name__ == "SGDClassifier" and n_classes > 2 else "softmax"
    return "margins" if n_classes == 2 else "softmax"


def score_layer(mode: str):
    """The torch module that turns :func:`to_torch_linear`'s logits into the scores of :func:`score_mode` ``mode``."""
    import torch

    class Scores(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mode = mode

        def forward(self, logits):
            if self.mode == "ovr":
                p = torch.sigmoid(logits)
                return p / p.sum(1, keepdim=True)
            if self.mode == "margins":
                z = logits[:, 1:2] - logits[:, 0:1]
                return torch.cat([-z, z], 1).softmax(1)
            return logits.softmax(1)

    return Scores()
