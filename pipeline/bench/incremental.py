"""Adding photos to an extracted set: ``python -m pipeline.bench incremental --folder DIR --backbone NAME``.

Times adding ``--add`` images to an extracted set (the per-image store keeps the
rows already computed) against the full extraction, and checks the result equals
a from-scratch extraction row for row.

Example:
    python -m pipeline.bench incremental --folder ../shared/data/catsdogs --backbone efficientnet_lite0 --add 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline.backbones import load_backbone
from pipeline.bench.common import add_photo_arguments, folder_rows, rewrite_folder
from pipeline.extract.cache import open_cache
from pipeline.extract.local import extract_features


def bench_incremental(folder, backbone, weights="DEFAULT", add=10, repeat=1) -> dict:
    """Cost of adding ``add`` images to an extracted set, against the full extraction.

    With ``repeat`` > 1 the set is the folder repeated that many times (each copy
    a distinct file: one byte appended after the JPEG data), in a temporary folder.
    """
    import numpy as np

    def copies(f: Path, out: Path) -> int:
        data = f.read_bytes()
        for k in range(repeat):
            (out / f"{k}_{f.name}").write_bytes(data + bytes([k % 256]) * (k > 0))
        return repeat

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(folder)
        if repeat > 1:
            rewrite_folder(src, Path(tmp) / "set", copies)
            src = Path(tmp) / "set"
        classes, rows = folder_rows(src, None)
        rng = np.random.default_rng(0)
        held = set(rng.choice(len(rows), size=add, replace=False).tolist())
        first = [r for i, r in enumerate(rows) if i not in held]
        store = Path(tmp) / "store"

        def timed_extract(rows_, name, store_dir):
            t = time.perf_counter()
            bb = load_backbone(backbone, weights)  # the stage loads the network each run too
            res = extract_features(bb, root=src, rows=rows_, classes=classes, out_path=Path(tmp) / name,
                                   store_dir=store_dir, compile=False)
            return res, time.perf_counter() - t

        full, t_full = timed_extract(first, "full.h5", store)
        more, t_more = timed_extract(rows, "more.h5", store)
        scratch, t_scratch = timed_extract(rows, "scratch.h5", None)
        a, b = open_cache(Path(tmp) / "more.h5"), open_cache(Path(tmp) / "scratch.h5")
        same = list(a.paths) == list(b.paths) and bool(np.allclose(a.features, b.features, rtol=1e-4, atol=1e-5))
    print(
        f"bench incremental: {backbone}, {len(first)} images extracted in {t_full:.1f} s; adding {add}: "
        f"{more.n_computed} computed in {t_more:.1f} s ({100 * t_more / t_full:.1f}% of the full run); "
        f"equals a from-scratch extraction ({t_scratch:.1f} s) row for row: {same}",
        flush=True,
    )
    return {"full_s": t_full, "add_s": t_more, "computed": more.n_computed, "same": same}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_photo_arguments(p)
    p.add_argument("--add", type=int, default=10)
    p.add_argument("--repeat", type=int, default=1, help="use the folder repeated N times (distinct files)")


def run(a: argparse.Namespace) -> dict:
    return bench_incremental(a.folder, a.backbone, a.weights, a.add, a.repeat)
