"""Preprocessing: one :class:`TransformSpec` for every use of an image.

A backbone's weights fix the preprocessing they expect (resize, crop,
interpolation, mean, std); the registry reads it off the weights and every
consumer builds what it needs from the same spec:

==================  ==========================================  =========================
use                 method                                      output
==================  ==========================================  =========================
the feature cache   :meth:`~TransformSpec.resize_crop` +        uint8 batches, normalised
                    :meth:`~TransformSpec.normalize_`           on the model's device
evaluate, predict   :meth:`~TransformSpec.build`                float (3, crop, crop)
visualisation       :meth:`~TransformSpec.pixels`               float in [0, 1]
fine-tuning         :meth:`~TransformSpec.augment`              random crops and flips
==================  ==========================================  =========================

Resizing is always Pillow's, as in torchvision's ``weights.transforms()``, so
a photo's pixels are the same whichever stage reads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

#: RandomResizedCrop's area range for fine-tuning: milder than ImageNet
#: training's (0.08, 1): the photos are few and the network is already trained.
CROP_SCALE = (0.25, 1.0)


@dataclass(frozen=True)
class TransformSpec:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise."""

    resize: int
    crop: int
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def describe(self) -> str:
        """A readable, stable description; stored in the HDF5 cache and checked on read."""
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return (
            f"resize shorter side to {self.resize} ({self.interpolation}, Pillow), "
            f"center crop {self.crop}x{self.crop}, scale to [0, 1], "
            f"normalize mean=({mean}) std=({std})"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformSpec":
        return cls(
            resize=int(d["resize"]),
            crop=int(d["crop"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )

    def resize_crop(self, image):
        """PIL image -> PIL image of crop x crop: the geometric part of the transform."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        image = F.resize(image, self.resize, interpolation=InterpolationMode(self.interpolation))
        return F.center_crop(image, self.crop)

    def resize_crop_tensor(self, image) -> np.ndarray:
        """PIL image -> uint8 array (crop, crop, 3): the same geometry, resized as a uint8 tensor.

        torchvision's antialiased uint8 resize (vectorised) takes a third of
        Pillow's time for the same filter; pixels differ from Pillow's by at
        most 2 levels in 255 (measured: mean 0.003 on the sample photos).
        """
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        x = F.resize(x, self.resize, interpolation=InterpolationMode(self.interpolation), antialias=True)
        return F.center_crop(x, self.crop).permute(1, 2, 0).numpy()

    def normalize_(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 normalised, keeping the memory format."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1) * 255
        inv_std = 1 / (torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1) * 255)
        return batch.float().sub_(mean).mul_(inv_std)

    def _uint8(self, image) -> torch.Tensor:
        array = np.asarray(self.resize_crop(image).convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def build(self) -> Callable:
        """A callable PIL image -> normalised float tensor (3, crop, crop)."""
        return lambda image: self.normalize_(self._uint8(image)[None])[0].contiguous()

    def pixels(self) -> Callable:
        """A callable PIL image -> float tensor (3, crop, crop) in [0, 1], not normalised."""
        return lambda image: self._uint8(image).float().div_(255)

    def augment(self, crop_scale=CROP_SCALE, policy: str = "none", erasing: float = 0.0) -> Callable:
        """Random resized crop and horizontal flip at the input size, then normalised (training).

        Args:
            crop_scale: RandomResizedCrop's area range (``finetune.augment.crop_scale``).
            policy: ``trivialaugment`` or ``randaugment`` (torchvision's, on the
                uint8 crop) or ``none``.
            erasing: RandomErasing's probability, on the normalised tensor.
        """
        from torchvision.transforms import v2 as T

        policies = {"none": [], "trivialaugment": [T.TrivialAugmentWide()], "randaugment": [T.RandAugment()]}
        # Cropping and resizing the PIL image resizes with Pillow, as build() does.
        return T.Compose(
            [
                T.RandomResizedCrop(self.crop, scale=tuple(crop_scale),
                                    interpolation=T.InterpolationMode(self.interpolation)),
                T.RandomHorizontalFlip(),
                T.PILToTensor(),
                *policies[policy],
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(list(self.mean), list(self.std)),
                *([T.RandomErasing(p=erasing)] if erasing else []),
            ]
        )
