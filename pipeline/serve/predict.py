"""``python -m pipeline predict``: apply a trained model to new photos.

The model is one of the project's bundles (:mod:`pipeline.serve.bundle`):
a head of ``heads.train`` (``logreg``, ``svm``, ...: a head on its
backbone), or ``finetune`` (the fine-tuned network); by default the best by
test accuracy in ``reports/metrics_<head>.json`` and ``finetune_metrics.json``.
The bundle says which backbone and preprocessing it needs, so params.yaml is
not read. Files that cannot be read are listed with
the reason and do not stop the others.

Example:
    $ python -m pipeline predict photos/ --top-k 2
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
from pipeline.serve.bundle import FINETUNE, Bundle, load_bundle, model_names


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


def best_model(project: Path) -> str:
    """The saved model with the best test accuracy (``reports/metrics_<head>.json``, ``finetune_metrics.json``)."""
    reports, names = project / "reports", model_names(project / "models")
    ranked = {}
    for name in names:
        path = reports / (f"{FINETUNE}_metrics.json" if name == FINETUNE else f"metrics_{name}.json")
        if not path.is_file():
            continue
        try:
            ranked[name] = float(json.loads(path.read_text(encoding="utf-8"))[name]["accuracy"])
        except (ValueError, KeyError, TypeError) as e:
            raise PipelineError(f"{path} is not an evaluation report ({e}); run dvc repro") from None
    if not ranked:
        raise PipelineError(
            f"no test metrics in {reports} for the models in {project / 'models'} ({', '.join(names) or 'none'}), "
            "so there is no best model to pick; run dvc repro, or choose one with --model"
        )
    # max keeps the first of equals: a head (cheaper, and logreg gives probabilities) before finetune.
    return max(ranked, key=ranked.get)


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
        model: a head's name (``logreg``, ``svm``, ...), ``finetune``, or None
            for the best by test accuracy (:func:`best_model`).
        as_json: one JSON document on ``out`` instead of lines.
        project: the folder holding models/ and reports/.

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
    m = load_bundle(project / "models", model or best_model(project)).to(where.device)
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
