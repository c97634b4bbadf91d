"""Extraction on a Ray cluster (``extract.engine: ray``).

Ray Data actors run the same decoders (:mod:`~pipeline.extract.decode`) and the
same network phase (:mod:`~pipeline.extract.compute`) as the local engine, so a
feature row does not depend on the engine.

The driver (where ``dvc repro`` runs) receives the actors' rows through Ray
Data's streaming executor and adds them to the per-image store, never holding
more than a few batches; the cache file is then written from the store in
manifest order by the same writer as the local engine's
(:func:`~pipeline.extract.store.write_from_store`). So no shared writable file
system is needed, DVC finds the output in its own workspace, and both engines
give the same file. The images must be reachable at the manifest's root on
every node (a shared mount), as must the weights.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbones import load_backbone
from pipeline.compiled import packages_for
from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.extract import decode
from pipeline.extract.cache import cache_attrs
from pipeline.extract.compute import ExtractResult, Timing, run_batches
from pipeline.extract.store import FeatureStore, store_key, write_from_store
from pipeline.fileio import remove_stale_temporaries
from pipeline.raycluster import check_resources, connect, import_ray, pipeline_error_in
from pipeline.extract.runner import Runner
from pipeline.runtime import place


def _import_ray():
    return import_ray("extract.engine", "ray.data")


class _ExtractWorker:
    """One Ray Data actor: builds the backbone once, then turns batches of rows into features.

    Input batches carry ``i`` (manifest index), ``path`` and ``sha256``; output
    batches carry ``i``, ``features`` (zeros where the image failed),
    ``reason`` ("" or why the image was skipped) and ``worker`` (this actor's id).
    """

    def __init__(self, *, backbone_name, weights, input_size, provenance, root, batch_size, decoder, decode_threads,
                 compile_, device, precision, torch_threads, expected_images, compiled_dir=None):
        torch.set_num_threads(max(1, int(torch_threads)))
        self.bb = load_backbone(backbone_name, weights, input_size)
        found = self.bb.provenance()
        for key, want in provenance.items():
            if found.get(key) != want:
                raise PipelineError(
                    f"a Ray worker on {socket.gethostname()} loaded {backbone_name} with {key}={found.get(key)!r} "
                    f"but the driver has {want!r}; install the same weights on every node"
                )
        self.root, self.batch_size, self.decoder = Path(root), batch_size, decoder
        self.decode_threads = decode_threads
        where = place(torch.device(device), precision, section="extract")  # once per actor process
        # The package cache is shared with the local engine: actors on the machine that built it load it.
        packages = (packages_for(compiled_dir, self.bb, where.device, where.precision.name, batch_size)
                    if compiled_dir else None)
        self.runner = Runner(self.bb.features, where.device, where.precision, compile_, packages=packages)
        self.left = expected_images  # this actor's expected share, for compile: auto
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __call__(self, batch: dict) -> dict:
        rows = [Row(str(p), 0, "", str(s)) for p, s in zip(batch["path"], batch["sha256"])]
        feats = np.zeros((len(rows), self.bb.feature_dim), dtype=np.float32)
        reasons = [""] * len(rows)
        spec = self.bb.transform_spec
        source = decode.batches(self.decoder, self.root, rows, spec, self.batch_size, self.decode_threads,
                                self.runner.device)
        try:
            pos = 0
            for chunk, f, why in run_batches(self.runner, spec, source, Timing(), n_total=self.left):
                for j in range(len(chunk)):
                    if why[j] is None:
                        feats[pos + j] = f[j]
                    else:
                        reasons[pos + j] = why[j]
                pos += len(chunk)
                self.left -= len(chunk)
        finally:
            source.close()
        return {
            "i": np.asarray(batch["i"], dtype=np.int64),
            "features": feats,
            "reason": np.array(reasons, dtype=object),
            "worker": np.array([self.id] * len(rows), dtype=object),
            "package": np.array([str(self.runner.loaded_from or "") if self.runner.mode == "packaged" else ""]
                                * len(rows), dtype=object),
        }


def _take(out: dict, rows: list[Row], store: FeatureStore, done: set, failed: dict, packages: set) -> None:
    """Add one output batch of the actors to the store (a batch may mix actors); note the packages they ran."""
    idx, feats, reasons = out["i"], out["features"], out["reason"]
    packages.update(p for p in out["package"] if p)
    ok = []
    for j, i in enumerate(idx):
        r = rows[i]
        if reasons[j]:
            if r.sha256 not in failed:
                failed[r.sha256] = str(reasons[j])
                tqdm.write(f"extract: skipped {r.path}: {reasons[j]}")
        elif r.sha256 not in done:  # a retried task can send a row twice: the first copy is kept
            done.add(r.sha256)
            ok.append(j)
    if ok:
        store.add([rows[idx[j]].sha256 for j in ok], np.ascontiguousarray(feats[ok], dtype=np.float32))


def extract_with_ray(
    *, backbone_name: str, weights: str, input_size: int = 0, root, rows: list[Row], classes: list[str], out_path,
    store_dir, address: str = "", num_gpus_per_worker: float = 0, concurrency: int = 2, batch_size: int = 32,
    num_cpus: int | None = None, num_cpus_per_worker: float = 1, decoder: str = "auto", decode_threads: int = 1,
    compile: str | bool = "auto", precision: str = "fp32", flush_every: int = 256, rows_per_task: int | None = None,
    compiled_dir=None,
) -> ExtractResult:
    """Extract features of ``rows`` with Ray Data actors into the feature cache.

    Args:
        backbone_name, weights: every actor loads them and must find the same weights (checked).
        out_path: the cache, ``data/features/<backbone>.h5``.
        store_dir: the per-image store shared with the local engine.
        address: ``""`` starts a local Ray instance (``num_cpus`` CPUs); ``"auto"``
            joins this machine's cluster; else a Ray address (``ray://head:10001``).
            An already-initialised Ray in this process is used as it is.
        num_gpus_per_worker: GPUs per actor; 0 runs CPU actors.
        concurrency: number of actors.
        rows_per_task: rows per Ray task (default: a few model batches, so every actor gets work).
        compiled_dir: the compiled-package cache (:mod:`pipeline.compiled`), an absolute path every
            actor can read; ``None``: none (an actor that compiles builds its own).

    Raises:
        PipelineError: Ray missing, unreachable cluster, too small a local
            instance, or an actor that could not load the backbone.
    """
    if precision == "int8":  # each actor would have to quantize its own copy: not built
        raise PipelineError("extract.precision: int8 runs on the local engine only; set extract.engine: local, "
                            "or use auto, fp32 or bf16 on Ray")
    ray = _import_ray()
    if not isinstance(num_cpus_per_worker, (int, float)) or num_cpus_per_worker <= 0:
        raise PipelineError(f"num_cpus_per_worker must be a positive number, found {num_cpus_per_worker!r}")
    t_start = time.perf_counter()
    out_path, root = Path(out_path), Path(root)
    bb = load_backbone(backbone_name, weights, input_size)  # the driver's copy: provenance, width, early errors
    # Where the actors run (GPU actors or CPU ones); the driver resolves it once for the store's key.
    where = place(torch.device("cuda" if num_gpus_per_worker > 0 else "cpu"), precision, section="extract")
    device, prec = where.device, where.precision
    decoder = decode.resolve_decoder(decoder, device)
    store = FeatureStore(store_dir, store_key(bb, decoder, prec), flush_rows=flush_every)
    remove_stale_temporaries(out_path.parent, out_path.name + ".")
    todo = store.todo(rows)
    done: set[str] = set()
    failed: dict[str, str] = {}
    packages: set[str] = set()
    t0 = time.perf_counter()
    try:
        if todo:
            settings = dict(
                backbone_name=bb.name, weights=weights, input_size=input_size, provenance=bb.provenance(), root=str(root),
                batch_size=batch_size, decoder=decoder, decode_threads=decode_threads, device=device.type,
                compile_=compile, precision=prec.name, torch_threads=num_cpus_per_worker,
                expected_images=-(-len(todo) // concurrency), compiled_dir=str(compiled_dir or ""),
            )
            _compute(ray, todo, rows, settings, lambda out: _take(out, rows, store, done, failed, packages),
                     address=address, num_cpus=num_cpus, num_cpus_per_worker=num_cpus_per_worker,
                     num_gpus_per_worker=num_gpus_per_worker, concurrency=concurrency,
                     rows_per_task=rows_per_task, batch_size=batch_size)
    finally:  # rows computed before a failure are valid: a re-run reuses them
        store.flush()
    compute_seconds = time.perf_counter() - t0
    missing = [r for r in todo if r.sha256 not in done and r.sha256 not in failed]
    if missing:  # every row comes back, as a feature or a reason; anything else is a bug
        raise AssertionError(f"ray engine: {len(missing)} rows never came back, e.g. {missing[0].path}")
    index = store.index()
    good = [r for r in rows if r.sha256 in index]
    attrs = cache_attrs(bb.provenance(), classes, decoder, prec.name, bb.feature_dim, rows,
                        preprocessing=bb.transform_spec.to_dict())
    # The one writer, from the store in manifest order, as the local engine does.
    write_from_store(out_path, good, store, bb.feature_dim, attrs)
    return ExtractResult(
        n_images=len(good), n_computed=len(done), n_reused=sum(1 for r in good if r.sha256 not in done),
        n_skipped=len(rows) - len(good),
        seconds=time.perf_counter() - t_start, compute_seconds=compute_seconds, compile_seconds=0.0,
        skipped=[{"path": r.path, "reason": failed.get(r.sha256, "could not be decoded (see above)")}
                 for r in rows if r.sha256 not in index],
        computed=[r.path for r in todo if r.sha256 in done], mode="ray",
        packages=sorted(packages),
    )


def _compute(ray, todo: list[Row], rows: list[Row], settings: dict, take, *, address, num_cpus,
             num_cpus_per_worker, num_gpus_per_worker, concurrency, rows_per_task, batch_size) -> None:
    """Run the actors over ``todo``; ``take`` receives each output batch on the driver."""
    started_here = connect(ray, address, num_cpus, "extract.ray.address")
    try:
        check_resources(ray, address, concurrency, {"CPU": num_cpus_per_worker, "GPU": num_gpus_per_worker},
                        f"extract.ray.concurrency={concurrency} actors",
                        "lower extract.ray.concurrency or extract.ray.num_gpus_per_worker",
                        warn=lambda line: tqdm.write(f"extract: {line}"))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver's own bar below is enough in a DVC log
        ctx.print_on_execution_start = False
        n = len(todo)
        if rows_per_task is None:
            rows_per_task = min(batch_size * 8, max(batch_size, math.ceil(n / (concurrency * 4))))
        position = {r.sha256: i for i, r in enumerate(rows)}
        items = [{"i": position[r.sha256], "path": r.path, "sha256": r.sha256} for r in todo]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(n / rows_per_task)))
        ds = ds.map_batches(
            _ExtractWorker, fn_constructor_kwargs=settings, batch_size=rows_per_task, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus_per_worker,
            num_gpus=num_gpus_per_worker or None,
        )
        with tqdm(total=n, unit="img", desc=f"extract {settings['backbone_name']} (ray)", dynamic_ncols=True) as bar:
            try:
                for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                    take(out)
                    bar.update(len(out["i"]))
            except Exception as e:  # noqa: BLE001 - unwrap a user error raised in an actor
                found = pipeline_error_in(e)
                if found is not None:
                    raise PipelineError(str(found)) from None
                raise
    finally:
        if started_here:
            ray.shutdown()


def run_stage(backbone, extract, prepared, out: Path, compiled_dir=None) -> ExtractResult:
    """The extract stage on a Ray cluster (``extract.engine: ray``, settings under ``extract.ray``)."""
    e, r = extract, extract.ray
    print(f"extract: {len(prepared.rows)} images through {backbone.name} on Ray "
          f"({r.address or 'local instance'}, {r.concurrency} actors) -> {out}", flush=True)
    return extract_with_ray(
        backbone_name=backbone.name, weights=backbone.weights, input_size=backbone.input_size,
        root=prepared.root, rows=prepared.rows, classes=prepared.classes, out_path=out, store_dir=e.store or None,
        address=r.address, num_gpus_per_worker=r.num_gpus_per_worker, concurrency=r.concurrency,
        batch_size=e.batch_size, decoder=e.decoder, decode_threads=e.decode_threads, compile=e.compile,
        precision=e.precision, flush_every=e.flush_every, compiled_dir=compiled_dir,
    )
