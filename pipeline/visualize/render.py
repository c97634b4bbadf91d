"""The optimisation loop (:func:`render`), its optimisers, its constraints, and :func:`seeded`.

The one loop behind the ideal class image and the adversarial example: it
takes a parameterisation, transforms and an objective
(:mod:`pipeline.visualize.optvis` gathers them all).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from pipeline.visualize.objectives import Objective, Step
from pipeline.visualize.param import Param
from pipeline.visualize.transforms import Transform


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
