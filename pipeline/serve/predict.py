"""``python -m pipeline predict``: apply a trained model to new photos.

The model is one of the project's: ``logreg`` or ``svm`` (the backbone of
params.yaml, then the head), or ``finetune`` (the fine-tuned network). By
default the best by test accuracy in ``reports/metrics.json``. Files that cannot
be read are listed with the reason and do not stop the others.

Example:
    $ python -m pipeline predict photos/ --top-k 2
    # model logreg on efficientnet_lite0: probabilities
    photos/tabby.jpg: cat 0.991, dog 0.009
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.errors import BadImage, PipelineError
from pipeline.data.images import IMAGE_EXTENSIONS, load_rgb

MODELS = ("logreg", "svm", "finetune")


@dataclass
class Model:
    """A loaded model: images (N, 3, H, W) -> per-class scores that sum to 1."""

    name: str
    description: str
    classes: list[str]
    transform: Callable
    scores: Callable[[torch.Tensor], np.ndarray]
    probabilities: bool  # False: softmax of decision values, not calibrated probabilities


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
    """The model with the highest test accuracy in ``reports/metrics.json``."""
    path = project / "reports" / "metrics.json"
    if not path.is_file():
        raise PipelineError(
            f"{path} not found, so there is no best model to pick; run dvc repro, or choose one with "
            f"--model {'|'.join(MODELS)}"
        )
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        ranked = {name: float(metrics[name]["accuracy"]) for name in MODELS if name in metrics}
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{path} is not the evaluate stage's metrics file ({e}); run dvc repro") from None
    if not ranked:
        raise PipelineError(f"{path} names none of {', '.join(MODELS)}; run dvc repro, or choose one with --model")
    # max keeps the first of equals: a head (cheaper, and logreg gives probabilities) before finetune.
    return max(ranked, key=ranked.get)


def load_model(project: Path, name: str, device: torch.device) -> Model:
    """Load ``name`` from ``project``, checking it matches the backbone of params.yaml.

    Raises:
        PipelineError: unknown or missing model, or one made with another backbone.
    """
    from pipeline.params import load_params

    if name not in MODELS:
        raise PipelineError(f"unknown model '{name}'; accepted: {', '.join(MODELS)}")
    params = load_params(project / "params.yaml")
    backbone, weights = params["backbone"]["name"], str(params["backbone"]["weights"])
    if name == "finetune":
        return _load_finetuned(project, backbone, device)

    from pipeline.backbones import load_backbone
    from pipeline.heads.batch import load_head, scores

    # A relative weights path in params.yaml is relative to the project, not to
    # where predict runs; the head recorded it as params.yaml spells it.
    local = project / weights
    use = str(local) if not Path(weights).is_absolute() and local.is_file() else weights
    bb = load_backbone(backbone, use)
    expected = bb.provenance()
    if use != weights:
        expected["weights"] = weights
    head = load_head(project / "models" / f"{name}.joblib", expected)
    est = head["estimator"]
    features = bb.features.to(device).eval()

    def score(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            f = features(x.to(device)).float().cpu().numpy()
        s = scores(est, f)
        if hasattr(est, "predict_proba"):
            return s
        return torch.from_numpy(np.asarray(s, dtype=np.float64)).softmax(1).numpy()

    return Model(
        name,
        f"{name} on {backbone}",
        list(head["classes"]),
        bb.transform,
        score,
        probabilities=hasattr(est, "predict_proba"),
    )


def _load_finetuned(project: Path, backbone: str, device: torch.device) -> Model:
    from pipeline.finetune.train import load_finetuned, transform_of

    path = project / "models" / "finetune.pt"
    net, info = load_finetuned(path)
    if info["backbone"] != backbone:
        raise PipelineError(
            f"{path} was fine-tuned from {info['backbone']} but params.yaml's backbone.name is {backbone}; "
            "it is stale: run dvc repro"
        )
    net.to(device)

    def score(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return net(x.to(device)).float().softmax(1).cpu().numpy()

    return Model("finetune", f"finetune ({backbone})", list(info["classes"]), transform_of(info).build(), score, True)


def predict_files(model: Model, files: list[Path], *, top_k: int = 3, batch_size: int = 32):
    """Yield ``{"path", "top": [{"class", "score"}]}`` or ``{"path", "reason"}`` per file, in order."""
    k = min(top_k, len(model.classes))
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        decoded = []
        for path in chunk:
            try:
                decoded.append(model.transform(load_rgb(path)))
            except BadImage as e:
                decoded.append(e.reason)
        good = [x for x in decoded if not isinstance(x, str)]
        s = model.scores(torch.stack(good)) if good else np.zeros((0, len(model.classes)))
        rows = iter(s)
        for path, x in zip(chunk, decoded):
            if isinstance(x, str):
                yield {"path": str(path), "reason": x}
                continue
            row = next(rows)
            order = np.argsort(-row, kind="stable")[:k]
            yield {"path": str(path), "top": [{"class": model.classes[i], "score": float(row[i])} for i in order]}


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
        model: ``logreg``, ``svm``, ``finetune`` or None for the best in
            ``reports/metrics.json``.
        as_json: one JSON document on ``out`` instead of lines.
        project: the folder holding params.yaml, models/ and reports/.

    Returns:
        the JSON document (also when printing lines).

    Raises:
        PipelineError: after printing everything else, if any file failed.
    """
    from pipeline.extract.local import resolve_device

    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise PipelineError(f"unknown --device '{device}'; accepted: auto, cpu, cuda, cuda:N")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"--device {device} but no CUDA device is available; use auto or cpu")
    out = out or sys.stdout
    err = err or sys.stderr
    if not isinstance(top_k, int) or top_k < 1:
        raise PipelineError(f"--top-k must be a whole number >= 1, found {top_k!r}")
    project = Path(project)
    files, failed = collect(paths)
    name = model or best_model(project)
    m = load_model(project, name, resolve_device(device))
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
