"""Where a network's features end and its ImageNet classifier begins: one rule.

The feature layer is the input of the model's final classifier, after the
model's own pooling: the last ``nn.Linear`` (the one producing the logits) is
cut out and what feeds it is the feature vector. Dropout right before it goes
with the classifier, so features are the same in training mode (fine-tuning)
as in eval mode.

One torchvision family does not fit: squeezenet's classifier is a 1x1
convolution applied *before* the global pooling, so no layer carries a pooled
vector that the ImageNet classifier reads. There the features are the global
average of the last feature map (512 channels), and there is no ImageNet
classifier on them (``classifier is None``).
"""

from __future__ import annotations

import torch
from torch import nn


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def final_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last ``nn.Linear`` in registration order (the logits layer), or None."""
    found = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (path, module)
    return found


def split_at_classifier(model: nn.Module, trained_head: bool = True) -> tuple[nn.Module, nn.Module | None, int]:
    """Cut ``model`` into (features, classifier, feature width), in place.

    Args:
        trained_head: False where the weights' classifier layers are not
            trained (VGG16 ``IMAGENET1K_FEATURES`` ships NaN there): then the
            whole top-level block holding the final layer is cut, the features
            are the model's pooled convolutional output, and the classifier is
            None.

    Returns:
        ``features`` (``model`` itself, with the cut part replaced),
        ``classifier`` with ``classifier(features(x)) == model(x)`` in eval mode
        (None where there is none), and the features' width.
    """
    found = final_linear(model)
    if found is None:
        return _pool_last_map(model)
    path, linear = found
    if not trained_head:
        block = path.split(".")[0]
        first = next(m for m in model.get_submodule(block).modules() if isinstance(m, nn.Linear))
        setattr(model, block, nn.Identity())
        return model, None, first.in_features
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    if parent_path and isinstance(parent, nn.Sequential):
        k = list(parent._modules).index(attr)
        while k > 0 and isinstance(parent[k - 1], nn.Dropout):
            k -= 1
        head = parent[k:]
        _set(model, parent_path, parent[:k])
        return model, head, linear.in_features
    _set(model, path, nn.Identity())
    return model, linear, linear.in_features


def _pool_last_map(model: nn.Module) -> tuple[nn.Module, None, int]:
    """squeezenet: global average of the last feature map; no ImageNet classifier."""
    if not isinstance(getattr(model, "features", None), nn.Module) or not hasattr(model, "classifier"):
        raise ValueError(f"{type(model).__name__} has neither a Linear classifier nor features + classifier")
    # SqueezeNet.forward is flatten(classifier(features(x))): with a pooling
    # classifier the whole model is the feature network.
    model.classifier = nn.AdaptiveAvgPool2d(1)
    return model, None, width_by_forward(model.features)


def width_by_forward(module: nn.Module, size: int = 64) -> int:
    """Channels of ``module``'s output on one small dummy image."""
    p = next(module.parameters())
    with torch.no_grad():
        return int(module(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)).shape[1])
