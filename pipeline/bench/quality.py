"""The quality stage's checks at scale: seconds and peak memory on synthetic clustered features.

``python -m pipeline.bench quality`` runs the stage's library call
(:func:`pipeline.quality.stage.audit`: out-of-fold probabilities and cleanlab,
the kNN graph, duplicates and outliers) on 5,000, 10,000 and 25,000 rows of
1,280-d features, each size in a fresh process so that its peak resident
memory is its own. The features are clustered like a backbone's (non-negative,
one cluster per class with sub-clusters, 2 % of labels flipped, 0.5 % of rows
near-copies of another), so the kNN search meets realistic neighbourhoods.
Each size also times the kNN search alone both ways, exact and HNSW, to show
how each grows with n (the stage uses the exact one below 20,000 rows).

Example:
    python -m pipeline.bench quality --rows 5000 10000 25000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from pipeline.bench.common import describe_cpu


def synthetic(n: int, dim: int = 1280, classes: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)``: non-negative clustered features with a few flipped labels and near-copies."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 1.0, (classes, dim)).astype(np.float32)
    subs = centres.repeat(5, axis=0) + rng.normal(0, 0.5, (classes * 5, dim)).astype(np.float32)
    sub = rng.integers(0, classes * 5, n)
    X = np.maximum(subs[sub] + rng.normal(0, 0.9, (n, dim)).astype(np.float32), 0)
    y = sub // 5
    flip = rng.choice(n, n // 50, replace=False)
    y[flip] = (y[flip] + rng.integers(1, classes, len(flip))) % classes
    copies = rng.choice(n, n // 200, replace=False)
    half = len(copies) // 2
    X[copies[half:2 * half]] = X[copies[:half]] * rng.normal(1, 0.02, (half, dim)).astype(np.float32)
    return X.astype(np.float32), y.astype(np.int64)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def one_size(n: int, dim: int) -> dict:
    """Time the stage's checks on ``n`` rows, then the kNN search alone, exact and HNSW."""
    from pipeline.config import QualityConfig
    from pipeline.quality.knn import nearest, normalise
    from pipeline.quality.stage import audit

    X, y = synthetic(n, dim)
    splits = np.where(np.random.default_rng(1).random(n) < 0.2, "test", "train")
    sizes = np.full(n, 100_000)
    q = QualityConfig()
    t = time.perf_counter()
    suspects, facts = audit(X, y, splits, sizes, q, log=lambda m: None)
    total = time.perf_counter() - t
    peak = _peak_mb()
    Z = normalise(X)
    knn = {}
    for method, exact_below in (("exact", n + 1), ("hnsw", 0)):
        # CPU seconds too: on a shared machine they move less than wall seconds with the load.
        t, cpu = time.perf_counter(), time.process_time()
        nearest(Z, q.neighbours, exact_below=exact_below)
        knn[method] = round(time.perf_counter() - t, 2)
        knn[f"{method}_cpu"] = round(time.process_time() - cpu, 2)
    counts = {k: sum(s.kind == k for s in suspects) for k in ("label_issue", "near_duplicate", "train_test_leak",
                                                            "outlier")}
    return {"rows": n, "seconds": round(total, 2), "peak_mb": round(peak), "stage_knn": facts["knn"],
            **{f"{k}_s": v for k, v in facts["seconds"].items()}, "knn_exact_s": knn["exact"],
            "knn_hnsw_s": knn["hnsw"], "knn_exact_cpu_s": knn["exact_cpu"], "knn_hnsw_cpu_s": knn["hnsw_cpu"],
            "load": os.getloadavg()[0], "found": counts}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[5000, 10000, 25000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one size, JSON out


def run(args) -> list[dict]:
    if args.one:
        print(json.dumps(one_size(args.rows[0], args.dim)), flush=True)
        return []
    print(f"quality checks on synthetic {args.dim}-d features; {describe_cpu()}", flush=True)
    print(f"{'rows':>7} {'total s':>8} {'peak MB':>8} {'labels s':>9} {'kNN s':>6} {'(kind)':>7} "
          f"{'dup+out s':>9} {'kNN exact s (CPU)':>18} {'kNN HNSW s (CPU)':>17} {'load':>5}  found", flush=True)
    results = []
    for n in args.rows:
        out = subprocess.run([sys.executable, "-m", "pipeline.bench", "quality", "--one", "--rows", str(n),
                              "--dim", str(args.dim)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"the {n}-row run failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{r['rows']:>7} {r['seconds']:>8.1f} {r['peak_mb']:>8} {r['label_issues_s']:>9.1f} "
              f"{r['knn_s']:>6.1f} {r['stage_knn']:>7} {r['duplicates_outliers_s']:>9.2f} "
              f"{r['knn_exact_s']:>10.1f} ({r['knn_exact_cpu_s']:>5.1f}) {r['knn_hnsw_s']:>9.1f} ({r['knn_hnsw_cpu_s']:>5.1f}) "
              f"{r['load']:>5.1f}  {r['found']}", flush=True)
    return results
