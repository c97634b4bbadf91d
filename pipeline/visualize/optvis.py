"""Optimising an input image, in parts that compose (after lucid/lucent's ``optvis``).

Four kinds of parts, each small and replaceable:

* a **parameterisation** returns ``(params, image_fn)``: the tensors the optimiser
  updates, and a function that turns them into an image batch in [0, 1]
  (:func:`pixel_image`, :func:`fourier_image`, :func:`raw_image`);
* a **transform** is a function image -> image, random each call, joined by
  :func:`compose` (:func:`pad`, :func:`jitter`, :func:`random_scale`,
  :func:`random_rotate`); the model sees the transformed image, so the result
  must work under small shifts, scalings and rotations, which is what keeps it
  from being high-frequency noise;
* an **objective** is a value you can add, subtract and scale
  (``class_logit(285) - 0.5 * total_variation()``); it maps a :class:`Step`
  (the image and the model's logits on its transformed version) to one number
  per image;
* a **constraint** runs after each optimiser step (:func:`linf_ball`).

The ideal class image and the adversarial example are then the same
:func:`render` loop with different parts (``model`` is any module on pixels
in [0, 1], e.g. :func:`pipeline.visualize.networks.imagenet_model`):

>>> with seeded(0):                                                 # doctest: +SKIP
...     image = render(model, class_logit(285) - 0.5 * total_variation(),
...                    fourier_image((1, 3, 224, 224)), transforms=standard_transforms(),
...                    optimizer=adam(0.05), steps=256)
>>> with seeded(0):                                                 # doctest: +SKIP
...     adv = render(model, class_log_prob(281), raw_image(x, random_start=8 / 255),
...                  optimizer=sign_gradient(2.5 * (8 / 255) / 10), steps=10,
...                  constraint=linf_ball(x, 8 / 255))

Everything works in pixel space [0, 1]; the model normalises inside. The
parameters, the image and the objective stay float32 whatever precision the
model's forward pass runs in (``render(..., autocast=...)``). Random draws
come from torch's CPU generator, so a run inside :func:`seeded` is
deterministic on the CPU (on CUDA, up to the order of floating-point atomics
in some backward kernels).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

Param = tuple  # (list of tensors to optimise, image_fn: () -> (N, 3, H, W) in [0, 1])
Transform = Callable[[torch.Tensor], torch.Tensor]


# -------------------------------------------------------------- parameterisations

#: Square root of ImageNet's colour correlation matrix (lucid's
#: ``color_correlation_svd_sqrt``): the Fourier image's three channels are
#: decorrelated colour components, mapped back to RGB by this matrix.
_COLOR_SVD_SQRT = np.asarray(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32
)
_COLOR_CORRELATION = _COLOR_SVD_SQRT / np.max(np.linalg.norm(_COLOR_SVD_SQRT, axis=0))


def _decorrelated_to_rgb(t: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(_COLOR_CORRELATION, device=t.device)
    return torch.einsum("nchw,dc->ndhw", t, m)


def pixel_image(shape: Sequence[int], sd: float = 0.01, device="cpu") -> Param:
    """One free parameter per pixel and channel, squashed into [0, 1] by a sigmoid.

    The naive baseline: nothing favours low frequencies or natural colours.
    """
    t = (torch.randn(*shape) * sd).to(device).requires_grad_(True)
    return [t], lambda: torch.sigmoid(t)


def _rfft2d_freqs(h: int, w: int) -> np.ndarray:
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def fourier_image(
    shape: Sequence[int], sd: float = 0.01, decay_power: float = 1.0, decorrelate: bool = True, device="cpu"
) -> Param:
    """The image's 2-D Fourier spectrum, in decorrelated colour, as the parameter (lucid's ``fft_image``).

    Each frequency's coefficient is scaled by ``1 / f**decay_power`` (natural
    images have roughly a 1/f amplitude spectrum), so a gradient step moves low
    frequencies as much as high ones instead of mostly adding pixel noise. The
    channels are decorrelated colour components (ImageNet's colour correlation),
    mapped to RGB, then a sigmoid keeps every pixel in [0, 1].
    """
    n, c, h, w = shape
    freqs = _rfft2d_freqs(h, w)
    spectrum = (torch.randn(n, c, *freqs.shape, 2) * sd).to(device).requires_grad_(True)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(h, w)) ** decay_power
    scale = torch.as_tensor(scale, dtype=torch.float32, device=device)[None, None, :, :, None]

    def image_fn():
        coeffs = torch.view_as_complex(scale * spectrum)
        t = torch.fft.irfftn(coeffs, s=(h, w), norm="ortho") / 4.0  # lucid's constant: a unit-ish range
        if decorrelate:
            t = _decorrelated_to_rgb(t)
        return torch.sigmoid(t)

    return [spectrum], image_fn


def raw_image(x: torch.Tensor, random_start: float = 0.0) -> Param:
    """The pixels themselves, starting at ``x`` (plus uniform noise in ±``random_start``), clipped to [0, 1].

    For attacks: keep them in an L∞ ball around ``x`` with :func:`linf_ball`.
    """
    t = x.detach().clone()
    if random_start > 0:
        noise = (torch.rand(t.shape) * 2 - 1) * random_start
        t = (t + noise.to(t.device)).clamp(0, 1)
    t.requires_grad_(True)
    return [t], lambda: t


PARAMETERISATIONS = {"pixel": pixel_image, "fourier": fourier_image}


# ---------------------------------------------------------------------- transforms


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


# ----------------------------------------------------------------------- objectives


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


# ---------------------------------------------------------- optimisers, constraints


def adam(lr: float) -> Callable:
    """An optimiser factory for :func:`render`: params -> ``torch.optim.Adam``."""
    return lambda params: torch.optim.Adam(params, lr=lr)


class SignGradient(torch.optim.Optimizer):
    """``p <- p - lr · sign(grad)``: the steepest-descent step under an L∞ norm (PGD's step)."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * p.grad.sign())


def sign_gradient(lr: float) -> Callable:
    """An optimiser factory for :func:`render`: params -> :class:`SignGradient`."""
    return lambda params: SignGradient(params, lr)


def linf_ball(center: torch.Tensor, eps: float, low: float = 0.0, high: float = 1.0) -> Callable:
    """A constraint: project the (single) parameter into ``|x - center|∞ <= eps`` and ``[low, high]``."""
    lo = (center - eps).clamp(low, high)
    hi = (center + eps).clamp(low, high)

    def project(params):
        for p in params:
            p.copy_(torch.minimum(torch.maximum(p, lo.to(p.device)), hi.to(p.device)))

    return project


# ---------------------------------------------------------------------------- loop


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's CPU generator seeded, restoring the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def render(
    model: nn.Module,
    objective: Objective,
    param: Param,
    *,
    optimizer: Callable,
    steps: int,
    transforms: Transform | None = None,
    constraint: Callable | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool | str = False,
) -> torch.Tensor:
    """Maximise ``objective`` over the parameterised image; return the final image batch.

    Args:
        model: pixels in [0, 1] -> logits; its parameters are left untouched.
        param: ``(params, image_fn)`` from a parameterisation.
        optimizer: ``params -> torch.optim.Optimizer`` (:func:`adam`, :func:`sign_gradient`).
        transforms: applied to the image before the model at each step (random).
        constraint: ``params -> None`` in-place projection after each step.
        autocast: a context for the forward pass (``Precision.autocast``); the
            backward pass runs outside it, as torch's autocast asks.
        progress: a tqdm bar; a string is its description.

    Returns:
        the image batch (N, 3, H, W) in [0, 1], detached.
    """
    params, image_fn = param
    opt = optimizer(params)
    desc = progress if isinstance(progress, str) else "optimise"
    for _ in tqdm(range(int(steps)), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        opt.zero_grad(set_to_none=True)
        image = image_fn()
        seen = transforms(image) if transforms else image  # resampling stays in float32
        with autocast():
            logits = model(seen).float()
        loss = -objective(Step(image, logits)).sum()  # images are independent: one sum, N gradients
        loss.backward()
        opt.step()
        if constraint is not None:
            with torch.no_grad():
                constraint(params)
    with torch.no_grad():
        return image_fn().detach()
