"""The ``extract`` stage: manifest in, ``data/features/<backbone>.h5`` out, on the engine ``extract.engine`` names."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import BackboneConfig, ExtractConfig
from pipeline.data.manifest import read_prepared
from pipeline.extract import local, ray_executor
from pipeline.extract.cache import EXTRA_DIR, features_path, write_extra_index
from pipeline.extract.compute import ExtractResult
from pipeline.fileio import write_json
from pipeline.extract.runner import use_compile_cache
from pipeline.runtime import process_age

#: ``extract.engine`` -> its executor's entry, ``(backbone, extract, prepared, out, compiled_dir) -> ExtractResult``.
#: An executor feeds the per-image store and writes the cache from it (:mod:`pipeline.extract.store`);
#: a new one is a module with a ``run_stage`` and a line here (and its name in config's ``ENGINES``).
ENGINES = {"local": local.run_stage, "ray": ray_executor.run_stage}

#: ``compile: auto`` builds the package in the background after a run that computed at least
#: this many images without one: a data set where the next run's compiled speed will matter.
#: Smaller runs say how to build it (``python -m pipeline compile``).
BACKGROUND_MIN_IMAGES = 1000


def cache_dirs(extract: ExtractConfig) -> tuple[Path, Path]:
    """The Inductor cache and the compiled-package cache: beside the feature store, under ``data/cache/``."""
    root = Path(extract.store or "data/cache/features").parent
    return root / "inductor", root / "compiled"


def run_extract(*, backbone: BackboneConfig, extract: ExtractConfig, prepared_dir="data/prepared",
                out_dir="data/features", metrics_path=None) -> ExtractResult:
    """Run the stage and, if ``metrics_path`` is given, write its speed there.

    The wall time reported counts from process start (imports included) where
    the system says when that was, else from this call.
    """
    t0 = time.perf_counter()
    inductor, compiled = cache_dirs(extract)
    use_compile_cache(inductor)
    prepared = read_prepared(prepared_dir)
    out = features_path(out_dir, backbone.name)
    e = extract
    res = ENGINES[e.engine](backbone, e, prepared, out, compiled.resolve())
    speed = f" at {res.images_per_second:.1f} images/s ({res.mode})" if res.n_computed else ""
    compile_note = f", compile {res.compile_seconds:.1f} s" if res.compile_seconds else ""
    age = process_age()
    wall = age if age is not None else time.perf_counter() - t0
    first = res.first_batch_seconds
    started = f" (first batch after {first:.1f} s)" if first is not None else ""
    print(f"extract: {res.n_images} images in {wall:.1f} s{started}: {res.n_computed} computed{speed}{compile_note}, "
          f"{res.n_reused} reused from {e.store or 'no store'}, {res.n_skipped} skipped", flush=True)
    if metrics_path:
        write_json(Path(metrics_path), {"extract": {
            "images": res.n_images, "computed": res.n_computed, "reused": res.n_reused,
            "skipped": res.n_skipped, "wall_seconds": round(wall, 2),
            "images_per_second": round(res.images_per_second, 1) if res.n_computed else None,
            # Start-up as a user meets it: imports, loading the network, the first batch.
            "first_batch_seconds": round(first, 2) if first is not None else None,
        }})
    if res.package_wanted:
        _package_later(res.n_computed, backbone, extract, compiled, prepared_dir)
    return res


def _package_later(n_computed: int, backbone: BackboneConfig, extract: ExtractConfig, compiled: Path,
                   prepared_dir) -> None:
    """After a run that stayed eager: build the package for the next run, in a detached low-priority
    process (large runs), or say how to."""
    if n_computed < BACKGROUND_MIN_IMAGES:
        print(f"extract: python -m pipeline compile builds the compiled package for later runs "
              f"(compile: auto does so itself after runs of {BACKGROUND_MIN_IMAGES}+ new images)", flush=True)
        return
    compiled.mkdir(parents=True, exist_ok=True)
    log = compiled / "background.log"
    b, e = backbone, extract
    cmd = [sys.executable, "-m", "pipeline", "compile", "--params", "", "--backbone", b.name, "--weights", str(b.weights),
           "--input-size", str(b.input_size), "--precision", str(e.precision), "--batch-size", str(e.batch_size),
           "--device", str(e.device), "--store", str(e.store), "--prepared", str(prepared_dir)]
    with open(log, "w", encoding="utf-8") as f:
        # Detached (its own session) and at the lowest priority: it outlives the stage, and
        # yields the cores to whatever runs next.
        subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                         preexec_fn=lambda: os.nice(19))
    print(f"extract: building the compiled package for the next run in the background, at low priority "
          f"(log: {log})", flush=True)


def run_extract_extra(*, backbones, extract: ExtractConfig, prepared_dir="data/prepared",
                      out_dir="data/features") -> list[ExtractResult]:
    """The ``extract_extra`` stage: each of ``heads.backbones`` (default weights) into ``<out_dir>/extra/``.

    One stage for the whole list, whose output folder holds exactly the
    caches the heads concatenate, and an index of them in order: the heads
    then depend on that folder, and DVC sees ``heads.backbones`` change
    ``[] -> [x] -> []`` as the folder it is. The per-image store makes a
    backbone already extracted cost only the file's writing.
    """
    extra_dir = Path(out_dir) / EXTRA_DIR
    extra_dir.mkdir(parents=True, exist_ok=True)
    results = [run_extract(backbone=BackboneConfig(name=name), extract=extract, prepared_dir=prepared_dir,
                           out_dir=extra_dir) for name in backbones]
    index = write_extra_index(extra_dir, backbones)
    print(f"extract_extra: {len(results)} extra backbone(s) {list(backbones)} -> {index}", flush=True)
    return results
