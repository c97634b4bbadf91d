"""What a model or report was made from, recorded beside it and checked before it is used.

One place for both sides: what a saved model records (:func:`model_record`,
the ``config.json`` of a model folder, :mod:`pipeline.model_folder`) and what
loading it checks (:func:`check_record`: the format and its version, the
classes, the backbone; :func:`check_made_from`: the features it is scored on).
Training (the heads, fine-tuning), evaluate, predict, visualize and export all
go through these functions.

A head records the provenance of the features it was fitted on (backbone,
weights and their sha256, transform, input size, decoder, precision, the
manifest's hash and the cache's content hash: the cache's
:data:`~pipeline.extract.cache.CHECKED_ATTRS`), ``heads.backbones`` and the
git commit of the project. ``evaluate`` compares that record with the cache
it is about to score on and refuses a mismatch, so that a stale graph can
never produce numbers quietly.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.extract.cache import CHECKED_ATTRS, check_provenance
from pipeline.fileio import read_json

#: What a model folder's config.json says it is; loading refuses anything else.
FORMAT = "transfer-pipeline model"
#: The layout of config.json and its files. Raised when a change would mislead an
#: older reader; a reader refuses a newer version rather than guess.
FORMAT_VERSION = 1

#: The backbone's record a model must match where a caller expects one
#: (:meth:`pipeline.backbones.Backbone.provenance`'s keys).
BACKBONE_KEYS = ("backbone", "weights", "weights_sha256", "transform", "input_size")


def git_commit(cwd=".") -> str | None:
    """The project's git commit (``HEAD``), or None outside a git repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _features_record(attrs: dict, extra_backbones) -> dict:
    """What a cache with attributes ``attrs`` (and ``heads.backbones``) says about the features: the compared part."""
    record = {k: attrs[k] for k in CHECKED_ATTRS if k in attrs}
    for k, v in record.items():  # numpy scalars from HDF5 attributes, as plain JSON values
        if hasattr(v, "item"):
            record[k] = v.item()
    record["heads_backbones"] = list(extra_backbones)
    return record


def made_from(attrs: dict, extra_backbones=()) -> dict:
    """The record of a head or report made from a cache with attributes ``attrs``.

    ``attrs`` may be several caches' joined (``a + b``, see
    :func:`~pipeline.extract.cache.concatenate`); ``extra_backbones`` is
    ``heads.backbones``, the caches after the first.
    """
    return dict(_features_record(attrs, extra_backbones), git_commit=git_commit())


def check_made_from(recorded: dict, attrs: dict, extra_backbones, what: str, against: str) -> None:
    """Refuse ``what`` (a head) whose record differs from the features ``against`` (a cache) it is scored on.

    The git commit is not compared: it says where a record was made, not what from.

    Raises:
        PipelineError: one line naming the first differing key and both values.
    """
    now = _features_record(attrs, extra_backbones)
    for key in (*CHECKED_ATTRS, "heads_backbones"):
        if key not in now and key not in recorded:
            continue
        have, want = recorded.get(key), now.get(key)
        if str(have) != str(want):
            raise PipelineError(f"{what} was made from {key}={have!r} but {against} has {key}={want!r}; "
                                "the head is stale: run dvc repro")


def versions() -> dict:
    """The versions of the libraries a model depends on (read from package metadata: nothing is imported)."""
    out = {"python": platform.python_version()}
    for dist in ("transfer-pipeline", "torch", "torchvision", "timm", "scikit-learn", "numpy", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def model_record(*, name: str, kind: str, classes, backbone: dict, preprocessing: dict, precision: str,
                 made_from: dict, scores: str, **extra) -> dict:
    """A model folder's ``config.json`` (less the weights' sha256, which the writer adds).

    Args:
        kind: ``head`` or ``finetune``.
        backbone: ``name``, ``weights``, ``weights_sha256``, ``transform`` (the
            description the caches record), ``input_size`` (0: the weights' own), ``feature_dim``.
        preprocessing: a :class:`~pipeline.data.transform.TransformSpec` dict and its ``decoder``.
        precision: of the features (a head) or of training (the fine-tuned network).
        made_from: :func:`made_from`'s record.
        scores: what the scores are, in words (probabilities, or a softmax of decision values).
        **extra: ``head`` (a head's estimator), ``data``, ``training``, ``metrics``.
    """
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "kind": kind,
            "classes": list(classes), "backbone": dict(backbone), "preprocessing": dict(preprocessing),
            "precision": precision, "scores": scores, "made_from": dict(made_from), **extra,
            "versions": versions()}


def backbone_record(config: dict) -> dict:
    """A model's backbone in :data:`BACKBONE_KEYS` form, to compare with a built backbone's ``provenance()``."""
    bb = config["backbone"]
    record = {"backbone": bb["name"], "weights": bb["weights"], "weights_sha256": bb["weights_sha256"],
              "transform": bb["transform"]}
    if int(bb.get("input_size") or 0):
        record["input_size"] = int(bb["input_size"])
    return record


def check_record(config, expected: dict, what: str) -> None:
    """Refuse a ``config.json`` that is not this project's, is newer than this code, or differs from ``expected``.

    Args:
        expected: any of :data:`BACKBONE_KEYS`, ``classes``, ``decoder`` and ``precision``.

    Raises:
        PipelineError: one line: what differs, and what to do.
    """
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise PipelineError(f"{what}: config.json is not a model config of transfer-pipeline (format "
                            f"{config.get('format') if isinstance(config, dict) else None!r}); run dvc repro")
    version = config.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise PipelineError(f"{what}: config.json has format_version {version!r}, expected a whole number >= 1; "
                            "copy the model folder again, or run dvc repro")
    if version > FORMAT_VERSION:
        raise PipelineError(f"{what} was written by a newer transfer-pipeline (model format {version}; this one "
                            f"reads up to {FORMAT_VERSION}): upgrade it (pip install -U transfer-pipeline)")
    missing = [k for k in ("name", "kind", "classes", "backbone", "preprocessing", "files", "made_from")
               if k not in config]
    if missing:
        raise PipelineError(f"{what}: config.json lacks {', '.join(missing)}; copy the model folder again, "
                            "or run dvc repro")
    found = dict(backbone_record(config), classes=config["classes"],
                 decoder=config["preprocessing"].get("decoder"), precision=config.get("precision"))
    check_provenance(found, expected, what)


def trained_on(fs, prepared_dir) -> dict:
    """What a model was trained on, for its config and card: the data source, split sizes, train photos per class."""
    info = read_json(Path(prepared_dir) / "dataset.json", f"dataset description in {prepared_dir}")
    train = fs.labels[fs.splits == "train"]
    return {"source": info.get("source"), "root": info.get("root"), "n_train": int(len(train)),
            "n_test": int((fs.splits == "test").sum()),
            "train_per_class": np.bincount(train, minlength=len(fs.classes)).tolist()}
