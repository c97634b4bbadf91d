"""The HDF5 feature cache: every image pushed once through the frozen backbone.

Schema of ``data/features/<backbone>.h5`` (one row per usable image, in manifest order):

=============  ============  ================================================
dataset        shape/type    meaning
=============  ============  ================================================
features       (N, D) f4     pooled penultimate activations
labels         (N,) i8       index into the ``classes`` attribute
paths          (N,) utf-8    image path relative to the dataset root
splits         (N,) utf-8    "train" or "test"
sha256         (N,) ascii    content hash of the image file the row came from
=============  ============  ================================================

Attributes: ``backbone``, ``weights``, ``weights_sha256``, ``transform`` (readable
description of resize/crop/normalisation), ``decoder``, ``torch_version``,
``classes`` (JSON list), ``feature_dim``. Readers check them against what they
expect, so a cache made with another backbone or transform is refused, not
mixed in.

Extraction is incremental: every computed feature row is also kept in a
per-image store (:class:`FeatureStore`) keyed by the image's content hash
together with backbone, weights, transform and decoder. Re-running after adding
images computes only the new ones, and a run that is killed resumes from the
last flushed shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbones import Backbone
from pipeline.errors import BadImage, PipelineError
from pipeline.fileio import atomic_path, remove_stale_temporaries
from pipeline.data.images import load_rgb

CHECKED_ATTRS = ("backbone", "weights", "weights_sha256", "transform")

#: ``extract.decoder``: how files become pixels. ``pillow`` decodes and resizes
#: with Pillow exactly as torchvision's ``weights.transforms()`` do, using JPEG
#: draft mode (reduced-scale decoding) for sources at least twice the target;
#: ``torchvision`` decodes JPEGs with ``torchvision.io.decode_jpeg`` on the
#: model's device (the GPU path) and resizes tensors there.
DECODERS = ("auto", "pillow", "pillow-exact", "torchvision")

#: Images below this count are not worth ``torch.compile``'s start-up on a CPU.
COMPILE_MIN_IMAGES_CPU = 1000


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("extract.device is 'cuda' but no CUDA device is available; use auto or cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise PipelineError(f"unknown extract.device '{device}'; accepted: auto, cpu, cuda, cuda:N")
    return torch.device(device)


def resolve_decoder(decoder: str, device: torch.device) -> str:
    if decoder not in DECODERS:
        raise PipelineError(f"unknown extract.decoder '{decoder}'; accepted: {', '.join(DECODERS)}")
    if decoder == "auto":
        return "torchvision" if device.type == "cuda" else "pillow"
    return decoder


# ---------------------------------------------------------------- per-image store


class FeatureStore:
    """Feature rows keyed by image content hash, for one backbone configuration.

    The store is a folder of small HDF5 shards, each written to a temporary
    file and renamed when complete, so a killed run loses at most the rows not
    yet flushed and never leaves a shard half-written.

    Args:
        root: the store's parent folder (``data/cache/features``).
        key: everything that determines a feature row besides the pixels:
            backbone, weights, weights_sha256, transform, decoder.
    """

    def __init__(self, root: str | Path, key: dict, flush_rows: int = 256):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / f"{key.get('backbone', 'features')}-{digest}"
        self.key = key
        self.flush_rows = flush_rows
        self._hashes: list[str] = []
        self._rows: list[np.ndarray] = []
        self._index: dict[str, tuple[Path, int]] | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / "key.json").is_file():
                from pipeline.fileio import write_json

                write_json(self.dir / "key.json", key)
        except OSError as e:
            raise PipelineError(f"cannot create the feature store {self.dir}: {e.strerror or e}") from None

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.h5"))

    def index(self) -> dict[str, tuple[Path, int]]:
        """content hash -> (shard, row) for every row already stored.

        The shards are scanned once; rows flushed afterwards are added as they
        are written, so asking again costs nothing.
        """
        if self._index is not None:
            return self._index
        idx: dict[str, tuple[Path, int]] = {}
        for shard in self.shards():
            try:
                with h5py.File(shard, "r") as h5:
                    hashes = h5["sha256"].asstr()[:]
            except (OSError, KeyError):
                # Shards are renamed into place only when complete; one that does
                # not read was damaged afterwards. Its rows are simply recomputed.
                tqdm.write(f"extract: ignoring unreadable cache shard {shard}")
                continue
            for i, h in enumerate(hashes):
                idx[h] = (shard, i)
        self._index = idx
        return idx

    def add(self, hashes: list[str], rows: np.ndarray) -> None:
        self._hashes.extend(hashes)
        self._rows.append(np.asarray(rows, dtype=np.float32))
        if len(self._hashes) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._hashes:
            return
        # Built in memory, then written as plain bytes: a full disk then fails as
        # an ordinary OSError, whereas HDF5 failing mid-write can leave its
        # library state broken (seen: a crash at the next garbage collection).
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as h5:
            h5["sha256"] = np.array(self._hashes, dtype=object).astype(h5py.string_dtype("ascii"))
            h5["features"] = np.concatenate(self._rows)
        shard = self.dir / f"shard-{time.time_ns():020d}-{os.getpid()}.h5"
        with atomic_path(shard, suffix=".h5") as tmp:
            tmp.write_bytes(buffer.getbuffer())
        if self._index is not None:
            self._index.update((h, (shard, i)) for i, h in enumerate(self._hashes))
        self._hashes, self._rows = [], []


class _ShardReader:
    """Reads rows from store shards, keeping a few recent shards in memory."""

    def __init__(self, index: dict[str, tuple[Path, int]], keep: int = 4):
        self.index = index
        self.keep = keep
        self._cache: OrderedDict[Path, np.ndarray] = OrderedDict()

    def __call__(self, sha: str) -> np.ndarray:
        shard, row = self.index[sha]
        if shard not in self._cache:
            with h5py.File(shard, "r") as h5:
                self._cache[shard] = h5["features"][:]
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(shard)
        return self._cache[shard][row]


# --------------------------------------------------------------------- decoding


def read_checked(root: Path, rel: str, expected_sha: str) -> tuple[bytes | None, str | None]:
    """An image file's bytes, checked against the manifest's hash: ``(data, None)`` or ``(None, reason)``."""
    try:
        data = (root / rel).read_bytes()
    except OSError as e:
        return None, f"cannot read file ({e.strerror or e})"
    if expected_sha and hashlib.sha256(data).hexdigest() != expected_sha:
        return None, "file changed since the prepare stage listed it; run dvc repro again"
    return data, None


class _PillowBatches:
    """Decode + resize with Pillow in threads, into reused uint8 batch buffers.

    Buffers are (B, H, W, 3): viewed as (B, 3, H, W) they are already in
    channels_last order, so the batch reaches the model without a layout copy.
    Decoding runs ahead of the model by at most ``len(buffers) - 1`` batches.
    """

    def __init__(self, root, rows, spec, batch_size, threads, draft, n_buffers=3):
        self.root, self.rows, self.spec = Path(root), rows, spec
        self.batch_size, self.draft = batch_size, draft
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode")
        c = spec.crop
        self.free: queue.Queue = queue.Queue()
        for _ in range(n_buffers):
            self.free.put(np.empty((batch_size, c, c, 3), dtype=np.uint8))
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, daemon=True)
        self.thread.start()

    def _decode_into(self, buf, i, row) -> str | None:
        data, why = read_checked(self.root, row[0], row[3])
        if why:
            return why
        try:
            r = self.spec.resize
            image = load_rgb(self.root / row[0], data=data, draft_size=(r, r) if self.draft else None)
        except BadImage as e:
            return e.reason
        buf[i] = np.asarray(self.spec.resize_crop(image))
        return None

    def _produce(self):
        try:
            for start in range(0, len(self.rows), self.batch_size):
                chunk = self.rows[start : start + self.batch_size]
                buf = self._get(self.free)
                if buf is None:
                    return
                reasons = list(self.pool.map(lambda a: self._decode_into(buf, *a), enumerate(chunk)))
                self.ready.put((chunk, buf, reasons))
            self.ready.put(None)
        except BaseException as e:  # surface in the consumer, never hang it
            self.ready.put(e)

    def _get(self, q):
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def __iter__(self):
        while (item := self.ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            chunk, buf, reasons = item
            yield chunk, torch.from_numpy(buf).permute(0, 3, 1, 2), reasons
            self.free.put(buf)  # the consumer has copied it to float by now

    def close(self):
        self.stop.set()
        self.thread.join()
        self.pool.shutdown(wait=True)


class _TorchvisionBatches:
    """The GPU path: files read in threads, JPEGs decoded in batches on the device.

    ``torchvision.io.decode_jpeg(device='cuda')`` uses nvJPEG; resizing and
    cropping then happen on the GPU too. A file nvJPEG cannot take (PNG, CMYK,
    corrupt) falls back to :func:`load_rgb` on the CPU, one image at a time.
    On a CPU device the same code runs with libjpeg-turbo, which is how it is
    tested without a GPU.
    """

    def __init__(self, root, rows, spec, batch_size, threads, device):
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        self._decode_jpeg, self._mode, self._F = decode_jpeg, ImageReadMode.RGB, F
        self._interp = InterpolationMode(spec.interpolation)
        self.root, self.rows, self.spec = Path(root), rows, spec
        self.batch_size, self.device = batch_size, device
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="read")

    def _fallback(self, rel, data):
        try:
            a = np.asarray(load_rgb(self.root / rel, data=data))
        except BadImage as e:
            return None, e.reason
        return torch.from_numpy(a.copy()).permute(2, 0, 1).to(self.device, non_blocking=True), None

    def _decode_batch(self, chunk, datas):
        images: list = [None] * len(chunk)
        reasons: list = [None] * len(chunk)
        jpeg = [i for i, d in enumerate(datas) if d is not None and d[:3] == b"\xff\xd8\xff"]
        tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpeg]
        try:
            decoded = self._decode_jpeg(
                tensors, mode=self._mode, apply_exif_orientation=True, device=self.device
            ) if tensors else []
        except RuntimeError:  # one bad file fails the whole batch: retry one by one
            decoded = []
            for t in tensors:
                try:
                    decoded.append(self._decode_jpeg(t, mode=self._mode, apply_exif_orientation=True, device=self.device))
                except RuntimeError:
                    decoded.append(None)
        for i, img in zip(jpeg, decoded):
            images[i] = img
        for i, d in enumerate(datas):
            if d is not None and images[i] is None:
                images[i], reasons[i] = self._fallback(chunk[i][0], d)
        return images, reasons

    def __iter__(self):
        c = self.spec.crop
        batch = torch.empty((self.batch_size, 3, c, c), dtype=torch.uint8, device=self.device)
        batch = batch.contiguous(memory_format=torch.channels_last)
        chunks = [self.rows[s : s + self.batch_size] for s in range(0, len(self.rows), self.batch_size)]
        read = lambda chunk: list(self.pool.map(lambda r: read_checked(self.root, r[0], r[3]), chunk))  # noqa: E731
        pending = self.pool.submit(read, chunks[0]) if chunks else None
        for k, chunk in enumerate(chunks):
            results = pending.result()
            # Read the next batch's files while this one is decoded and run.
            pending = self.pool.submit(read, chunks[k + 1]) if k + 1 < len(chunks) else None
            datas = [d for d, _ in results]
            images, reasons = self._decode_batch(chunk, datas)
            reasons = [why or r for (_, why), r in zip(results, reasons)]
            for i, img in enumerate(images):
                if img is not None and reasons[i] is None:
                    img = self._F.resize(img, self.spec.resize, interpolation=self._interp, antialias=True)
                    batch[i] = self._F.center_crop(img, self.spec.crop)
            yield chunk, batch, reasons

    def close(self):
        self.pool.shutdown(wait=True)


# ----------------------------------------------------------------------- model


def _prepare_model(backbone: Backbone, device: torch.device, compile_: bool):
    """channels_last (and torch.compile) for inference; returns (callable, note)."""
    model = backbone.features.to(device).eval().to(memory_format=torch.channels_last)
    if not compile_:
        return model, "eager"
    try:
        return torch.compile(model, dynamic=False), "compiled"
    except Exception as e:  # noqa: BLE001 - any failure: run eager instead
        tqdm.write(f"extract: torch.compile unavailable ({str(e).splitlines()[0][:120]}); running eager")
        return model, "eager"


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------------- extract


@dataclass
class ExtractResult:
    n_images: int  # rows in the output file
    n_computed: int  # images pushed through the network in this run
    n_reused: int  # rows taken from the per-image store
    n_skipped: int
    seconds: float  # whole call
    compute_seconds: float  # decoding + network, excluding compile
    compile_seconds: float
    skipped: list = field(default_factory=list)  # [{"path", "reason"}]
    computed: list = field(default_factory=list)  # paths computed in this run
    mode: str = "eager"

    @property
    def images_per_second(self) -> float:
        """Throughput of the images computed in this run (decode + network)."""
        return self.n_computed / self.compute_seconds if self.compute_seconds > 0 else float("nan")


def extract_features(
    backbone: Backbone,
    *,
    root: str | Path,
    rows: list,
    classes: list[str],
    out_path: str | Path,
    batch_size: int = 32,
    device: str = "auto",
    decode_threads: int = 1,
    decoder: str = "auto",
    compile: str | bool = "auto",
    store_dir: str | Path | None = None,
    flush_every: int = 256,
) -> ExtractResult:
    """Push every image of ``rows`` through ``backbone.features`` into an HDF5 file.

    Args:
        rows: ``(path, label_index, split, sha256)`` tuples, as from the manifest.
        decode_threads: threads that decode images beside the model.
        decoder: see :data:`DECODERS`.
        compile: ``True``, ``False`` or ``"auto"`` (on CUDA, or on CPU from
            :data:`COMPILE_MIN_IMAGES_CPU` new images, where it pays for itself).
        store_dir: folder of the per-image store; ``None`` keeps a temporary
            one beside ``out_path`` only for this call (no reuse).
        flush_every: rows per store shard: a killed run recomputes at most this many.

    Returns:
        counts and timings; images that fail to decode are skipped and listed.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PipelineError(f"extract.batch_size must be a positive integer, found {batch_size!r}")
    t_start = time.perf_counter()
    dev = resolve_device(device)
    decoder = resolve_decoder(decoder, dev)
    root = Path(root)
    key = dict(backbone.provenance(), decoder=decoder)
    temporary_store = store_dir is None
    if temporary_store:
        import tempfile

        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        store_dir = tempfile.mkdtemp(prefix=".store-", dir=Path(out_path).parent)
    store = FeatureStore(store_dir, key, flush_rows=flush_every)
    remove_stale_temporaries(Path(out_path).parent, Path(out_path).name + ".")
    remove_stale_temporaries(store.dir, "shard-")
    try:
        index = store.index()
        # Identical files (same content hash) are computed once.
        todo, seen = [], set(index)
        for r in rows:
            if r[3] not in seen:
                seen.add(r[3])
                todo.append(r)
        compute = _run_network(backbone, todo, root, store, dev, decoder, batch_size, decode_threads, compile)
        index = store.index()  # now with the rows just computed
        failed = {r[0]: why for r, why in compute["failed"]}
        good = [r for r in rows if r[3] in index]
        skipped = [{"path": r[0], "reason": failed.get(r[0], "could not be decoded (see above)")}
                   for r in rows if r[3] not in index]
        _assemble(out_path, good, index, backbone, classes, decoder)
    finally:
        if temporary_store:
            import shutil

            shutil.rmtree(store_dir, ignore_errors=True)
    return ExtractResult(
        n_images=len(good),
        n_computed=len(compute["computed"]),
        n_reused=len(good) - len([r for r in good if r[0] in compute["computed_set"]]),
        n_skipped=len(skipped),
        seconds=time.perf_counter() - t_start,
        compute_seconds=compute["seconds"],
        compile_seconds=compute["compile_seconds"],
        skipped=skipped,
        computed=compute["computed"],
        mode=compute["mode"],
    )


def _run_network(backbone, todo, root, store, dev, decoder, batch_size, decode_threads, compile_):
    """Compute the rows of ``todo`` into ``store``; returns what was done and how fast."""
    out = {"computed": [], "computed_set": set(), "failed": [], "seconds": 0.0, "compile_seconds": 0.0, "mode": "-"}
    if not todo:
        return out
    if compile_ == "auto":
        compile_ = dev.type == "cuda" or len(todo) >= COMPILE_MIN_IMAGES_CPU
    model, out["mode"] = _prepare_model(backbone, dev, bool(compile_))
    eager = backbone.features
    spec = backbone.transform_spec
    if decoder == "torchvision":
        batches = _TorchvisionBatches(root, todo, spec, batch_size, max(2, decode_threads), dev)
    else:
        batches = _PillowBatches(root, todo, spec, batch_size, decode_threads, draft=decoder == "pillow")
    first = True
    t0 = time.perf_counter()
    try:
        with tqdm(total=len(todo), unit="img", desc=f"extract {backbone.name}", dynamic_ncols=True) as bar:
            for chunk, x, reasons in batches:
                # Always the full buffer: a fixed shape never makes torch.compile
                # recompile for the last, shorter batch; unused rows are ignored.
                x = spec.normalize_(x.to(dev, non_blocking=True))
                t_call = time.perf_counter()
                with torch.inference_mode(), _autocast(dev):
                    try:
                        f = model(x)
                    except Exception as e:  # noqa: BLE001 - compile errors surface on first call
                        if not first or out["mode"] != "compiled":
                            raise
                        tqdm.write(f"extract: torch.compile failed ({str(e).splitlines()[0][:120]}); running eager")
                        model, out["mode"] = eager.to(memory_format=torch.channels_last), "eager"
                        f = model(x)
                f = f.float().cpu().numpy()
                if first and out["mode"] == "compiled":
                    out["compile_seconds"] = time.perf_counter() - t_call
                    t0 += out["compile_seconds"]
                first = False
                ok = [i for i, why in enumerate(reasons) if why is None]
                for i, why in enumerate(reasons):
                    if why is not None:
                        out["failed"].append((chunk[i], why))
                        tqdm.write(f"extract: skipped {chunk[i][0]}: {why}")
                if ok:
                    store.add([chunk[i][3] for i in ok], f[ok])
                    for i in ok:
                        out["computed"].append(chunk[i][0])
                bar.update(len(chunk))
        store.flush()
    finally:
        batches.close()
    out["computed_set"] = set(out["computed"])
    out["seconds"] = time.perf_counter() - t0
    return out


def _check_free_space(path: Path, needed: int) -> None:
    """Refuse before writing: HDF5 running out of space mid-file fails badly."""
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise PipelineError(
            f"cannot write {path}: no space left on device (needs about {needed / 2**20:.1f} MB, "
            f"{free / 2**20:.1f} MB free); free space or choose another folder"
        )


def cache_attrs(backbone: Backbone, classes, decoder: str) -> dict:
    """The feature cache's attributes: provenance, decoder, versions, class list."""
    attrs = backbone.provenance()
    attrs.update(
        decoder=decoder,
        torch_version=str(torch.__version__),  # a str subclass h5py cannot store
        classes=json.dumps(classes, ensure_ascii=False),
        feature_dim=backbone.feature_dim,
    )
    return attrs


def _assemble(out_path, good, index, backbone: Backbone, classes, decoder) -> None:
    """Write the stage's HDF5 file from the store, in manifest order, atomically."""
    n, dim = len(good), backbone.feature_dim
    _check_free_space(Path(out_path), n * (dim * 4 + 200) + (1 << 20))
    str_dt = h5py.string_dtype("utf-8")
    read = _ShardReader(index)
    with atomic_path(out_path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5:
            chunk = max(1, min(n, 1024))
            feats = h5.create_dataset("features", (n, dim), "f4", chunks=(chunk, dim) if n else None)
            for s in range(0, n, chunk):
                part = good[s : s + chunk]
                feats[s : s + len(part)] = np.stack([read(r[3]) for r in part])
            # h5py writes variable-length strings from object arrays only.
            h5["labels"] = np.array([r[1] for r in good], dtype=np.int64)
            h5.create_dataset("paths", data=np.array([r[0] for r in good], dtype=object), dtype=str_dt)
            h5.create_dataset("splits", data=np.array([r[2] for r in good], dtype=object), dtype=str_dt)
            h5.create_dataset(
                "sha256", data=np.array([r[3] for r in good], dtype=object), dtype=h5py.string_dtype("ascii")
            )
            h5.attrs.update(cache_attrs(backbone, classes, decoder))


# ------------------------------------------------------------------------ read


@dataclass
class FeatureSet:
    """The cache loaded into memory (heads need all of it anyway)."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    splits: np.ndarray
    classes: list[str]
    attrs: dict

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.splits == split
        return self.features[mask], self.labels[mask]


def check_provenance(found: dict, expected: dict, what: str) -> None:
    """Raise if ``found`` disagrees with ``expected`` on any key ``expected`` names."""
    for key, want in expected.items():
        have = found.get(key)
        if have != want:
            raise PipelineError(
                f"{what} was made with {key}={have!r} but the current setting is {want!r}; "
                "it is stale: run dvc repro to rebuild it"
            )


def read_features(path: str | Path, expected: dict | None = None) -> FeatureSet:
    """Load a feature cache, refusing one that does not match ``expected``.

    Args:
        expected: attribute values the caller requires, e.g. ``{"backbone":
            "resnet50", "classes": [...]}``; any of :data:`CHECKED_ATTRS` and
            ``classes``.

    Raises:
        PipelineError: missing or unreadable file, or stale provenance.
    """
    from pipeline.extract.ray_executor import check_shards

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"feature cache {path} not found; run the extract stage first (dvc repro)")
    try:
        with h5py.File(path, "r") as h5:
            check_shards(h5, path)  # a cache the ray engine wrote is virtual over shard files
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
            fs = FeatureSet(
                features=h5["features"][:],
                labels=h5["labels"][:],
                paths=h5["paths"].asstr()[:],
                splits=h5["splits"].asstr()[:],
                classes=json.loads(attrs["classes"]),
                attrs=attrs,
            )
    except (OSError, KeyError) as e:
        raise PipelineError(f"cannot read feature cache {path} ({e}); delete it and run dvc repro") from None
    found = {k: attrs.get(k) for k in CHECKED_ATTRS}
    found["classes"] = fs.classes
    check_provenance(found, expected or {}, f"feature cache {path}")
    return fs


def features_path(out_dir: str | Path, backbone: str) -> Path:
    return Path(out_dir) / f"{backbone}.h5"


def run_extract(
    *,
    prepared_dir,
    out_dir,
    backbone: str,
    weights: str,
    batch_size: int,
    device: str,
    decode_threads: int,
    decoder: str = "auto",
    compile: str | bool = "auto",
    store_dir=None,
    flush_every: int = 256,
    engine: str = "local",
    ray: dict | None = None,
) -> ExtractResult:
    """The ``extract`` stage: manifest in, ``<out_dir>/<backbone>.h5`` out.

    ``engine``: ``local`` (this machine) or ``ray`` (Ray Data actors, see
    :mod:`pipeline.extract.ray_executor`; ``ray`` holds ``extract.ray``: address,
    num_gpus_per_worker, concurrency).
    """
    from pipeline.backbones import load_backbone
    from pipeline.data.manifest import read_prepared
    from pipeline.extract.ray_executor import reset_shards_dir

    if engine not in ("local", "ray"):
        raise PipelineError(f"unknown extract.engine '{engine}'; accepted: local, ray")
    prepared = read_prepared(prepared_dir)
    if engine == "ray":
        from pipeline.extract.ray_executor import extract_with_ray

        r = ray or {}
        out = features_path(out_dir, backbone)
        print(
            f"extract: {len(prepared.rows)} images through {backbone} on Ray "
            f"({r.get('address') or 'local instance'}, {r.get('concurrency', 2)} actors) -> {out}",
            flush=True,
        )
        res = extract_with_ray(
            backbone_name=backbone, weights=weights, root=prepared.root, rows=prepared.rows,
            classes=prepared.classes, out_path=out, address=r.get("address", ""),
            num_gpus_per_worker=r.get("num_gpus_per_worker", 0), concurrency=r.get("concurrency", 2),
            batch_size=batch_size, decoder=decoder, decode_threads=decode_threads, compile=compile,
            store_dir=store_dir, flush_every=flush_every,
        )
        print(
            f"extract: {res.n_images} images in {res.seconds:.1f} s on Ray: {res.n_computed} computed, "
            f"{res.n_reused} reused, {res.n_skipped} skipped",
            flush=True,
        )
        return res
    bb = load_backbone(backbone, weights)
    dev = resolve_device(device)
    out = features_path(out_dir, backbone)
    print(
        f"extract: {len(prepared.rows)} images through {backbone} ({bb.weights}) on {dev}, "
        f"batch {batch_size}, decoder {resolve_decoder(decoder, dev)} -> {out}",
        flush=True,
    )
    res = extract_features(
        bb,
        root=prepared.root,
        rows=prepared.rows,
        classes=prepared.classes,
        out_path=out,
        batch_size=batch_size,
        device=str(dev),
        decode_threads=decode_threads,
        decoder=decoder,
        compile=compile,
        store_dir=store_dir,
        flush_every=flush_every,
    )
    reset_shards_dir(out)  # no shards from an earlier ray run; DVC tracks the (empty) folder either way
    speed = f" at {res.images_per_second:.1f} images/s ({res.mode})" if res.n_computed else ""
    compiled = f", compile {res.compile_seconds:.1f} s" if res.compile_seconds else ""
    print(
        f"extract: {res.n_images} images in {res.seconds:.1f} s: {res.n_computed} computed{speed}{compiled}, "
        f"{res.n_reused} reused from {store_dir or 'no store'}, {res.n_skipped} skipped",
        flush=True,
    )
    return res
