"""Fine-tuning's "last stage": which part of a backbone ``finetune.unfreeze: last`` trains.

The last stage is the last group of blocks at the network's coarsest
resolution, and every layer with parameters above it (a 1x1 head convolution,
a final norm, VGG's fc6/fc7). timm models say where their stages are
(``feature_info``: the last entry names the last stage's module); for
torchvision's architectures a short table, one row per class, names the
module the last stage starts at.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.backbones.registry import REGISTRY
from pipeline.errors import PipelineError

#: A step into a module: a child's name, or its index among the children (negative from the end).
Step = str | int


def _after_last_pool(features: nn.Sequential) -> int:
    """Index of the first layer after the last max-pool that has layers with parameters after it."""
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    with_params = [i for i in pools if any(p.numel() for m in features[i + 1:] for p in m.parameters())]
    return with_params[-1] + 1


#: torchvision architecture -> path of the module its last stage starts at.
TORCHVISION_LAST_STAGE: dict[str, Callable[[nn.Module], tuple[Step, ...]]] = {
    "ResNet": lambda m: ("layer4",),  # also ResNeXt and Wide ResNet
    "RegNet": lambda m: ("trunk_output", -1),
    # The last conv block of a plain stack; VGG's fc6/fc7 sit above it in the features.
    "VGG": lambda m: ("features", _after_last_pool(m.features)),
    "AlexNet": lambda m: ("features", _after_last_pool(m.features)),
    "SqueezeNet": lambda m: ("features", _after_last_pool(m.features)),
    # The last inverted-residual stage, then the 1x1 head convolution above it.
    "MobileNetV2": lambda m: ("features", -2),
    "MobileNetV3": lambda m: ("features", -2),
    "EfficientNet": lambda m: ("features", -2),
    "MNASNet": lambda m: ("layers", -4),
    "ShuffleNetV2": lambda m: ("stage4",),
    "DenseNet": lambda m: ("features", "denseblock4"),
    "GoogLeNet": lambda m: ("inception5a",),
    "Inception3": lambda m: ("Mixed_7a",),
    "ConvNeXt": lambda m: ("features", -1),
    "SwinTransformer": lambda m: ("features", -1),
    "MaxVit": lambda m: ("blocks", -1),
    "VisionTransformer": lambda m: ("encoder", "layers", -1),  # the last encoder block
}


def last_stage_modules(backbone_name: str, features_module: nn.Module) -> list[nn.Module]:
    """The modules ``unfreeze: last`` trains: the last stage and every module with parameters after it.

    Args:
        backbone_name: the registry name (for messages; the rule reads the structure).
        features_module: :attr:`Backbone.features`.

    Raises:
        PipelineError: for a name outside the registry or an architecture without a rule.
    """
    return _from(features_module, last_stage_path(backbone_name, features_module))


def last_stage_path(name: str, model: nn.Module) -> tuple[str, ...]:
    """The names leading from ``model`` (:attr:`Backbone.features`) to the module its last stage starts at.

    Raises:
        PipelineError: as :func:`last_stage_modules`.
    """
    return _names(model, _rule_path(name, model))


def _names(model: nn.Module, path: tuple[Step, ...]) -> tuple[str, ...]:
    names, node = [], model
    for step in path:
        children = list(node.named_children())
        i = step if isinstance(step, int) else [n for n, _ in children].index(str(step))
        name, node = children[i % len(children)]
        names.append(name)
    return tuple(names)


def _rule_path(name: str, model: nn.Module) -> tuple[Step, ...]:
    if name not in REGISTRY:
        raise PipelineError(
            f"finetune.unfreeze: last has no rule for backbone '{name}' (not a registry name); use none or all"
        )
    info = getattr(model, "feature_info", None)
    if info:  # timm
        entry = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        return tuple(entry["module"].split("."))
    rule = TORCHVISION_LAST_STAGE.get(type(model).__name__)
    if rule is None:
        raise PipelineError(
            f"finetune.unfreeze: last has no rule for backbone '{name}' ({type(model).__name__}); use none or "
            "all, or add one to TORCHVISION_LAST_STAGE in pipeline/backbones/stages.py"
        )
    return rule(model)


def _from(model: nn.Module, path: tuple[Step, ...]) -> list[nn.Module]:
    """The module at ``path`` and every module with parameters registered after it, outermost last.

    Registration order is the forward order for the architectures above.
    """
    later: list[list[nn.Module]] = []
    node = model
    for step in path:
        children = list(node.named_children())
        names = [n for n, _ in children]
        i = step if isinstance(step, int) else names.index(str(step))
        i %= len(children)
        later.append([m for _, m in children[i + 1:] if any(True for _ in m.parameters())])
        node = children[i][1]
    return [node, *(m for group in reversed(later) for m in group)]
