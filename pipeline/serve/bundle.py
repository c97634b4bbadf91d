"""The model bundle: a trained model that any scorer loads on its own, without params.yaml.

A bundle is a model folder (:mod:`pipeline.model_folder`: ``config.json`` +
``model.safetensors``) read back with everything needed to score images: the
backbone (registry name, weights, their sha256), the preprocessing as data (a
:class:`~pipeline.data.transform.TransformSpec` and the decoder), the class
list, and either a head (``models/<head>/``) or a fine-tuned network
(``models/finetune/``). Predict, visualize and export score through it, so
none of them reads another stage's internals, params.yaml or the repository:
a folder copied anywhere loads the same.

Loading refuses a pickle, tampered weights, a future format, a stale model
(one whose record differs from ``expected``), and, for a head, a backbone
whose weights or transform are no longer what the registry builds.

Example:
    >>> b = load_bundle("models/logreg")                              # doctest: +SKIP
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
from pipeline.finetune.checkpoint import finetuned_network
from pipeline.finetune.network import FineTuneNet
from pipeline.heads.model import head_estimator, head_path, score_layer, score_mode, scores, to_torch_linear
from pipeline.model_folder import model_folders, read_model
from pipeline.provenance import BACKBONE_KEYS, backbone_record, check_record

FINETUNE = "finetune"


class Bundle:
    """A loaded model: images in, per-class scores out.

    Attributes:
        name: ``logreg``, ``svm``, ... or ``finetune``.
        kind: ``head`` or ``finetune``.
        path: the model folder.
        config: its ``config.json`` (:func:`pipeline.provenance.model_record`).
        classes: class names, in score order.
        provenance: the backbone it needs (:func:`pipeline.provenance.backbone_record`).
        probabilities: False where :meth:`scores` is a softmax of decision
            values (SVM), not calibrated probabilities.
    """

    kind = ""

    def __init__(self, path: Path, config: dict, probabilities: bool):
        self.path, self.config = Path(path), config
        self.name, self.classes = config["name"], list(config["classes"])
        self.provenance, self.probabilities = backbone_record(config), probabilities
        self.device = torch.device("cpu")

    @property
    def description(self) -> str:
        return f"{self.name} on {self.provenance['backbone']}"

    @property
    def transform_spec(self) -> TransformSpec:
        """The preprocessing the model recorded, as data."""
        return TransformSpec.from_dict(self.config["preprocessing"])

    @property
    def transform(self) -> Callable:
        """The eval preprocessing: PIL image -> normalised float tensor (3, crop, crop)."""
        return self.transform_spec.build()

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

    def scoring_network(self) -> nn.Module:
        """Images -> the scores :meth:`scores` gives, as one torch module (what ``export`` writes)."""
        return nn.Sequential(self.network(), score_layer("softmax")).eval()

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

    def __init__(self, path: Path, estimator, config: dict):
        self.estimator = estimator
        super().__init__(path, config, probabilities=hasattr(estimator, "predict_proba"))
        if config["made_from"].get("heads_backbones"):
            raise PipelineError(
                f"head {self.path} was trained on the features of several backbones ({config['backbone']['name']}; "
                "heads.backbones), which only the pipeline's caches give: predict, visualize and export take a "
                "head on one backbone, or the fine-tuned network")
        self._backbone: Backbone | None = None

    @property
    def backbone(self) -> Backbone:
        """The backbone the head's features came from, loaded on first use and checked."""
        if self._backbone is None:
            recorded = self.provenance
            if self.config["preprocessing"].get("decoder") == "pillow":
                # Scoring decodes every photo exactly; these features saw reduced-scale JPEG decoding.
                raise PipelineError(
                    f"head {self.path} was trained on features made with decoder='pillow' (reduced-scale JPEG "
                    "decoding) but scoring decodes with 'pillow-exact'; set extract.decoder: auto or "
                    "pillow-exact and run dvc repro")
            input_size = int(recorded.get("input_size", 0))
            weights = _weights_argument(recorded["backbone"], recorded["weights"], input_size, self.path.parent.parent)
            bb = load_backbone(recorded["backbone"], weights, input_size)
            now = {k: v for k, v in bb.provenance().items() if k in BACKBONE_KEYS}
            if weights != recorded["weights"]:  # the reference was translated; the sha256 still checks the content
                now["weights"] = recorded["weights"]
            check_record(self.config, now, f"head {self.path}")
            self._backbone = bb
        return self._backbone

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

    def scoring_network(self) -> nn.Module:
        mode = score_mode(self.estimator, len(self.classes))
        return nn.Sequential(self.network(), score_layer(mode)).eval()


class FinetunedBundle(Bundle):
    """The fine-tuned network (``models/finetune/``)."""

    kind = "finetune"

    def __init__(self, path: Path, config: dict):
        self.net = finetuned_network(path, config)
        super().__init__(path, config, probabilities=True)

    @property
    def description(self) -> str:
        return f"finetune ({self.provenance['backbone']})"

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
    """The model folders saved in ``models_dir``: its heads, then ``finetune`` if there."""
    names = model_folders(models_dir)
    return [n for n in names if n != FINETUNE] + [n for n in names if n == FINETUNE]


def model_path(models_dir, name: str) -> Path:
    """``models/<name>``, which must be a model folder."""
    path = head_path(models_dir, name)
    if not path.is_dir():
        found = ", ".join(model_names(models_dir)) or "none: run dvc repro"
        raise PipelineError(f"no model '{name}' ({path} not found); saved in {models_dir}: {found}")
    return path


def load_bundle(path, name: str | None = None, expected: dict | None = None) -> Bundle:
    """Load a model folder as a :class:`Bundle`, after every check of :func:`~pipeline.model_folder.read_model`.

    Args:
        path: a model folder (``models/logreg``, a copy anywhere), or the
            models folder with ``name``.
        name: ``logreg``, ``svm``, ... or ``finetune``.
        expected: ``classes`` and backbone keys (:data:`~pipeline.provenance.BACKBONE_KEYS`)
            the model must match.

    Raises:
        PipelineError: unknown name, a pickle, a missing or foreign folder,
            tampered weights, a future format, or a stale model.
    """
    path = Path(path)
    if name is not None:
        path = model_path(path, name)
    config = read_model(path, expected)  # once: it hashes the weights
    if config["kind"] == "finetune":
        return FinetunedBundle(path, config)
    if config["kind"] == "head":
        return HeadBundle(path, head_estimator(path, config), config)
    raise PipelineError(f"{path}: config.json has kind {config['kind']!r}; accepted: head, finetune")
