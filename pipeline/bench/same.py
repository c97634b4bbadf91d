"""Did a change of structure change any result? This checkout against a git revision, on the same photos.

For each tree (this checkout, and ``--against REV`` checked out in a scratch
git worktree) a separate process prepares the folder (test fraction 0.2,
seed 0), extracts fp32 features with ``pillow-exact`` decoding on the CPU, and
fits both heads by 5-fold cross-validation; it prints the sha256 of the
feature matrix and of the row paths, and each head's chosen C and CV
accuracy. The two must be identical, byte for byte.

The part each tree runs (:func:`fingerprint`) calls only library functions
whose signatures this project has kept, so it runs in an older tree too.

Example:
    python -m pipeline.bench same --folder ../shared/data/catsdogs --against HEAD~5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HEADS = (("logreg", [0.01, 0.1, 1.0], 2000), ("svm", [1e-5, 1e-4, 1e-3, 1e-2], 10000))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--folder", required=True, help="a <class>/<image> folder")
    ap.add_argument("--against", default="HEAD", help="the git revision to compare with (default HEAD)")
    ap.add_argument("--backbone", default="efficientnet_lite0")


def fingerprint(folder: Path, backbone: str) -> dict:
    """fp32 features and both heads' cross-validation, in the tree this process imports ``pipeline`` from."""
    import hashlib
    import inspect

    import h5py
    import numpy as np

    from pipeline.backbones import load_backbone
    from pipeline.data.manifest import read_prepared
    from pipeline.data.sources import prepare
    from pipeline.extract.local import extract_features
    from pipeline.heads.train import train_head

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(source="folder", out_dir=tmp / "prepared", folder=str(folder), download_dir=str(tmp / "raw"),
                test_fraction=0.2, seed=0)
        p = read_prepared(tmp / "prepared")
        extract_features(load_backbone(backbone), root=p.root, rows=p.rows, classes=p.classes,
                         out_path=tmp / "f.h5", device="cpu", precision="fp32", decoder="pillow-exact",
                         store_dir=None)
        with h5py.File(tmp / "f.h5") as h5:
            out["features_sha256"] = hashlib.sha256(np.ascontiguousarray(h5["features"][:]).tobytes()).hexdigest()
            out["paths_sha256"] = hashlib.sha256("\n".join(h5["paths"].asstr()[:]).encode()).hexdigest()
        # Run against older trees too, where the head's folder argument was models_dir.
        where = "heads_dir" if "heads_dir" in inspect.signature(train_head).parameters else "models_dir"
        for name, C, max_iter in HEADS:
            out[name] = train_head(name=name, features_file=tmp / "f.h5", **{where: tmp / "models"}, C=C,
                                   max_iter=max_iter, cv_folds=5, seed=0)
    return out


def _fingerprint_in(tree: Path, folder: Path, backbone: str) -> dict:
    """:func:`fingerprint` in a fresh process that imports ``pipeline`` from ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    # This file's fingerprint(), run by path: the process imports pipeline from ``tree`` alone.
    code = ("import json, pathlib, runpy, sys; f = runpy.run_path(sys.argv[1])['fingerprint']; "
            "print('FINGERPRINT ' + json.dumps(f(pathlib.Path(sys.argv[2]), sys.argv[3])))")
    res = subprocess.run([sys.executable, "-c", code, __file__, str(folder), backbone],
                         cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
    line = next((s for s in res.stdout.splitlines() if s.startswith("FINGERPRINT ")), None)
    if res.returncode or line is None:
        raise SystemExit(f"the run in {tree} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(line.removeprefix("FINGERPRINT "))


def run(args: argparse.Namespace) -> dict:
    from pipeline.bench.common import ROOT

    folder = Path(args.folder).resolve()
    with tempfile.TemporaryDirectory(prefix="bench_same_") as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(other), args.against], cwd=ROOT,
                       check=True)
        try:
            before = _fingerprint_in(other, folder, args.backbone)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=False)
    now = _fingerprint_in(ROOT, folder, args.backbone)
    same = before == now
    for key in sorted(now):
        print(f"{key}: {'same' if before.get(key) == now[key] else 'DIFFERENT'}: {now[key]}"
              + ("" if before.get(key) == now[key] else f" (was {before.get(key)})"))
    print(f"bench same: {folder.name}, {args.backbone}, this checkout against {args.against}: "
          f"{'identical' if same else 'DIFFERENT'}")
    if not same:
        raise SystemExit(1)
    return {"identical": same, "now": now, "before": before}
