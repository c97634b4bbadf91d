"""The networks the visualize stage differentiates through, all on pixels in [0, 1].

The optimisation loops of :mod:`pipeline.visualize.optvis` change pixels, so
every model here takes an image batch in [0, 1] and normalises inside
(:class:`OnPixels`): the backbone's own ImageNet classifier
(:func:`imagenet_model`) and a trained model's differentiable network from its
bundle (:func:`head_model`, :mod:`pipeline.serve.bundle`).

Where and in what precision they run is one :class:`~pipeline.runtime.Placement`
(device and autocast), resolved once by the stage from ``visualize.device`` and
``visualize.precision``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet18_Weights

from pipeline.backbones import Backbone
from pipeline.errors import PipelineError
from pipeline.runtime import Placement
from pipeline.serve.bundle import Bundle


#: fp32 on the CPU: what the library functions use unless told otherwise.
CPU = Placement()


class OnPixels(nn.Module):
    """Pixels in [0, 1] -> normalise -> ``network`` -> logits, one differentiable model.

    Args:
        network: a normalised image batch -> (N, K) logits.
        mean, std: the backbone's normalisation (its ``transform_spec``).
        center_logits: subtract each row's mean logit. Softmax and argmax are
            unchanged; it gives a binary head's first class (whose logit is the
            constant 0 in ``(0, z)``) the logit ``-z/2``, so maximising it has a gradient.
        size: the input side the network expects (its crop): :func:`class_probabilities`
            resizes other images to it, so one network can score another's images.
    """

    def __init__(self, network: nn.Module, mean, std, center_logits: bool = False, size: int | None = None):
        super().__init__()
        self.network = network
        self.center_logits = center_logits
        self.size = size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network((x - self.mean) / self.std).float()  # float even under bf16 autocast
        if self.center_logits:
            logits = logits - logits.mean(dim=1, keepdim=True)
        return logits


def imagenet_model(bb: Backbone, key: str = "visualize.imagenet_classes") -> OnPixels:
    """The backbone's full ImageNet network on pixels in [0, 1]: 1000 logits.

    Raises:
        PipelineError: the weights have no ImageNet classifier (DINOv2, CLIP,
            ImageNet-21k heads); the message names ``key``, the setting that asked for one.
    """
    if not bb.has_imagenet_classifier:
        raise PipelineError(f"{key} needs an ImageNet classifier, and {bb.name} ({bb.weights}) has none; "
                            f"choose a backbone that has one (efficientnet_lite2) or leave {key} empty")
    s = bb.transform_spec
    return OnPixels(nn.Sequential(bb.features, bb.classifier), s.mean, s.std, size=s.crop).eval()


def head_model(bundle: Bundle) -> OnPixels:
    """A trained model (a head on its backbone, or the fine-tuned network) on pixels in [0, 1].

    ``bundle.network()`` is the differentiable model on normalised images (a
    head's scaler and linear classifier fold into one ``nn.Linear``). A binary
    model's logits are centred: a head's ``(0, z)`` becomes ``(-z/2, z/2)``,
    same softmax and prediction, but the first class's logit is no longer a
    constant, so its ideal image can be optimised.
    """
    s = bundle.transform_spec
    return OnPixels(bundle.network(), s.mean, s.std, center_logits=len(bundle.classes) == 2, size=s.crop).eval()


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, in class-id order (shipped with torchvision, no download)."""
    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """A square batch resized to ``size`` (bilinear, antialiased), unchanged if it has that size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def class_probabilities(model: nn.Module, images: torch.Tensor, compute: Placement = CPU) -> torch.Tensor:
    """Softmax of ``model`` on ``images``, on the CPU in float32.

    The images are resized to ``model.size`` first where the model has one
    (:class:`OnPixels`), so a judge or a transfer network of another input size
    sees them as it expects.
    """
    x = images.to(compute.device)
    if getattr(model, "size", None) is not None:
        x = resize(x, model.size)
    with compute.autocast():
        logits = model(x)
    return logits.float().softmax(1).cpu()
