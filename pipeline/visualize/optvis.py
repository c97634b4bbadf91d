"""Optimising an input image, in parts that compose (after lucid/lucent's ``optvis``).

This module owns no code: it gathers the four kinds of parts, each small,
replaceable and in its own module, under one name:

* a **parameterisation** (:mod:`~pipeline.visualize.param`) returns
  ``(params, image_fn)``: the tensors the optimiser updates, and a function
  that turns them into an image batch in [0, 1] (:func:`pixel_image`,
  :func:`fourier_image`, :func:`raw_image`);
* a **transform** (:mod:`~pipeline.visualize.transforms`) is a function
  image -> image, random each call, joined by :func:`compose` (:func:`pad`,
  :func:`jitter`, :func:`random_scale`, :func:`random_rotate`); the model sees
  the transformed image, so the result must work under small shifts, scalings
  and rotations, which is what keeps it from being high-frequency noise;
* an **objective** (:mod:`~pipeline.visualize.objectives`) is a value you can
  add, subtract and scale (``class_logit(285) - 0.5 * total_variation()``); it
  maps a :class:`Step` (the image and the model's logits on its transformed
  version) to one number per image;
* a **constraint** (:mod:`~pipeline.visualize.render`, with the optimisers
  and the loop) runs after each optimiser step (:func:`linf_ball`).

:mod:`~pipeline.visualize.ideal` and :mod:`~pipeline.visualize.attack` use
the parts through this one name.

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

from pipeline.visualize.objectives import (
    Objective,
    Step,
    class_log_prob,
    class_logit,
    l2,
    total_variation,
    total_variation_of,
)
from pipeline.visualize.param import PARAMETERISATIONS, Param, fourier_image, pixel_image, raw_image
from pipeline.visualize.render import SignGradient, adam, linf_ball, render, seeded, sign_gradient
from pipeline.visualize.transforms import (
    Transform,
    compose,
    jitter,
    pad,
    random_rotate,
    random_scale,
    standard_transforms,
)

__all__ = [
    "PARAMETERISATIONS", "Objective", "Param", "SignGradient", "Step", "Transform", "adam", "class_log_prob",
    "class_logit", "compose", "fourier_image", "jitter", "l2", "linf_ball", "pad", "pixel_image", "random_rotate",
    "random_scale", "raw_image", "render", "seeded", "sign_gradient", "standard_transforms", "total_variation",
    "total_variation_of",
]
