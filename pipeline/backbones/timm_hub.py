"""timm models by name: ``timm/<model>.<tag>``, weights from the Hugging Face hub.

Any of ``timm.list_pretrained()`` works (``timm/convnext_tiny.fb_in22k_ft_in1k``,
``timm/vit_small_patch14_dinov2.lvd142m``); without a tag, timm's default tag
for the model is used and recorded. The weights file is fetched at run time
into the Hugging Face cache (``$HF_HOME/hub``); offline, a one-line error says
which file to place where.

The network is built with the weights' ImageNet-1k classifier where they have
one (``num_classes == 1000``) and cut after the pooling, else with
``num_classes=0`` (DINOv2, ImageNet-21k heads): then :attr:`Backbone.classifier`
is None. The preprocessing is timm's ``resolve_data_config`` for the model.
"""

from __future__ import annotations

import fnmatch
import math
from functools import lru_cache
from pathlib import Path

import huggingface_hub
import timm
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from timm.data import resolve_data_config
from torch import nn

from pipeline.backbones.base import (Backbone, BackboneSpec, check_input_size, frozen, looks_like_path,
                                     seeded, unknown_weights)
from pipeline.data.transform import TransformSpec
from pipeline.errors import PipelineError
from pipeline.fileio import file_digest

PREFIX = "timm/"

#: Files timm looks for in a hub repository, in its order of preference.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@lru_cache(maxsize=1)
def pretrained_names() -> frozenset[str]:
    """Every ``<model>.<tag>`` timm has weights for."""
    return frozenset(timm.list_pretrained())


def matching(pattern: str) -> list[str]:
    """``timm/<model>.<tag>`` names matching a shell pattern (``*dinov2*``)."""
    return sorted(PREFIX + n for n in fnmatch.filter(pretrained_names(), pattern))


def timm_spec(name: str) -> TimmSpec:
    """The spec of ``timm/<model>[.<tag>]``; KeyError if timm has no such weights."""
    model = name[len(PREFIX):]
    cfg = timm.models.get_pretrained_cfg(model) if model else None
    if cfg is None or f"{cfg.architecture}.{cfg.tag}" not in pretrained_names():
        raise KeyError(name)
    return TimmSpec(name, cfg)


class TimmSpec(BackboneSpec):
    source = "timm"

    def __init__(self, name: str, cfg):
        self.name, self.cfg = name, cfg
        self.model = f"{cfg.architecture}.{cfg.tag}"  # the exact tag, recorded in the provenance
        self.family = "timm:" + cfg.architecture.split("_")[0]

    def weights_choices(self) -> list[str]:
        return ["DEFAULT"]

    @property
    def has_imagenet_classifier(self) -> bool:
        return self.cfg.num_classes == 1000

    def _named_source(self, weights: str) -> str:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        if not self.cfg.hf_hub_id:
            return f"{self.cfg.url} (not on the Hugging Face hub: download it, set backbone.weights to the file)"
        return f"Hugging Face hub repo {self.cfg.hf_hub_id} ({HUB_FILES[0]}), cached in {cache}"

    def transform_for(self, weights: str, input_size: int) -> TransformSpec:
        return _transform(self.name, self.cfg.to_dict(), input_size)

    def load(self, weights: str = "DEFAULT", input_size: int = 0, pretrained: bool = True) -> Backbone:
        weights = str(weights).strip()
        input_size = check_input_size(input_size, self.name)
        transform = self.transform_for(weights, input_size)  # refuses crops this project cannot make, first
        file, resolved, source = None, "none", "random initialisation (seed 0)"
        # The label a cache or model recorded (timm/<model>.<tag>) names these weights too.
        if weights.upper() in ("DEFAULT", self.cfg.tag.upper()) or weights == PREFIX + self.model:
            resolved, source = PREFIX + self.model, f"https://huggingface.co/{self.cfg.hf_hub_id}"
            file = self.hub_file() if pretrained else None
        elif looks_like_path(weights):
            resolved = source = weights
            file = Path(weights).expanduser() if pretrained else None
        elif weights.lower() != "none":
            raise unknown_weights(self.name, weights, [*self.weights_choices(), self.cfg.tag])
        sha = ""
        if file is not None:
            if not file.is_file():
                raise PipelineError(f"weights file {file} not found (backbone.weights for {self.name})")
            sha = file_digest(file)
        model = self.architecture(input_size, file)
        classifier = None
        if self.has_imagenet_classifier:
            classifier = model.get_classifier()
            model.reset_classifier(0)  # keeps the model's own pooling; only the final layer goes
        dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        return Backbone(
            self.name, frozen(model), None if classifier is None else frozen(classifier), dim,
            transform, resolved, sha, input_size, source,
        )

    def architecture(self, input_size: int = 0, file: Path | None = None) -> nn.Module:
        """The network (seeded random init, or the weights in ``file``)."""
        kwargs = dict(num_classes=1000 if self.has_imagenet_classifier else 0)
        if input_size and self.cfg.fixed_input_size:
            kwargs["img_size"] = input_size  # timm resamples the position embeddings on load
        if file is not None:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
        try:
            with seeded():
                return timm.create_model(self.model, **kwargs)
        except Exception as e:  # noqa: BLE001 - a bad file or size means the same to the user
            raise PipelineError(
                f"cannot build {self.name} with backbone.input_size={input_size} and weights "
                f"{file or 'none'}: {str(e).splitlines()[0][:200]}"
            ) from None

    def hub_file(self) -> Path:
        """The weights file from the Hugging Face cache, downloaded there if missing."""
        repo = self.cfg.hf_hub_id
        if not repo:
            raise PipelineError(
                f"{self.name} has no weights on the Hugging Face hub (timm lists only {self.cfg.url}); "
                "download that file and set backbone.weights to its path"
            )
        for filename in HUB_FILES:
            try:
                return Path(huggingface_hub.hf_hub_download(repo, filename))
            except LocalEntryNotFoundError as e:
                raise self._offline(repo, e) from None
            except EntryNotFoundError:
                continue  # the repo has the other file
            except (OSError, huggingface_hub.errors.HfHubHTTPError) as e:
                raise self._offline(repo, e) from None
        raise PipelineError(f"hub repo {repo} of {self.name} holds none of {', '.join(HUB_FILES)}")

    def _offline(self, repo: str, e: Exception) -> PipelineError:
        cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
        folder = cache / f"models--{repo.replace('/', '--')}"
        reason = "offline" if huggingface_hub.constants.HF_HUB_OFFLINE else type(e).__name__
        return PipelineError(
            f"weights of {self.name}: file {HUB_FILES[0]} of hub repo {repo} is not in the Hugging Face "
            f"cache {cache} and could not be downloaded ({reason}); on a machine with network run "
            f"`hf download {repo} {HUB_FILES[0]}` and copy its {folder.name} folder into {cache}, "
            "or set backbone.weights to a local copy of the file"
        )


def _transform(name: str, cfg: dict, input_size: int) -> TransformSpec:
    """timm's eval preprocessing for the weights, as :class:`TransformSpec`."""
    args = {"input_size": (3, input_size, input_size)} if input_size else {}
    dc = resolve_data_config(args, pretrained_cfg=cfg)
    _, h, w = dc["input_size"]
    if h != w or dc.get("crop_mode", "center") != "center":
        raise PipelineError(
            f"{name} preprocesses with {dc.get('crop_mode')} crops of {h}x{w}; this project resizes the "
            "shorter side and centre-crops a square (pipeline/data/transform.py): choose another tag"
        )
    return TransformSpec(
        # timm's transforms_factory: the shorter side goes to floor(size / crop_pct).
        resize=math.floor(w / dc["crop_pct"]),
        crop=int(w),
        interpolation=dc["interpolation"],
        mean=tuple(float(v) for v in dc["mean"]),
        std=tuple(float(v) for v in dc["std"]),
    )
