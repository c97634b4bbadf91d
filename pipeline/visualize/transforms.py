"""Robustness transforms: random image -> image functions, joined by :func:`compose`.

The model sees the transformed image, so an optimised image must work under
small shifts, scalings and rotations, which keeps it from being
high-frequency noise. One of the parts :mod:`pipeline.visualize.optvis`
composes.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor], torch.Tensor]


def _choice(values: Sequence):
    return values[int(torch.randint(len(values), ()).item())]


def compose(transforms: Sequence[Transform]) -> Transform:
    """Apply ``transforms`` in order."""

    def inner(x):
        for t in transforms:
            x = t(x)
        return x

    return inner


def pad(w: int, value: float = 0.5) -> Transform:
    """Pad with a constant grey border, so jitter and rotation do not wrap or blacken edges."""
    return lambda x: F.pad(x, (w, w, w, w), mode="constant", value=value)


def jitter(d: int) -> Transform:
    """Crop a random (H-d+1, W-d+1) window: a random shift of up to ``d - 1`` pixels."""

    def inner(x):
        dx, dy = (int(v) for v in torch.randint(d, (2,)))
        h, w = x.shape[-2:]
        return x[..., dy : h - d + 1 + dy, dx : w - d + 1 + dx]

    return inner


def random_scale(scales: Sequence[float]) -> Transform:
    """Resize by a factor drawn from ``scales`` (bilinear)."""

    def inner(x):
        s = float(_choice(scales))
        h, w = x.shape[-2:]
        size = (max(1, round(h * s)), max(1, round(w * s)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    return inner


def random_rotate(angles: Sequence[float]) -> Transform:
    """Rotate about the centre by an angle in degrees drawn from ``angles`` (bilinear, border padded)."""

    def inner(x):
        a = math.radians(float(_choice(angles)))
        rot = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], device=x.device)
        grid = F.affine_grid(rot.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return inner


def standard_transforms(scale: float = 0.1, angle: float = 10.0, shift: int = 8) -> Transform:
    """Lucid's robustness set: pad, jitter, small scale, small rotation, jitter again.

    Args:
        scale: largest relative change of size (0.1 = 0.9x to 1.1x).
        angle: largest rotation in degrees.
        shift: largest shift in pixels of the first jitter.
    """
    scales = [1 + scale * (i - 5) / 5 for i in range(11)]
    angles = list(range(-int(angle), int(angle) + 1)) + [0] * 5
    return compose(
        [pad(shift + 4), jitter(shift), random_scale(scales), random_rotate(angles), jitter(max(2, shift // 2))]
    )
