"""Adversarial examples: how little a test photo must change to fool the model.

Targeted PGD, from correctly classified test photos of ``attack.source``
towards ``attack.target``, in pixel space under an L∞ budget ε, for each ε of
``attack.eps``: the :func:`pipeline.visualize.optvis.render` loop with a
log-probability objective, sign-gradient steps and an L∞-ball constraint. With
``attack.transfer_to``/``transfer_head``, the same adversarial images are shown
to a second, independently trained network: do they fool it too?

Example:
    >>> adv = pgd_attack(model, x, target=0, eps=8 / 255, steps=10)    # doctest: +SKIP
    >>> attack_rates(model, adv, target=0)["success_rate"]              # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import AttackConfig
from pipeline.data.manifest import Row
from pipeline.fileio import write_csv, write_json
from pipeline.visualize import optvis
from pipeline.runtime import Placement
from pipeline.visualize.networks import CPU, class_probabilities
from pipeline.visualize.pictures import fresh_dir, load_pixels, save_png


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    target: int,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    compute: Placement = CPU,
) -> torch.Tensor:
    """Targeted PGD under an L∞ budget, in pixel space [0, 1].

    Maximises the log-probability of ``target`` (minimises its cross-entropy)
    with signed-gradient steps of ``step_size`` (default ``2.5·eps/steps``),
    projecting after each step onto ``|x' - x|∞ <= eps`` and ``[0, 1]``.

    Returns:
        the adversarial batch, same shape and device as ``x``.
    """
    step_size = 2.5 * eps / steps if step_size is None else step_size
    with optvis.seeded(seed):
        return optvis.render(
            model,
            optvis.class_log_prob(target),
            optvis.raw_image(x, random_start=eps if random_start else 0.0),
            optimizer=optvis.sign_gradient(step_size),
            steps=steps,
            constraint=optvis.linf_ball(x, eps),
            autocast=compute.autocast,
        )


def attack_rates(model: nn.Module, x_adv: torch.Tensor, target: int, compute: Placement = CPU) -> dict:
    """Share of ``x_adv`` classified as ``target``, and the mean target probability."""
    prob = class_probabilities(model, x_adv, compute)
    return {
        "success_rate": round(float((prob.argmax(1) == target).float().mean()), 6),
        "mean_target_prob": round(float(prob[:, target].mean()), 6),
        "n_images": len(x_adv),
    }


def correctly_classified(model: nn.Module, root, rows: list[Row], pixels: Callable, label: int,
                         limit: int, compute: Placement = CPU) -> tuple[list[Row], torch.Tensor | None]:
    """The first ``limit`` of ``rows`` (in order) that ``model`` classifies as ``label``, with their pixels.

    Rows are decoded ``limit`` at a time, so a large test split is read only as
    far as needed.
    """
    kept, images = [], []
    for start in range(0, len(rows), limit):
        batch, x = load_pixels(root, rows[start : start + limit], pixels)
        if x is None:
            continue
        correct = class_probabilities(model, x, compute).argmax(1) == label
        kept += [r for r, ok in zip(batch, correct) if ok]
        images += [xi for xi, ok in zip(x, correct) if ok]
        if len(kept) >= limit:
            break
    return kept[:limit], (torch.stack(images[:limit]) if images else None)


def run_attack(model: nn.Module, x0: torch.Tensor, *, classes: list[str], source: int, target: int,
               a: AttackConfig, seed: int, head: str, transfer: nn.Module | None, compute: Placement,
               out_dir: Path, progress: bool = True) -> dict:
    """PGD at every ε of ``a.eps``; writes ``attack.json``, ``attack.csv`` and ``attack/`` PNGs.

    Args:
        x0: the correctly classified originals (N, 3, H, W) in [0, 1].
        transfer: a second network on pixels (it resizes to its own input size), or None.
        head: the attacked head's name (recorded in attack.json).

    Returns:
        what attack.json holds: per ε, success_rate, mean_target_prob, n_images
        (and transfer_success_rate, transfer_fooled with a transfer network).
    """
    x0 = x0.to(compute.device)
    per_eps, rows, adv = {}, [], None
    for eps in tqdm(a.eps, desc=f"PGD {classes[source]} -> {classes[target]}", disable=not progress):
        adv = pgd_attack(model, x0, target, eps=eps, steps=a.steps, random_start=a.random_start, seed=seed,
                         compute=compute)
        r = dict(eps=round(eps, 6), **attack_rates(model, adv, target, compute))
        if transfer is not None:
            t = attack_rates(transfer, adv, target, compute)
            r["transfer_success_rate"] = t["success_rate"]
            r["transfer_fooled"] = round(t["success_rate"] * t["n_images"])
        per_eps[f"{eps * 255:.3g}/255"] = r
        rows.append([r["eps"], r["success_rate"], r["mean_target_prob"]])
    attack = {
        "source": classes[source],
        "target": classes[target],
        "model": head,
        "steps": a.steps,
        "n_images": len(x0),
        "transfer_to": a.transfer_to or None,
        "eps": per_eps,
    }
    with fresh_dir(out_dir / "attack") as folder:
        eps = a.eps[-1]
        for k in range(min(a.save, len(x0))):
            o, d = x0[k].cpu(), adv[k].cpu()
            save_png(o, folder / f"{k}_original.png")
            save_png(d, folder / f"{k}_adversarial.png")
            save_png((d - o) / (2 * eps) + 0.5, folder / f"{k}_difference.png")  # ±ε -> black..white
    write_json(out_dir / "attack.json", attack)
    write_csv(out_dir / "attack.csv", ["eps", "success_rate", "mean_target_prob"], rows)
    for key, r in per_eps.items():
        print(f"visualize: PGD eps={key}: {r['success_rate']:.0%} of {r['n_images']} {classes[source]} images "
              f"now '{classes[target]}' (mean p={r['mean_target_prob']:.3f})")
    return attack

