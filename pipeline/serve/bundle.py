"""The model bundle: a trained model that any scorer loads on its own, without params.yaml.

A bundle is what a training stage wrote, read back with everything needed to
score images: the backbone (registry name, weights, their sha256, the
:class:`~pipeline.data.transform.TransformSpec` the weights expect), the class
list, and either a head (``models/<head>.joblib``) or a fine-tuned network
(``models/finetune.pt`` + ``.json``). Evaluate, predict and visualize all score
through it, so none of them reads another stage's internals or params.yaml.

Loading refuses a stale bundle: one whose recorded provenance differs from
``expected``, or, for a head, whose recorded backbone weights or transform are
no longer what the registry builds from them.

Example:
    >>> b = load_bundle("models", "logreg")                          # doctest: +SKIP
    >>> b.scores(torch.stack([b.transform(img)]))                    # doctest: +SKIP
    array([[0.991, 0.009]])
    >>> b.network()(x).softmax(1)     # differentiable: features + linear layer   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.backbones import Backbone, load_backbone
from pipeline.data.images import decode_checked
from pipeline.data.manifest import Row
from pipeline.data.transform import TransformSpec
from pipeline.errors import PipelineError
from pipeline.extract.cache import check_provenance
from pipeline.finetune.checkpoint import load_finetuned
from pipeline.finetune.network import FineTuneNet
from pipeline.heads.model import head_path, load_head, scores, to_torch_linear

FINETUNE = "finetune"

#: The provenance a backbone gives (:meth:`Backbone.provenance`).
BACKBONE_KEYS = ("backbone", "weights", "weights_sha256", "transform")


class Bundle:
    """A loaded model: images in, per-class scores out.

    Attributes:
        name: ``logreg``, ``svm``, ... or ``finetune``.
        kind: ``head`` or ``finetune``.
        path: the model file.
        classes: class names, in score order.
        provenance: what the model recorded (backbone, weights, weights_sha256,
            transform description; heads also the cache's decoder and precision).
        probabilities: False where :meth:`scores` is a softmax of decision
            values (SVM), not calibrated probabilities.
    """

    kind = ""

    def __init__(self, name: str, path: Path, classes: list[str], provenance: dict, probabilities: bool):
        self.name, self.path, self.classes = name, Path(path), list(classes)
        self.provenance, self.probabilities = dict(provenance), probabilities
        self.device = torch.device("cpu")

    @property
    def description(self) -> str:
        return f"{self.name} on {self.provenance['backbone']}"

    @property
    def transform_spec(self) -> TransformSpec:
        raise NotImplementedError

    @property
    def transform(self) -> Callable:
        """The eval preprocessing: PIL image -> normalised float tensor (3, crop, crop)."""
        return self.transform_spec.build()

    def spec(self) -> dict:
        """The backbone this model needs: name, weights, weights_sha256, transform (a TransformSpec dict)."""
        p = self.provenance
        return {"name": p["backbone"], "weights": p["weights"], "weights_sha256": p["weights_sha256"],
                "transform": self.transform_spec.to_dict()}

    def to(self, device: torch.device) -> Bundle:
        """Run :meth:`scores` on ``device`` (a :func:`pipeline.runtime.place`'s ``device``)."""
        self.device = torch.device(device)
        return self

    def scores(self, images: torch.Tensor) -> np.ndarray:
        """Per-class scores (N, C) of a batch from :attr:`transform`; each row sums to 1."""
        raise NotImplementedError

    def network(self) -> nn.Module:
        """The model as one differentiable module: images -> logits (N, C), on the CPU, in eval mode.

        Its parameters do not require gradients; gradients flow to the input
        (visualisation and attacks). It has ``.features`` and ``.head``.
        """
        raise NotImplementedError

    def score_rows(self, root, rows: Sequence[Row], batch_size: int = 32) -> Iterator[tuple]:
        """Decode and score rows in order: ``(row, scores, None)`` or ``(row, None, reason)``.

        Images are read through :func:`~pipeline.data.images.decode_checked`:
        a row's recorded sha256 is checked; a row without one (a user's photo)
        is read unchecked.
        """
        transform = self.transform
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            decoded = [decode_checked(root, row, transform) for row in chunk]
            good = [x for x, _ in decoded if x is not None]
            s = iter(self.scores(torch.stack(good)) if good else ())
            for row, (x, why) in zip(chunk, decoded):
                yield row, (None if x is None else next(s)), why


class HeadBundle(Bundle):
    """A head on cached features, with the backbone rebuilt from what the head recorded."""

    kind = "head"

    def __init__(self, name: str, path: Path, saved: dict):
        self.estimator = saved["estimator"]
        super().__init__(name, path, saved["classes"], saved["provenance"],
                         probabilities=hasattr(self.estimator, "predict_proba"))
        self._backbone: Backbone | None = None

    @property
    def backbone(self) -> Backbone:
        """The backbone the head's features came from, loaded on first use and checked."""
        if self._backbone is None:
            recorded = self.provenance
            if recorded.get("decoder") == "pillow":
                # Scoring decodes every photo exactly; these features saw reduced-scale JPEG decoding.
                raise PipelineError(
                    f"head {self.path} was trained on features made with decoder='pillow' (reduced-scale JPEG "
                    "decoding) but scoring decodes with 'pillow-exact'; set extract.decoder: auto or "
                    "pillow-exact and run dvc repro")
            # backbone.input_size, where the model recorded one (its transform records the crop either way).
            input_size = int(recorded.get("input_size", 0))
            weights = _weights_argument(recorded["backbone"], recorded["weights"], input_size, self.path.parent.parent)
            bb = load_backbone(recorded["backbone"], weights, input_size)
            now = {k: bb.provenance()[k] for k in BACKBONE_KEYS}
            if weights != recorded["weights"]:  # the reference was translated; the sha256 still checks the content
                now["weights"] = recorded["weights"]
            check_provenance(recorded, now, f"head {self.path}")
            self._backbone = bb
        return self._backbone

    @property
    def transform_spec(self) -> TransformSpec:
        return self.backbone.transform_spec

    def scores(self, images: torch.Tensor) -> np.ndarray:
        features = self.backbone.features.to(self.device).eval()  # network() shares it and may have moved it
        with torch.inference_mode():
            f = features(images.to(self.device)).float().cpu().numpy()
        s = scores(self.estimator, f)
        if self.probabilities:
            return s
        return torch.from_numpy(np.asarray(s, dtype=np.float64)).softmax(1).numpy()

    def network(self) -> FineTuneNet:
        net = FineTuneNet(self.backbone.features, to_torch_linear(self.estimator)).cpu().eval()
        return net.requires_grad_(False)


class FinetunedBundle(Bundle):
    """The fine-tuned network (``models/finetune.pt``) and its description (``.json``)."""

    kind = "finetune"

    def __init__(self, path: Path, expected: dict | None):
        self.net, self.info = load_finetuned(path, expected)
        super().__init__(FINETUNE, path, self.info["classes"], self.info["provenance"], probabilities=True)

    @property
    def description(self) -> str:
        return f"finetune ({self.provenance['backbone']})"

    @property
    def transform_spec(self) -> TransformSpec:
        return TransformSpec.from_dict(self.info["transform"])

    def scores(self, images: torch.Tensor) -> np.ndarray:
        net = self.net.to(self.device).eval()  # network() may have moved it
        with torch.inference_mode():
            return net(images.to(self.device)).float().softmax(1).cpu().numpy()

    def network(self) -> FineTuneNet:
        return self.net.cpu().eval()


def _weights_argument(name: str, recorded: str, input_size: int, project: Path) -> str:
    """The ``load_backbone`` argument that rebuilds the weights a model recorded.

    A relative weights path is relative to the project (the models folder's
    parent), wherever the scorer runs. A named weights is recorded as the
    registry resolved it (``ResNet50_Weights.IMAGENET1K_V2``,
    ``<package>:<file>``, ``timm/<model>.<tag>``); where that is what
    ``DEFAULT`` resolves to, ``DEFAULT`` rebuilds it, and the sha256 check
    confirms the content.
    """
    path = Path(recorded)
    if not path.is_absolute() and (project / path).is_file():
        return str(project / path)
    if recorded.lower() == "none" or path.exists():
        return recorded
    # pretrained=False resolves the name without reading or downloading any weights.
    if load_backbone(name, "DEFAULT", input_size, pretrained=False).weights == recorded:
        return "DEFAULT"
    return recorded


def model_names(models_dir) -> list[str]:
    """The models saved in ``models_dir``: its heads (``<head>.joblib``), then ``finetune`` if there."""
    models_dir = Path(models_dir)
    heads = sorted(p.stem for p in models_dir.glob("*.joblib"))
    return heads + ([FINETUNE] if (models_dir / f"{FINETUNE}.pt").is_file() else [])


def model_path(models_dir, name: str) -> Path:
    """``models/<head>.joblib`` or ``models/finetune.pt``."""
    path = (Path(models_dir) / f"{FINETUNE}.pt") if name == FINETUNE else head_path(models_dir, name)
    if not path.is_file():
        found = ", ".join(model_names(models_dir)) or "none: run dvc repro"
        raise PipelineError(f"no model '{name}' ({path} not found); saved in {models_dir}: {found}")
    return path


def load_bundle(path, name: str | None = None, expected: dict | None = None) -> Bundle:
    """Load a model as a :class:`Bundle`, refusing a stale one.

    Args:
        path: the models folder (with ``name``) or a model file
            (``models/logreg.joblib``, ``models/finetune.pt``).
        name: ``logreg``, ``svm``, ... or ``finetune``.
        expected: provenance keys (:data:`BACKBONE_KEYS`; heads also the
            cache's ``decoder`` and ``precision``) and ``classes`` the model must
            match.

    Raises:
        PipelineError: unknown name, missing or foreign file, or stale provenance.
    """
    path = Path(path)
    if name is not None:
        path = model_path(path, name)
    elif path.suffix == ".pt":
        name = FINETUNE
    else:
        name = path.stem
    if name == FINETUNE:
        return FinetunedBundle(path, expected)
    if path.suffix != ".joblib":
        raise PipelineError(f"{path} is not a model of this project: models/<head>.joblib or models/finetune.pt")
    return HeadBundle(name, path, load_head(path, expected))
