"""Objectives: what an optimised image maximises, as values that add and scale.

An :class:`Objective` maps a :class:`Step` (the image and the model's logits on
its transformed version) to one number per image. One of the parts
:mod:`pipeline.visualize.optvis` composes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Step:
    """What an objective sees at each step.

    Attributes:
        image: the parameterised image batch in [0, 1], before transforms.
        logits: the model's output on the transformed image, (N, K).
    """

    image: torch.Tensor
    logits: torch.Tensor


class Objective:
    """A function of a :class:`Step` giving one value per image (N,), to be maximised.

    Objectives add, subtract, negate and scale by numbers, so a regularised
    goal reads as it is written: ``class_logit(3) - 0.1 * total_variation()``.
    """

    def __init__(self, fn: Callable[[Step], torch.Tensor], name: str):
        self.fn = fn
        self.name = name

    def __call__(self, step: Step) -> torch.Tensor:
        return self.fn(step)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    def __add__(self, other):
        if isinstance(other, (int, float)):
            return Objective(lambda s: self(s) + other, f"{self.name} + {other:g}")
        return Objective(lambda s: self(s) + other(s), f"{self.name} + {other.name}")

    def __radd__(self, other):  # sum() starts from 0
        return self.__add__(other)

    def __neg__(self):
        return Objective(lambda s: -self(s), f"-({self.name})")

    def __sub__(self, other):
        return self + (-other)

    def __mul__(self, k):
        if not isinstance(k, (int, float)):
            return NotImplemented
        return Objective(lambda s: k * self(s), f"{k:g}·({self.name})")

    __rmul__ = __mul__


def _targets(target, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(target, dtype=torch.long, device=device)
    return t.expand(n) if t.ndim == 0 else t


def class_logit(target) -> Objective:
    """The logit of class ``target`` (an index, or one index per image)."""

    def fn(s: Step):
        t = _targets(target, s.logits.shape[0], s.logits.device)
        return s.logits.gather(1, t[:, None])[:, 0]

    return Objective(fn, f"logit[{target}]")


def class_log_prob(target) -> Objective:
    """The log-softmax probability of class ``target``; maximising it is minimising cross-entropy."""

    def fn(s: Step):
        t = _targets(target, s.logits.shape[0], s.logits.device)
        return F.log_softmax(s.logits, dim=1).gather(1, t[:, None])[:, 0]

    return Objective(fn, f"log_prob[{target}]")


def total_variation_of(image: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, per image (N,); 0 for a flat image.

    Averaged rather than summed, so it does not grow with the image size:
    natural photos score about 0.02-0.1, pixel noise about 0.3 and more.
    """
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs().flatten(1).mean(1)
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs().flatten(1).mean(1)
    return dx + dy


def total_variation() -> Objective:
    """:func:`total_variation_of` the image; subtract a multiple of it to favour smooth images."""
    return Objective(lambda s: total_variation_of(s.image), "tv")


def l2(center: float = 0.5) -> Objective:
    """Mean squared distance of the pixels from ``center``, per image.

    Centred on mid-grey rather than 0: in [0, 1] pixel space ``||x||²`` would
    pull every image towards black, where ``||x - 0.5||²`` only penalises
    saturated colours.
    """
    return Objective(lambda s: (s.image - center).pow(2).flatten(1).mean(1), f"l2(x-{center:g})")
