"""The ``quality`` stage: the audit of the data set on its cached features, as reports and pictures.

Reads the manifest (``data/prepared``) and ``data/features/<backbone.name>.h5``
(which must be made from that manifest), runs the three checks of
:mod:`pipeline.quality.checks` and writes:

- ``reports/quality.json``: the number of suspects per kind, the thresholds
  used, the spread of neighbour similarities (to calibrate them), and the
  photos the exclude file (``data.exclude``) already left out;
- ``reports/quality/suspects.csv`` (:mod:`pipeline.quality.suspects`);
- ``reports/quality/<kind>.png``: a contact sheet per kind (:mod:`pipeline.quality.sheets`).

Train/test leaks are also reported as a warning line: a test photo with a
near-copy in the train split inflates every accuracy in reports/.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.config import QualityConfig
from pipeline.data.manifest import read_prepared
from pipeline.extract.cache import features_path, open_cache
from pipeline.fileio import read_json, write_csv, write_json
from pipeline.quality.checks import Suspect, duplicates, label_issues, outliers
from pipeline.quality.knn import nearest, normalise
from pipeline.quality.sheets import contact_sheet
from pipeline.quality.suspects import HEADER, KINDS


def audit(X, labels, splits, sizes, q: QualityConfig, log=print) -> tuple[list[Suspect], dict]:
    """The three checks on feature rows: ``(suspects, facts for the report)``; the library call of the stage.

    Args:
        X: ``(n, d)`` features; labels, splits, sizes: per row (class index, split name, file bytes).
        q: the ``quality`` section.
        log: where the one line per check goes.
    """
    facts = {}
    t = time.perf_counter()
    found = label_issues(X, labels, folds=q.folds, C=q.C, seed=q.seed)
    facts["seconds"] = {"label_issues": round(time.perf_counter() - t, 2)}
    log(f"quality: label issues: {len(found)} of {len(X)} photos, by cleanlab on out-of-fold probabilities "
        f"(logreg, C {q.C}, {q.folds} folds) in {facts['seconds']['label_issues']:.1f} s")
    t = time.perf_counter()
    nb = nearest(normalise(X), q.neighbours)
    facts["seconds"]["knn"] = round(time.perf_counter() - t, 2)
    facts["knn"] = nb.method
    first = nb.similarity[:, 0] if nb.similarity.shape[1] else np.zeros(0)
    facts["nearest_similarity_percentiles"] = {
        str(p): round(float(np.percentile(first, p)), 4) for p in (50, 90, 99, 100)} if len(first) else {}
    log(f"quality: kNN graph ({nb.method}, k {nb.index.shape[1]}) in {facts['seconds']['knn']:.1f} s")
    t = time.perf_counter()
    dup = duplicates(nb, splits, labels, sizes, q.duplicate_similarity)
    far, facts["outliers"] = outliers(nb, q.outlier_z)
    facts["seconds"]["duplicates_outliers"] = round(time.perf_counter() - t, 2)
    n_leak = sum(s.kind == "train_test_leak" for s in dup)
    log(f"quality: near-duplicates: {len(dup) - n_leak}, train/test leaks: {n_leak} (cosine similarity >= "
        f"{q.duplicate_similarity}); outliers: {len(far)} ({q.outlier_z} robust SDs below the median "
        f"neighbour similarity)")
    return found + dup + far, facts


def run_quality(q: QualityConfig, backbone: str, *, prepared_dir="data/prepared", features_dir="data/features",
                reports_dir="reports") -> dict:
    """The stage: audit the cache of ``backbone`` (``backbone.name``) and write the reports.

    Returns:
        the counts written to ``reports/quality.json`` (under ``quality``).

    Raises:
        PipelineError: the manifest or cache is missing, or the cache was not made from this manifest.

    Example:
        >>> run_quality(load_config().quality, load_config().backbone.name)   # doctest: +SKIP
    """
    prepared = read_prepared(prepared_dir)
    info = read_json(Path(prepared_dir) / "dataset.json", "the prepare stage's dataset.json")
    cache = features_path(features_dir, backbone)
    fs = open_cache(cache, {"classes": prepared.classes, "manifest_sha256": prepared.sha256})
    rows, root = fs.rows(), prepared.root
    print(f"quality: {len(rows)} photos of {cache} ({fs.features.shape[1]} features each)", flush=True)
    sizes = np.array([_size(root / r.path) for r in rows], dtype=np.int64)
    suspects, facts = audit(fs.features, fs.labels, fs.splits, sizes, q, log=lambda m: print(m, flush=True))

    order = {k: i for i, k in enumerate(KINDS)}
    suspects.sort(key=lambda s: (order[s.kind], -s.score, rows[s.row].path))
    classes = prepared.classes
    name = lambda i: "" if i is None else classes[i]  # noqa: E731
    table = [[rows[s.row].path, rows[s.row].split, classes[rows[s.row].label], s.kind, f"{s.score:.4f}",
              name(s.suggested), "" if s.partner is None else rows[s.partner].path] for s in suspects]
    out = Path(reports_dir)
    write_csv(out / "quality" / "suspects.csv", HEADER, table)
    for kind in KINDS:
        mine = [s for s in suspects if s.kind == kind]
        contact_sheet(out / "quality" / f"{kind}.png", kind, [_cell(s, rows, classes) for s in mine], root,
                      len(mine))
    counts = {kind: sum(s.kind == kind for s in suspects) for kind in KINDS}
    counts["photos"] = len(rows)
    counts["excluded"] = len(info.get("excluded", []))
    report = {"quality": counts,
              "thresholds": {"folds": q.folds, "C": q.C, "seed": q.seed, "neighbours": q.neighbours,
                             "duplicate_similarity": q.duplicate_similarity, "outlier_z": q.outlier_z},
              "exclude": info.get("exclude", ""), **facts}
    write_json(out / "quality.json", report)
    print(f"quality: {', '.join(f'{v} {k}' for k, v in counts.items() if k in KINDS)}; "
          f"{out / 'quality/suspects.csv'}, a contact sheet per kind in {out / 'quality'}"
          + (f"; {counts['excluded']} photos left out by {info['exclude']}" if counts["excluded"] else ""),
          flush=True)
    if counts["train_test_leak"]:
        print(f"quality: WARNING: {counts['train_test_leak']} train/test leaks: photos with a near-copy in the "
              "other split (train_test_leak in suspects.csv); every accuracy in reports/ is inflated until one "
              "of each pair is excluded "
              "(python -m pipeline quality exclude --kinds train_test_leak)", flush=True)
    return counts


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _cell(s: Suspect, rows, classes) -> dict:
    row = rows[s.row]
    given = classes[row.label]
    if s.kind == "label_issue":
        caption = [row.path, f"{given} ({row.split})", f"suggested: {classes[s.suggested]}", f"score {s.score:.2f}"]
    elif s.partner is not None:
        other = rows[s.partner]
        caption = [row.path, f"{given} ({row.split}); kept: {classes[other.label]} ({other.split})",
                   f"copy of {other.path}", f"similarity {s.score:.3f}"]
    else:
        caption = [row.path, f"{given} ({row.split})", "far from every class", f"{s.score:.1f} SDs below median"]
    return {"row": row, "caption": caption, "partner": rows[s.partner] if s.partner is not None else None}
