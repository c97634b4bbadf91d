"""Reduced-scale JPEG decoding (the ``pillow`` decoder's draft mode): what it changes.

``python -m pipeline.bench draft --folder DIR --backbone NAME [--upscale 3]``
extracts the same photos with ``pillow-exact`` and with ``pillow``, and prints
how many feature rows changed, their least cosine similarity, and a
logistic-regression head's test accuracy on each.

Example:
    python -m pipeline.bench draft --folder ../shared/data/catsdogs --backbone efficientnet_lite0 --upscale 3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pipeline.backbones import load_backbone
from pipeline.bench.common import add_photo_arguments, folder_rows, rewrite_folder
from pipeline.extract.cache import open_cache
from pipeline.extract.local import extract_features
from pipeline.heads.batch import make_head


def bench_draft(folder, backbone, weights="DEFAULT", upscale=1, test_fraction=0.3, seed=0) -> dict:
    """Effect of reduced-scale JPEG decoding on features and on a logreg head's accuracy.

    With ``upscale`` > 1 every photo is first enlarged (Lanczos, re-saved as
    JPEG quality 95 in a temporary folder) so that draft mode applies to all of
    them, as it does to camera photos.
    """
    import numpy as np
    from PIL import Image
    from sklearn.model_selection import train_test_split

    def enlarge(f: Path, out: Path) -> None:
        im = Image.open(f).convert("RGB")
        im.resize((im.width * upscale, im.height * upscale), Image.LANCZOS).save(out / f.name, "JPEG", quality=95)

    bb = load_backbone(backbone, weights)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(folder)
        if upscale != 1:
            rewrite_folder(src, Path(tmp) / "big", enlarge)
            src = Path(tmp) / "big"
        classes, rows = folder_rows(src, None)
        labels = [r.label for r in rows]
        train, test = train_test_split(range(len(rows)), test_size=test_fraction, stratify=labels, random_state=seed)
        split = {i: "train" for i in train} | {i: "test" for i in test}
        rows = [r._replace(split=split[i]) for i, r in enumerate(rows)]
        out = {}
        feats = {}
        for decoder in ("pillow-exact", "pillow"):
            path = Path(tmp) / f"{decoder}.h5"
            res = extract_features(bb, root=src, rows=rows, classes=classes, out_path=path, decoder=decoder,
                                   compile=False)
            fs = open_cache(path)
            feats[decoder] = fs.features
            Xtr, ytr = fs.subset("train")
            Xte, yte = fs.subset("test")
            acc = make_head("logreg", C=[0.01, 0.1, 1.0], cv_folds=3, y=ytr).fit(Xtr, ytr).score(Xte, yte)
            out[decoder] = {"images_per_second": res.images_per_second, "logreg_accuracy": acc}
        a, b = feats["pillow-exact"], feats["pillow"]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        changed = int((np.abs(a - b).max(1) > 1e-4).sum())
    print(
        f"bench draft: {backbone} on {len(rows)} images of {folder} (upscale x{upscale}): "
        f"{changed} feature rows changed, min cosine similarity {cos.min():.4f}",
        flush=True,
    )
    for decoder, m in out.items():
        print(f"  {decoder:13s} {m['images_per_second']:6.1f} images/s, logreg test accuracy {m['logreg_accuracy']:.4f}")
    out["changed_rows"] = changed
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_photo_arguments(p)
    p.add_argument("--upscale", type=int, default=1, help="enlarge every photo first, so draft mode applies")


def run(a: argparse.Namespace) -> dict:
    return bench_draft(a.folder, a.backbone, a.weights, a.upscale)
