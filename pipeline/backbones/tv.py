"""torchvision's classification catalogue: every model with ImageNet weights, by name.

The names are torchvision's own (``resnet50``, ``convnext_tiny``, ``vit_b_16``,
...); ``backbone.weights`` takes any member of the model's weights enum
(``IMAGENET1K_V1``, ``IMAGENET1K_SWAG_E2E_V1``, ...), ``DEFAULT``, a local
state-dict file of the whole ImageNet network, or ``none``.

With weights, the network is built by torchvision's own builder from the
weights file in torch's hub cache. That matters where the weights change the
architecture: the SWAG and ``*_E2E`` ViTs at 384/512/518 px, GoogLeNet and
Inception-v3's input re-normalisation. Without weights (``none``, or for
loading a fine-tuned state) :func:`_arch_kwargs` builds what those weights
imply, without downloading.
"""

from __future__ import annotations

import os
import urllib.error
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.vision_transformer import interpolate_embeddings

from pipeline.backbones.base import (
    Backbone,
    BackboneSpec,
    check_input_size,
    frozen,
    load_file,
    load_into,
    looks_like_path,
    scaled_resize,
    seeded,
    unknown_weights,
)
from pipeline.backbones.split import split_at_classifier
from pipeline.data.transform import TransformSpec
from pipeline.errors import PipelineError
from pipeline.fileio import file_digest

#: Builder arguments the weights imply beyond the class count and image size
#: (as torchvision's builders set them when given weights): the Google-trained
#: weights expect inputs re-normalised inside the network, and their auxiliary
#: heads are dropped.
_WEIGHTS_KWARGS = {
    "googlenet": dict(transform_input=True, aux_logits=False, init_weights=True),
    "inception_v3": dict(transform_input=True, aux_logits=False, init_weights=True),
}

#: Models whose architecture depends on the input size, and the builder argument that sets it.
_SIZE_KWARG = {"vit_": "image_size", "maxvit_": "input_size"}


def catalogue_names() -> list[str]:
    """torchvision's classification models that have ImageNet weights."""
    return [n for n in tvm.list_models(module=tvm) if len(tvm.get_model_weights(n)) > 0]


class TorchvisionSpec(BackboneSpec):
    source = "torchvision"

    def __init__(self, name: str):
        self.name = name
        self.enum = tvm.get_model_weights(name)
        # "torchvision.models.vision_transformer" -> "vision_transformer"
        self.family = tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1]

    def weights_choices(self) -> list[str]:
        return ["DEFAULT", *(w.name for w in self.enum)]  # iterating skips the DEFAULT alias

    def resolve(self, weights: str):
        """A weights enum member from ``DEFAULT``, ``IMAGENET1K_V1`` or ``ResNet50_Weights.IMAGENET1K_V1``."""
        enum_name, _, member = weights.rpartition(".")
        if enum_name not in ("", self.enum.__name__) or member not in self.weights_choices():
            raise unknown_weights(self.name, weights, self.weights_choices())
        return self.enum.DEFAULT if member == "DEFAULT" else self.enum[member]

    def _member(self, weights: str):
        """The enum member that fixes the architecture and preprocessing (DEFAULT's for a file or none)."""
        if weights.lower() == "none" or looks_like_path(weights):
            return self.enum.DEFAULT
        return self.resolve(weights)

    def _named_source(self, weights: str) -> str:
        w = self.resolve(weights)
        return f"{_label(w)}: {w.url}, cached in {hub_file(w)}"

    def transform_for(self, weights: str, input_size: int) -> TransformSpec:
        return _transform(self._member(str(weights).strip()), input_size)

    @cached_property
    def feature_dim(self) -> int:
        """The default weights' feature width, read off the architecture (built without memory on 'meta')."""
        return split_at_classifier(self.architecture(self.enum.DEFAULT, 0, device="meta"))[2]

    def architecture(self, w, input_size: int, device: str = "cpu") -> nn.Module:
        """The network ``w`` implies at ``input_size`` (0: the weights' own), seeded random init.

        Args:
            device: ``meta`` builds the structure only (no memory, no init),
                where the builder allows it (RegNet's does not: built on CPU).
        """
        kwargs = dict(_WEIGHTS_KWARGS.get(self.name, {}))
        size = input_size or _native_size(w)
        for prefix, key in _SIZE_KWARG.items():
            if self.name.startswith(prefix):
                kwargs[key] = size if key == "image_size" else (size, size)
        try:
            with seeded(), torch.device(device):
                model = tvm.get_model(self.name, weights=None, **kwargs)
        except NotImplementedError:
            with seeded():
                model = tvm.get_model(self.name, weights=None, **kwargs)
        except (ValueError, AssertionError, RuntimeError) as e:
            if not input_size:
                raise  # at the weights' own size a failure is a bug, not a user's choice
            raise _size_error(self.name, input_size, e) from None
        return model

    def load(self, weights: str = "DEFAULT", input_size: int = 0, pretrained: bool = True) -> Backbone:
        weights = str(weights).strip()
        input_size = check_input_size(input_size, self.name)
        w = self._member(weights)
        sha, source = "", "random initialisation (seed 0)"
        # Without weights to read (none, or only the architecture a named weights implies) ...
        if weights.lower() == "none" or (not pretrained and not looks_like_path(weights)):
            model = self.architecture(w, input_size)
            resolved = "none" if weights.lower() == "none" else _label(w)
        elif looks_like_path(weights):  # ... a local file of the whole network ...
            path = Path(weights).expanduser()
            model = self.architecture(w, input_size)
            if pretrained:
                sha, source = load_file(model, path, self.name), str(path)
            resolved = weights
        else:  # ... or the named weights, from torch's hub cache.
            file = fetch(w, self.name)
            sha, source, resolved = file_digest(file), w.url, _label(w)
            model = self._pretrained(w, input_size)
        features, classifier, dim = split_at_classifier(model, trained_head=w.meta.get("categories") is not None)
        return Backbone(
            self.name, frozen(features), None if classifier is None else frozen(classifier), dim,
            _transform(w, input_size), resolved, sha, input_size, source,
        )

    def _pretrained(self, w, input_size: int) -> nn.Module:
        """torchvision's builder with the cached weights file; a ViT at another size gets its
        position embeddings interpolated, as torchvision does for fine-tuning at another size."""
        with seeded():
            model = tvm.get_model(self.name, weights=w)
        if not input_size or input_size == _native_size(w):
            return model
        if not self.name.startswith(tuple(_SIZE_KWARG)):
            return model  # convolutional: any size, same network
        target = self.architecture(w, input_size)
        state = model.state_dict()
        if self.name.startswith("vit_"):
            state = interpolate_embeddings(input_size, model.patch_size, state)
        load_into(target, state, _label(w), self.name)
        return target


def fetch(w, name: str) -> Path:
    """The weights file in torch's hub cache, downloaded there if missing."""
    file = hub_file(w)
    hub = file.parent
    if file.is_file():
        return file
    try:
        hub.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(file.name)
        torch.hub.download_url_to_file(w.url, str(file), match.group(1) if match else None, progress=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, RuntimeError) as e:
        reason = getattr(e, "reason", None) or str(e).splitlines()[0][:120]
        raise PipelineError(
            f"weights file {file.name} for {name} ({_label(w)}) is not in {hub} ($TORCH_HOME/hub/checkpoints) "
            f"and could not be downloaded from {w.url} ({reason}); offline? copy that file into {hub} "
            "from a machine with network, or set backbone.weights to a local state-dict file"
        ) from None
    return file


def hub_file(w) -> Path:
    """Where torch's hub cache keeps (or will keep) the weights file of ``w``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)


def _label(w) -> str:
    return f"{type(w).__name__}.{w.name}"


def _native_size(w) -> int:
    return int(w.transforms().crop_size[0])


def _transform(w, input_size: int) -> TransformSpec:
    t = w.transforms()
    resize, crop = scaled_resize(int(t.resize_size[0]), int(t.crop_size[0]), input_size)
    return TransformSpec(
        resize=resize,
        crop=crop,
        interpolation=t.interpolation.value,
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
    )


def _size_error(name: str, input_size: int, e: Exception) -> PipelineError:
    first = str(e).splitlines()[0][:200]
    return PipelineError(f"backbone.input_size {input_size} does not fit {name}: {first}; use another size, or 0")
