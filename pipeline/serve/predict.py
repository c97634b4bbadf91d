"""``python -m pipeline predict``: apply a trained model to new photos.

The model is a model folder (:mod:`pipeline.serve.bundle`): given as a path
(``--model models/logreg``, or a copy of that folder anywhere), or by name in
the project's ``models/`` (a head of ``heads.train``: ``logreg``, ``svm``,
...; or ``finetune``), by default the best there by the test accuracy its
``config.json`` records. The folder says which backbone and preprocessing it
needs, so neither params.yaml nor the repository is read: the same folder
gives the same top-k from any working directory. Files that cannot be read
are listed with the reason and do not stop the others.

Example:
    $ python -m pipeline predict --model models/logreg photos/ --top-k 2
    # model logreg on efficientnet_lite0: probabilities
    photos/tabby.jpg: cat 0.991, dog 0.009
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from pipeline.data.images import IMAGE_EXTENSIONS
from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.runtime import place
from pipeline.model_folder import read_model
from pipeline.serve.bundle import Bundle, load_bundle, model_names, model_path


def collect(paths) -> tuple[list[Path], list[dict]]:
    """Files to classify: files as given, folders searched recursively for image files.

    Returns:
        (files, failed): ``failed`` holds ``{"path", "reason"}`` for paths that
        do not exist and folders without images.
    """
    files, failed = [], []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                exts = ", ".join(sorted(IMAGE_EXTENSIONS))
                failed.append({"path": str(given), "reason": f"folder holds no image files ({exts})"})
            files += found
        elif given.exists():
            files.append(given)
        else:
            failed.append({"path": str(given), "reason": "file not found"})
    return files, failed


def best_model(models_dir: Path) -> str:
    """The model folder in ``models_dir`` with the best test accuracy its ``config.json`` records."""
    names = model_names(models_dir)
    ranked = {}
    for name in names:
        accuracy = read_model(models_dir / name).get("metrics", {}).get("accuracy")
        if accuracy is not None:
            ranked[name] = float(accuracy)
    if not ranked:
        raise PipelineError(
            f"no model in {models_dir} records a test accuracy ({', '.join(names) or 'none'}), so there is no best "
            "model to pick; run dvc repro, or choose one with --model"
        )
    # max keeps the first of equals: a head (cheaper, and logreg gives probabilities) before finetune.
    return max(ranked, key=ranked.get)


def resolve_model(model: str | None, project) -> Path:
    """``--model`` as a model folder: a path to one as given, a name in ``<project>/models``, or the best there."""
    models_dir = Path(project) / "models"
    if model is None:
        return models_dir / best_model(models_dir)
    given = Path(model)
    if given.exists() or len(given.parts) > 1:
        return given  # a path: load_bundle says what is wrong with it, if anything
    return model_path(models_dir, model)  # or a one-line error listing the models there


def predict_files(bundle: Bundle, files: list[Path], *, top_k: int = 3, batch_size: int = 32):
    """Yield ``{"path", "top": [{"class", "score"}]}`` or ``{"path", "reason"}`` per file, in order."""
    k = min(top_k, len(bundle.classes))
    # A user's photo has no recorded hash: read unchecked, through the one image reader.
    rows = [Row(str(path), -1, "", "") for path in files]
    for row, s, why in bundle.score_rows("", rows, batch_size):
        if s is None:
            yield {"path": row.path, "reason": why}
            continue
        order = np.argsort(-s, kind="stable")[:k]
        yield {"path": row.path, "top": [{"class": bundle.classes[i], "score": float(s[i])} for i in order]}


def run_predict(
    *,
    paths,
    model: str | None = None,
    top_k: int = 3,
    as_json: bool = False,
    project=".",
    device: str = "auto",
    batch_size: int = 32,
    out=None,
    err=None,
) -> dict:
    """The ``predict`` command: print the top-k classes per image.

    Args:
        paths: image files and folders (searched recursively).
        model: a model folder's path, a name in ``<project>/models`` (``logreg``,
            ``svm``, ..., ``finetune``), or None for the best there by test
            accuracy (:func:`best_model`).
        as_json: one JSON document on ``out`` instead of lines.
        project: the folder holding models/ (used only when ``model`` is not a path).

    Returns:
        the JSON document (also when printing lines).

    Raises:
        PipelineError: after printing everything else, if any file failed.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if not isinstance(top_k, int) or top_k < 1:
        raise PipelineError(f"--top-k must be a whole number >= 1, found {top_k!r}")
    where = place(device, "fp32", section="predict")  # scores are fp32, as evaluate's
    project = Path(project)
    files, failed = collect(paths)
    m = load_bundle(resolve_model(model, project)).to(where.device)
    kind = "probabilities" if m.probabilities else "scores: softmax of SVM decision values, not probabilities"
    doc = {"model": m.name, "description": m.description, "scores": kind, "top_k": min(top_k, len(m.classes)),
           "predictions": [], "failed": failed}
    if not as_json:
        print(f"# model {m.description}: {kind}", file=out, flush=True)
        for f in failed:
            print(f"skipped {f['path']}: {f['reason']}", file=err, flush=True)
    for result in predict_files(m, files, top_k=top_k, batch_size=batch_size):
        if "reason" in result:
            failed.append(result)
            if not as_json:
                print(f"skipped {result['path']}: {result['reason']}", file=err, flush=True)
            continue
        doc["predictions"].append(result)
        if not as_json:
            shown = ", ".join(f"{t['class']} {t['score']:.3f}" for t in result["top"])
            print(f"{result['path']}: {shown}", file=out, flush=True)
    if as_json:
        print(json.dumps(doc, indent=2, ensure_ascii=False), file=out, flush=True)
    if failed:
        n = len(doc["predictions"]) + len(failed)
        where = "in the JSON" if as_json else "above"
        raise PipelineError(f"{len(failed)} of {n} files could not be classified (listed {where})")
    return doc
