"""Heads on one backbone or several, compared by outer cross-validation.

``python -m pipeline.bench heads --folder PHOTOS --backbones efficientnet_lite0 efficientnet_lite2``
extracts each backbone once (the per-image store makes re-runs free), then
scores logistic regression (C chosen by inner CV, as the train_heads stage does)
with stratified 5-fold outer cross-validation on every backbone alone and on
all of them concatenated: small photo sets move a single test split by several
points per photo, so every image is scored once, out of fold.

Example:
    python -m pipeline.bench heads --folder ../shared/data/catsdogs --backbones efficientnet_lite0 --folds 3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from sklearn.model_selection import StratifiedKFold, cross_val_score

from pipeline.backbones import load_backbone
from pipeline.data.manifest import read_prepared
from pipeline.data.sources import prepare
from pipeline.extract.cache import open_cache
from pipeline.extract.local import extract_features
from pipeline.heads.batch import make_head


def compare(folder, backbones: list[str], folds: int = 5, seed: int = 0, store=None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-heads-") as tmp:
        tmp = Path(tmp)
        prepare(source="folder", folder=folder, out_dir=tmp / "prepared")
        p = read_prepared(tmp / "prepared")
        paths = []
        for name in backbones:
            out = tmp / f"{name.replace('/', '--')}.h5"
            extract_features(load_backbone(name), root=p.root, rows=p.rows, classes=p.classes, out_path=out,
                             store_dir=store or tmp / "store", precision="fp32", compile=False)
            paths.append(out)
        sets = {name: open_cache(path) for name, path in zip(backbones, paths)}
        if len(backbones) > 1:
            sets[" + ".join(backbones)] = open_cache(paths)
        results = {}
        for name, fs in sets.items():
            y = fs.labels
            head = make_head("logreg", C=[0.01, 0.1, 1.0], cv_folds=folds, seed=seed, y=y)
            outer = StratifiedKFold(folds, shuffle=True, random_state=seed + 1)
            acc = cross_val_score(head, fs.features, y, cv=outer, scoring="accuracy")
            results[name] = (float(acc.mean()), float(acc.std()), fs.features.shape[1])
            print(f"{name:45s} {fs.features.shape[1]:5d}-d  logreg outer {folds}-fold accuracy "
                  f"{acc.mean():.3f} ± {acc.std():.3f} ({len(y)} images)", flush=True)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--folder", required=True, help="a <class>/<image> folder")
    parser.add_argument("--backbones", nargs="+", required=True)
    parser.add_argument("--folds", type=int, default=5)


def run(a: argparse.Namespace) -> dict:
    return compare(a.folder, a.backbones, a.folds)
