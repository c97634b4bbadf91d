"""Parameterisations: what the optimiser changes, and how that becomes an image.

Each returns ``(params, image_fn)``: the tensors to optimise, and a function
that turns them into an image batch (N, 3, H, W) in [0, 1]. One of the parts
:mod:`pipeline.visualize.optvis` composes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

Param = tuple  # (list of tensors to optimise, image_fn: () -> (N, 3, H, W) in [0, 1])

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

    For attacks: keep them in an L∞ ball around ``x`` with :func:`~pipeline.visualize.render.linf_ball`.
    """
    t = x.detach().clone()
    if random_start > 0:
        noise = (torch.rand(t.shape) * 2 - 1) * random_start
        t = (t + noise.to(t.device)).clamp(0, 1)
    t.requires_grad_(True)
    return [t], lambda: t


PARAMETERISATIONS = {"pixel": pixel_image, "fourier": fourier_image}
