"""The local engine: every image once through the frozen backbone on this machine.

Rows already in the per-image store are reused; the rest are decoded
(:mod:`~pipeline.extract.decode`), run through the backbone
(:mod:`~pipeline.extract.compute`) and added to the store; the cache file is
then written from the store, in manifest order, and appears atomically.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.backbones import Backbone, get_spec, load_backbone
from pipeline.compiled import packages_for
from pipeline.data.manifest import Prepared, Row, read_prepared
from pipeline.extract import decode
from pipeline.extract.cache import cache_attrs
from pipeline.extract.compute import (
    ExtractResult,
    Timing,
    calibration_batches,
    calibration_id,
    calibration_rows,
    good_rows,
    run_batches,
)
from pipeline.errors import PipelineError
from pipeline.extract.store import FeatureStore, store_key, write_from_store
from pipeline.fileio import remove_stale_temporaries
from pipeline.extract.runner import Runner
from pipeline.runtime import EXTRACT_PRECISIONS, Placement, Precision, place, process_age


def extract_features(
    backbone: Backbone,
    *,
    root: str | Path,
    rows: list[Row],
    classes: list[str],
    out_path: str | Path,
    batch_size: int = 32,
    device: str | Placement = "auto",
    precision: str = "fp32",
    decode_threads: int = 2,
    decoder: str = "auto",
    compile: str | bool = "auto",
    store_dir: str | Path | None = None,
    flush_every: int = 256,
    early=None,
    compiled_dir: str | Path | None = None,
) -> ExtractResult:
    """Push every image of ``rows`` through ``backbone.features`` into an HDF5 cache.

    Args:
        rows: the manifest's :class:`~pipeline.data.manifest.Row` records.
        device, precision: ``extract.device`` and ``extract.precision`` (see :mod:`pipeline.runtime`),
            or the caller's :class:`~pipeline.runtime.Placement` as ``device``.
        decoder: ``extract.decoder`` (see :mod:`pipeline.extract.decode`).
        compile: ``True``, ``False`` or ``"auto"`` (see :class:`~pipeline.extract.runner.Runner`).
        store_dir: folder of the per-image store; ``None`` keeps a temporary
            one beside ``out_path`` only for this call (no reuse).
        flush_every: rows per store shard: a killed run recomputes at most this many.
        compiled_dir: folder of the compiled-model cache (:mod:`pipeline.compiled`);
            ``None``: a package, where one is built, serves this call only.
        early: batches of ``rows`` from :func:`~pipeline.extract.decode.batches`,
            started before the backbone was loaded (decoding while the network
            loads); used when exactly those rows are to be computed with the
            same settings, else discarded. Closed in either case.

    Returns:
        counts and timings; images that fail to decode are skipped and listed.
    """
    t_start = time.perf_counter()
    try:
        where = place(device, precision, section="extract", accepted=EXTRACT_PRECISIONS)
        dev, prec = where.device, where.precision
        decoder = decode.resolve_decoder(decoder, dev)
    except BaseException:
        if early is not None:
            early.close()
        raise
    root, out_path = Path(root), Path(out_path)
    spec = backbone.transform_spec
    calibration = calibration_rows(rows) if prec.name == "int8" else []
    calib_id = calibration_id(calibration) if calibration else ""
    temporary_store = store_dir is None
    if temporary_store:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        store_dir = tempfile.mkdtemp(prefix=".store-", dir=out_path.parent)
    try:
        store = FeatureStore(store_dir, store_key(backbone, decoder, prec, calib_id), flush_rows=flush_every)
        remove_stale_temporaries(out_path.parent, out_path.name + ".")
        todo = store.todo(rows)
        request = (decoder, str(root), spec, batch_size, decode_threads, str(dev))
        if early is not None and not (todo == rows and early.request == request):
            early.close()
            early = None
        timing, failed, mode, wants_package, packages = Timing(), {}, "-", False, []
        if todo:
            source = early or decode.batches(decoder, root, todo, spec, batch_size, decode_threads, dev)
            early = None  # closed by _compute from here on
            runner = _runner(backbone, dev, prec, compile, calibration, root, decoder, batch_size,
                             decode_threads, source, compiled_dir)
            mode = _compute(runner, backbone, todo, store, source, timing, failed)
            # Still undecided: too few batches to time, so it stayed eager; a package serves later runs too.
            wants_package = runner.wants_package or runner.undecided
            packages = [str(runner.loaded_from)] if runner.mode == "packaged" else []
        index = store.index()  # now with the rows just computed
        good = [r for r in rows if r.sha256 in index]
        skipped = [{"path": r.path, "reason": failed.get(r.sha256, "could not be decoded (see above)")}
                   for r in rows if r.sha256 not in index]
        attrs = cache_attrs(backbone.provenance(), classes, decoder, prec.name, backbone.feature_dim, rows,
                            preprocessing=backbone.transform_spec.to_dict())
        if calib_id:
            attrs["int8_calibration"] = calib_id
        write_from_store(out_path, good, store, backbone.feature_dim, attrs)
    finally:
        if early is not None:
            early.close()
        if temporary_store:
            shutil.rmtree(store_dir, ignore_errors=True)
    computed = [r.path for r in todo if r.sha256 not in failed]
    computed_hashes = {r.sha256 for r in todo if r.sha256 not in failed}
    return ExtractResult(
        n_images=len(good),
        n_computed=len(computed),
        n_reused=sum(1 for r in good if r.sha256 not in computed_hashes),
        n_skipped=len(skipped),
        seconds=time.perf_counter() - t_start,
        compute_seconds=timing.seconds,
        compile_seconds=timing.compile_seconds,
        skipped=skipped,
        computed=computed,
        mode=mode,
        first_batch_seconds=timing.first_batch_age,
        packages=packages,
        package_wanted=wants_package,
    )


def _runner(backbone: Backbone, dev, prec: Precision, compile, calibration: list[Row], root: Path, decoder: str,
            batch_size: int, decode_threads: int, source=None, compiled_dir=None) -> Runner:
    """The network's runner, with its package cache in ``compiled_dir``; for int8, calibrated on
    ``calibration`` (decoded only if the package must be built). ``source``, if any, is closed on failure."""
    try:
        calib = calibration and (lambda: _calibration(backbone, dev, calibration, root, decoder, batch_size,
                                                      decode_threads))
        packages = (packages_for(compiled_dir, backbone, dev, prec.name, batch_size, calibration_id(calibration)
                                 if calibration else "") if compiled_dir is not None else None)
        return Runner(backbone.features, dev, prec, compile, calibration=calib, packages=packages)
    except BaseException:
        if source is not None:
            source.close()
        raise


def _calibration(backbone: Backbone, dev, calibration: list[Row], root: Path, decoder: str, batch_size: int,
                 decode_threads: int) -> list:
    """The int8 calibration photos, decoded into full batches."""
    calib = decode.batches(decoder, root, calibration, backbone.transform_spec, batch_size, decode_threads, dev)
    try:
        return calibration_batches(calib, backbone.transform_spec, dev, batch_size)
    finally:
        calib.close()


def _compute(runner: Runner, backbone: Backbone, todo: list[Row], store: FeatureStore, source,
             timing: Timing, failed: dict) -> str:
    """Compute the rows of ``todo`` from ``source`` into ``store``; failures go to ``failed`` (sha256 -> reason)."""
    spec = backbone.transform_spec
    try:
        with tqdm(total=len(todo), unit="img", desc=f"extract {backbone.name}", dynamic_ncols=True) as bar:
            for chunk, f, reasons in run_batches(runner, spec, source, timing, n_total=len(todo)):
                if bar.n == 0:
                    timing.first_batch_age = process_age()
                ok, bad = good_rows(chunk, reasons)
                for row, why in bad:
                    failed[row.sha256] = why
                    tqdm.write(f"extract: skipped {row.path}: {why}")
                if ok:
                    store.add([chunk[i].sha256 for i in ok], f[ok])
                bar.update(len(chunk))
        store.flush()
    finally:
        source.close()
    return runner.mode


def run_stage(backbone, extract, prepared: Prepared, out: Path, compiled_dir=None) -> ExtractResult:
    """The extract stage on this machine (``extract.engine: local``).

    The first batches decode while the network loads (and, for int8, is
    quantized): the transform is known from the registry without building it.
    """
    e = extract
    where = place(e.device, e.precision, section="extract", accepted=EXTRACT_PRECISIONS)
    dev = where.device
    decoder = decode.resolve_decoder(e.decoder, dev)
    spec = get_spec(backbone.name).transform_for(backbone.weights, backbone.input_size)
    early = decode.batches(decoder, prepared.root, prepared.rows, spec, e.batch_size, e.decode_threads, dev)
    try:
        bb = load_backbone(backbone.name, backbone.weights, backbone.input_size)
    except BaseException:
        early.close()
        raise
    print(f"extract: {len(prepared.rows)} images through {backbone.name} ({bb.weights}) on "
          f"{where.describe()}, batch {e.batch_size}, decoder {decoder} -> {out}", flush=True)
    return extract_features(
        bb, root=prepared.root, rows=prepared.rows, classes=prepared.classes, out_path=out,
        batch_size=e.batch_size, device=where, decode_threads=e.decode_threads,
        decoder=e.decoder, compile=e.compile, store_dir=e.store or None, flush_every=e.flush_every, early=early,
        compiled_dir=compiled_dir,
    )


def build_package(backbone, extract, compiled_dir: str | Path, prepared_dir: str | Path = "data/prepared") -> Path:
    """Build (or load and check) the compiled package the extract stage would use with these settings.

    ``python -m pipeline compile``, and the background build that
    ``compile: auto`` starts when compiling did not pay on its own run.
    int8 reads its calibration photos from ``prepared_dir``'s manifest.

    Returns:
        the package's path.

    Raises:
        PipelineError: the network could not be compiled (the stage would run eager).
    """
    e = extract
    where = place(e.device, e.precision, section="extract", accepted=EXTRACT_PRECISIONS)
    dev, prec = where.device, where.precision
    bb = load_backbone(backbone.name, backbone.weights, backbone.input_size)
    decoder = decode.resolve_decoder(e.decoder, dev)
    try:
        prepared = read_prepared(prepared_dir)
    except PipelineError:
        if prec.name == "int8":
            raise
        prepared = None  # fp32/bf16 need no photos to compile: the check then runs on noise
    calibration = calibration_rows(prepared.rows) if prec.name == "int8" else []
    root = prepared.root if prepared else Path(".")
    runner = _runner(bb, dev, prec, True, calibration, root, decoder, e.batch_size, e.decode_threads,
                     compiled_dir=compiled_dir)
    # The export needs only the shape; a package found is checked on this batch, so real photos
    # where there are some (int8's features are checked against the float network's, which noise
    # would not resemble).
    x = _example_batch(bb, prepared, decoder, e.batch_size, dev)
    runner(x)
    if runner.mode != "packaged":
        raise PipelineError(f"{bb.name} could not be compiled on {where.describe()} (see above); "
                            "the extract stage runs it eager")
    path = runner.loaded_from
    if not runner.prepare_seconds:
        print(f"compile: {path} is ready: loaded and checked against the eager network", flush=True)
    else:
        print(f"compile: built {path} in {runner.prepare_seconds:.1f} s ({bb.name}, {prec.name}, "
              f"batch {e.batch_size}, {where.describe()})", flush=True)
    return Path(path)


def _example_batch(bb: Backbone, prepared, decoder: str, batch_size: int, dev) -> torch.Tensor:
    """One normalised batch of the manifest's photos (the first calibration photos); noise without a manifest."""
    spec = bb.transform_spec
    if prepared is not None:
        rows = calibration_rows(prepared.rows, batch_size)
        batches = _calibration(bb, dev, rows, prepared.root, decoder, batch_size, decode_threads=1)
        if batches:
            return batches[0]
    x = torch.randn(batch_size, 3, spec.crop, spec.crop, device=dev)
    return x.contiguous(memory_format=torch.channels_last)
