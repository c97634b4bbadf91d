"""A photo folder with planted defects, and what was planted, for the quality checks' tests.

From the cats-vs-dogs sample: about 10 % of the labels flipped (a cat's photo
in ``dog/``), a few photos re-encoded at 3/4 of the size and JPEG quality 50
beside their originals (near-duplicates), and a few pictures that are neither
class (scikit-image's sample pictures: a rocket, coffee, coins, a page of text,
...) as outliers.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

#: scikit-image's bundled pictures that are neither a cat nor a dog.
OUTLIERS = ("rocket", "coffee", "coins", "page", "text", "brick", "colorwheel", "hubble_deep_field")


@dataclass
class Planted:
    """What was planted, as manifest paths (relative to the folder)."""

    root: Path
    flipped: set = field(default_factory=set)        # photos under the other class's folder
    duplicates: set = field(default_factory=set)     # frozensets {original, re-encoded copy}
    outliers: set = field(default_factory=set)


def planted_folder(catsdogs: Path, dst: Path, per_class: int = 60, flip: float = 0.1, n_duplicates: int = 8,
                   n_outliers: int = 6, seed: int = 0) -> Planted:
    """Copy ``per_class`` photos of each class of ``catsdogs`` to ``dst``, with defects planted.

    Copies, flips and re-encodings are chosen by ``seed``; the flipped photos keep their
    file names (``cat.12.jpg`` under ``dog/``), the copies are named ``<stem>_small.jpg``.
    """
    import skimage.data

    rng = np.random.default_rng(seed)
    planted = Planted(dst)
    classes = sorted(p.name for p in catsdogs.iterdir() if p.is_dir())
    for k, cls in enumerate(classes):
        files = sorted((catsdogs / cls).iterdir())[:per_class]
        flipped = set(rng.choice(len(files), int(round(per_class * flip)), replace=False).tolist())
        for i, f in enumerate(files):
            label = classes[(k + 1) % len(classes)] if i in flipped else cls
            (dst / label).mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / label / f.name)
            if i in flipped:
                planted.flipped.add(f"{label}/{f.name}")
    # Near-duplicates: 3/4 of the size, JPEG quality 50, beside the original (never a flipped one).
    originals = sorted(p for p in dst.rglob("*.jpg") if p.relative_to(dst).as_posix() not in planted.flipped)
    for j in rng.choice(len(originals), n_duplicates, replace=False).tolist():
        f = originals[j]
        copy = f.with_name(f"{f.stem}_small.jpg")
        with Image.open(f) as im:
            im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4), Image.LANCZOS).save(copy, quality=50)
        planted.duplicates.add(frozenset({f.relative_to(dst).as_posix(), copy.relative_to(dst).as_posix()}))
    for i, name in enumerate(OUTLIERS[:n_outliers]):
        a = getattr(skimage.data, name)()
        cls = classes[i % len(classes)]
        Image.fromarray(a).convert("RGB").save(dst / cls / f"{name}.jpg", quality=90)
        planted.outliers.add(f"{cls}/{name}.jpg")
    return planted
