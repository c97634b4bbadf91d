"""Ideal class images: what input a network would most like to see for a class.

An image is optimised to maximise a class's logit, under random jitter,
scaling and rotation, with a total-variation and an L2 penalty
(``visualize.param`` picks pixel or Fourier parameterisation), all built from
:mod:`pipeline.visualize.optvis`. ImageNet classes are drawn with the
backbone's own classifier, and an independent judge network
(``visualize.judge``) says whether it sees that class too: a picture that only
the network that made it recognises is a fooling image, not a portrait.

The images are rounded to 8 bits before they are scored, so every number in
``ideal.json`` describes the PNG that was written.

Example:
    >>> model = imagenet_model(load_backbone("efficientnet_lite0"))     # doctest: +SKIP
    >>> x = ideal_images(model, [285], size=224, steps=256)               # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config import VisualizeConfig
from pipeline.fileio import write_json
from pipeline.runtime import Placement
from pipeline.visualize import optvis
from pipeline.visualize.networks import (
    CPU,
    class_probabilities,
    imagenet_categories,
)
from pipeline.visualize.pictures import (
    captioned_grid,
    fresh_dir,
    quantize,
    save_png,
    slug,
    to_pil,
)

#: Ideal images are optimised this many at a time (one batch).
CHUNK = 8

#: The ``visualize`` settings that shape the optimisation (keywords of :func:`ideal_images`).
OPTIMISATION = ("param", "steps", "lr", "tv_weight", "l2_weight", "seed")


def ideal_images(
    model: nn.Module,
    targets: list[int],
    *,
    size: int,
    param: str = "fourier",
    steps: int = 256,
    lr: float = 0.05,
    tv_weight: float = 0.0,
    l2_weight: float = 0.0,
    seed: int = 0,
    transforms=None,
    compute: Placement = CPU,
    progress: bool = True,
) -> torch.Tensor:
    """One image per target class that maximises ``logit[target] - tv_weight·TV - l2_weight·L2``.

    Args:
        model: pixels in [0, 1] -> logits (:mod:`pipeline.visualize.networks`).
        targets: class indices of ``model``'s output.
        size: the images' side in pixels (the backbone's crop).
        param: ``fourier`` or ``pixel`` (:data:`pipeline.visualize.optvis.PARAMETERISATIONS`).
        transforms: the robustness transforms; default :func:`pipeline.visualize.optvis.standard_transforms`.
        compute: device and precision of the forward passes.

    Returns:
        (len(targets), 3, size, size) in [0, 1], on the CPU. Deterministic given
        ``seed`` (and the list of targets: they are optimised in batches of :data:`CHUNK`).
    """
    make = optvis.PARAMETERISATIONS[param]
    transforms = transforms or optvis.standard_transforms()
    out = []
    for start in range(0, len(targets), CHUNK):
        chunk = list(targets[start : start + CHUNK])
        objective = optvis.class_logit(torch.tensor(chunk)) - tv_weight * optvis.total_variation()
        objective = objective - l2_weight * optvis.l2()
        with optvis.seeded(seed + start):
            image = optvis.render(
                model,
                objective,
                make((len(chunk), 3, size, size), device=compute.device),
                transforms=transforms,
                optimizer=optvis.adam(lr),
                steps=steps,
                autocast=compute.autocast,
                progress=f"ideal images {start + 1}-{start + len(chunk)} of {len(targets)}" if progress else False,
            )
        out.append(image.cpu())
    return torch.cat(out)


def judge_scores(judge: nn.Module, images: torch.Tensor, targets: list[int], compute: Placement = CPU) -> list[dict]:
    """An independent ImageNet network's view of each image: target probability, rank (1 = top), top class.

    Args:
        judge: :func:`~pipeline.visualize.networks.imagenet_model` of another
            backbone; the images are resized to its own crop size.
    """
    prob = class_probabilities(judge, images, compute)
    names = imagenet_categories()
    return [
        {
            "judge_prob": round(float(p[t]), 6),
            "judge_rank": int((p > p[t]).sum()) + 1,
            "judge_top1": names[int(p.argmax())],
        }
        for p, t in zip(prob, targets)
    ]


@dataclass(frozen=True)
class Group:
    """Classes of one network to draw.

    Attributes:
        model: pixels in [0, 1] -> logits.
        ids: the class indices to draw.
        names: the names of all of ``model``'s classes.
        imagenet: the classes are ImageNet's, so the judge can score them.
    """

    model: nn.Module
    ids: tuple[int, ...]
    names: tuple[str, ...]
    imagenet: bool

    def key(self, index: int) -> str:
        """The class's key in ideal.json and its file stem: a head class by name, ImageNet as in<id>_<name>."""
        name = slug(self.names[index])
        return f"in{index}_{name}" if self.imagenet else name


def draw_ideal(groups: list[Group], v: VisualizeConfig, *, size: int, judge: nn.Module | None,
               compute: Placement, out_dir: Path, progress: bool = True) -> dict:
    """Draw, score and write every group's ideal images; returns what ideal.json holds.

    Writes ``ideal/<key>.png``, ``ideal_grid.png`` and ``ideal.json`` (per class:
    target_prob, total_variation, judge_prob, judge_rank, judge_top1).
    """
    ideal, images = {}, []
    for g in (g for g in groups if g.ids):
        x = quantize(ideal_images(g.model, list(g.ids), size=size, compute=compute, progress=progress,
                                  **{k: getattr(v, k) for k in OPTIMISATION}))
        prob = class_probabilities(g.model, x, compute)
        tv = optvis.total_variation_of(x)
        judged = judge_scores(judge, x, list(g.ids), compute) if g.imagenet and judge else None
        for i, c in enumerate(g.ids):
            # Kept to numbers where possible: `dvc metrics show` makes a column of every key.
            row = {"class": g.names[c], "target_prob": round(float(prob[i, c]), 6),
                   "total_variation": round(float(tv[i]), 6), "judge_prob": None, "judge_rank": None}
            if judged:
                row.update(judged[i])
            elif g.imagenet:
                row["judge_note"] = "visualize.judge is empty"
            else:
                row["judge_note"] = f"{v.judge or 'a judge'}'s ImageNet classifier has no class of this head"
            ideal[g.key(c)] = row
        images.append(x)
    with fresh_dir(out_dir / "ideal") as folder:
        for key, x in zip(ideal, (x for batch in images for x in batch)):
            save_png(x, folder / f"{key}.png")
    if images:
        captions = [f"{r['class']} p={r['target_prob']:.2f}" + (f" judge#{r['judge_rank']}" if r["judge_rank"] else "")
                    for r in ideal.values()]
        pictures = [to_pil(x) for batch in images for x in batch]
        save_png(captioned_grid(pictures, captions), out_dir / "ideal_grid.png")
    write_json(out_dir / "ideal.json", ideal)
    for name, row in ideal.items():
        judge_says = f", judge rank {row['judge_rank']} (p={row['judge_prob']:.3f})" if row["judge_rank"] else ""
        print(f"visualize: ideal {name}: p={row['target_prob']:.3f}, TV {row['total_variation']:.3f}{judge_says}")
    return ideal
