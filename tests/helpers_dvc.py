"""Helpers of the tests that run the real `dvc repro` on small slices of the sample photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def sample_slice(src: Path, dst: Path, per_class: int, skip: int = 0) -> Path:
    """Copy the first ``per_class`` photos (by name, after ``skip``) of each class of ``src`` to ``dst``.

    The copy lives in the test's temporary folder, so a test may add or remove photos.
    """
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[skip : skip + per_class]:
            shutil.copy2(f, dst / cls.name / f.name)
    return dst


def heads_reports(root: Path, heads=("logreg", "svm")) -> dict:
    """The heads' reports and their model folders' recorded provenance, without what names the run (its git commit).

    What a fresh run of the same configuration must reproduce exactly. A model
    folder's record is its ``config.json``'s ``made_from`` (the features it was
    fitted on), keyed ``models/<head>:made_from``.
    """
    out = {}
    for name in heads:
        for f in (f"reports/cv_{name}.json", f"reports/metrics_{name}.json"):
            doc = json.loads((root / f).read_text())
            doc.get("made_from", {}).pop("git_commit", None)
            out[f] = doc
        for f in (f"reports/confusion_{name}.csv", f"reports/per_class_{name}.csv"):
            out[f] = (root / f).read_text()
        config = json.loads((root / f"models/{name}/config.json").read_text())
        provenance = dict(config["made_from"])
        provenance.pop("git_commit", None)
        out[f"models/{name}:made_from"] = provenance
    return out
