"""Independent recomputation of the visualize stage's numbers, shared by its unit and end-to-end tests.

Nothing here calls the stage's own scoring: scikit-learn scores heads on plain
backbone features, ImageNet networks run their plain forward pass, on the
PNGs the stage wrote.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.backbones import load_backbone
from pipeline.data.transform import TransformSpec
from pipeline.finetune.checkpoint import load_finetuned
from pipeline.visualize.networks import imagenet_categories

#: The judge of the ImageNet-class images (visualize.judge's default).
JUDGE = "efficientnet_lite2"


def png_pixels(path: Path) -> torch.Tensor:
    """A saved PNG as (3, H, W) in [0, 1]."""
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def features_of(bb, x: torch.Tensor) -> torch.Tensor:
    """``bb``'s features of pixels (N, 3, H, W) in [0, 1], resized to its crop as the stage documents."""
    s = bb.transform_spec
    if x.shape[-1] != s.crop:
        x = F.interpolate(x, size=(s.crop, s.crop), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        return bb.features((x - torch.tensor(s.mean).view(1, 3, 1, 1)) / torch.tensor(s.std).view(1, 3, 1, 1))


def imagenet_prob(bb, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bb.classifier(features_of(bb, x)).softmax(1)


def head_prob(estimator, bb):
    """A saved head's probabilities of pixels: scikit-learn on ``bb``'s plain features.

    Args:
        estimator: the head's fitted pipeline (:func:`pipeline.heads.model.load_head`'s first item).
    """
    return lambda x: estimator.predict_proba(features_of(bb, x).numpy())


def finetuned_prob(path: Path):
    """The fine-tuned network's probabilities of pixels: its plain forward pass, resized and normalised."""
    net, config = load_finetuned(path)
    s = TransformSpec.from_dict(config["preprocessing"])
    bb = SimpleNamespace(transform_spec=s, features=lambda x: net(x))  # features_of's resize + normalisation
    return lambda x: features_of(bb, x).softmax(1).numpy()


def check_ideal(ideal: dict, folder: Path, lite0, classes: list[str], prob) -> None:
    """Every number of ideal.json, recomputed from the PNGs with plain forward passes.

    Args:
        lite0: the backbone whose ImageNet classifier drew the ImageNet classes.
        classes, prob: the drawn model's classes, and its probabilities of
            pixels in [0, 1] (:func:`head_prob`, :func:`finetuned_prob`).
    """
    judge = load_backbone(JUDGE)
    for key, row in ideal.items():
        x = png_pixels(folder / f"{key}.png")[None]
        a = x[0].numpy()
        tv = np.abs(np.diff(a, axis=1)).mean() + np.abs(np.diff(a, axis=2)).mean()
        assert row["total_variation"] == pytest.approx(tv, abs=2e-6), key
        if key.startswith("in"):
            c = int(key[2:].split("_")[0])
            assert row["target_prob"] == pytest.approx(float(imagenet_prob(lite0, x)[0, c]), abs=1e-4), key
            p = imagenet_prob(judge, x)[0]
            assert row["judge_prob"] == pytest.approx(float(p[c]), abs=1e-4), key
            assert row["judge_rank"] == int((p > p[c]).sum()) + 1, key
            assert row["judge_top1"] == imagenet_categories()[int(p.argmax())], key
        else:
            want = prob(x)[0, classes.index(row["class"])]
            assert row["target_prob"] == pytest.approx(want, abs=1e-4), key
            assert row["judge_prob"] is None and row["judge_note"]
