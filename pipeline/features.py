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
description of resize/crop/normalisation), ``torch_version``, ``classes`` (JSON
list), ``feature_dim``. Readers check them against what they expect, so a
cache made with another backbone or transform is refused, not mixed in.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbones import Backbone
from pipeline.errors import BadImage, PipelineError
from pipeline.fileio import atomic_path
from pipeline.images import load_rgb

CHECKED_ATTRS = ("backbone", "weights", "weights_sha256", "transform")


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("extract.device is 'cuda' but no CUDA device is available; use auto or cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise PipelineError(f"unknown extract.device '{device}'; accepted: auto, cpu, cuda, cuda:N")
    return torch.device(device)


def _decode(root: Path, rel: str, expected_sha: str, transform):
    """Read, hash and preprocess one image; returns (tensor, None) or (None, reason)."""
    path = root / rel
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot read file ({e.strerror or e})"
    if expected_sha and hashlib.sha256(data).hexdigest() != expected_sha:
        return None, "file changed since the prepare stage listed it; run dvc repro again"
    try:
        return transform(load_rgb(path, data=data)), None
    except BadImage as e:
        return None, e.reason


@dataclass
class ExtractResult:
    n_images: int
    n_skipped: int
    seconds: float
    skipped: list  # [{"path", "reason"}]

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("nan")


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
) -> ExtractResult:
    """Push every image of ``rows`` through ``backbone.features`` into an HDF5 file.

    Images are decoded by a small thread pool while the model runs, and only a
    few batches are in memory at once. The file is written beside ``out_path``
    and renamed into place when complete.

    Args:
        rows: ``(path, label_index, split, sha256)`` tuples, as from the manifest.
        decode_threads: threads that decode JPEGs beside the model.

    Returns:
        counts and timing; images that fail to decode are skipped and listed.
    """
    if batch_size < 1:
        raise PipelineError(f"extract.batch_size must be a positive integer, found {batch_size}")
    dev = resolve_device(device)
    root = Path(root)
    model = backbone.features.to(dev).eval()
    transform = backbone.transform
    n, dim = len(rows), backbone.feature_dim
    skipped: list[dict] = []
    str_dt = h5py.string_dtype("utf-8")

    # Decoding runs ahead of the model by at most `depth` batches: memory stays
    # bounded whatever the number of images.
    depth = 2
    batches: queue.Queue = queue.Queue(maxsize=depth)

    stop = threading.Event()  # set by the consumer when it stops early (error, Ctrl-C)

    def put(item) -> bool:
        while not stop.is_set():
            try:
                batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def producer(pool: ThreadPoolExecutor):
        try:
            for start in range(0, n, batch_size):
                chunk = rows[start : start + batch_size]
                results = list(pool.map(lambda r: _decode(root, r[0], r[3], transform), chunk))
                if not put((chunk, results)):
                    return
        except BaseException as e:  # surface in the consumer, never hang it
            put(e)
            return
        put(None)

    t0 = time.perf_counter()
    with atomic_path(out_path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5, ThreadPoolExecutor(max(1, decode_threads)) as pool:
            chunk_rows = max(1, min(n, 1024))
            feats = h5.create_dataset("features", (n, dim), "f4", chunks=(chunk_rows, dim), maxshape=(None, dim))
            labels = h5.create_dataset("labels", (n,), "i8", maxshape=(None,))
            paths = h5.create_dataset("paths", (n,), str_dt, maxshape=(None,))
            splits = h5.create_dataset("splits", (n,), str_dt, maxshape=(None,))
            hashes = h5.create_dataset("sha256", (n,), h5py.string_dtype("ascii"), maxshape=(None,))
            thread = threading.Thread(target=producer, args=(pool,), daemon=True)
            thread.start()
            written = 0
            try:
                with tqdm(total=n, unit="img", desc=f"extract {backbone.name}", dynamic_ncols=True) as bar:
                    while (item := batches.get()) is not None:
                        if isinstance(item, BaseException):
                            raise item
                        chunk, results = item
                        good = [(r, t) for r, (t, why) in zip(chunk, results) if t is not None]
                        for r, (t, why) in zip(chunk, results):
                            if t is None:
                                skipped.append({"path": r[0], "reason": why})
                                tqdm.write(f"extract: skipped {r[0]}: {why}")
                        if good:
                            x = torch.stack([t for _, t in good]).to(dev, non_blocking=True)
                            with torch.inference_mode():
                                f = model(x).float().cpu().numpy()
                            k = len(good)
                            feats[written : written + k] = f
                            labels[written : written + k] = [r[1] for r, _ in good]
                            # h5py writes variable-length strings from object arrays only.
                            paths[written : written + k] = np.array([r[0] for r, _ in good], dtype=object)
                            splits[written : written + k] = np.array([r[2] for r, _ in good], dtype=object)
                            hashes[written : written + k] = np.array([r[3] for r, _ in good], dtype=object)
                            written += k
                        bar.update(len(chunk))
            finally:
                stop.set()
                thread.join()
            for ds in (feats, labels, paths, splits, hashes):
                ds.resize(written, axis=0)
            attrs = backbone.provenance()
            attrs.update(
                torch_version=str(torch.__version__),  # a str subclass h5py cannot store
                classes=json.dumps(classes, ensure_ascii=False),
                feature_dim=dim,
            )
            h5.attrs.update(attrs)
    seconds = time.perf_counter() - t0
    return ExtractResult(written, len(skipped), seconds, skipped)


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
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"feature cache {path} not found; run the extract stage first (dvc repro)")
    try:
        with h5py.File(path, "r") as h5:
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
    *, prepared_dir, out_dir, backbone: str, weights: str, batch_size: int, device: str, decode_threads: int
) -> ExtractResult:
    """The ``extract`` stage: manifest in, ``<out_dir>/<backbone>.h5`` out."""
    from pipeline.backbones import load_backbone
    from pipeline.datasets import read_prepared

    prepared = read_prepared(prepared_dir)
    bb = load_backbone(backbone, weights)
    dev = resolve_device(device)
    out = features_path(out_dir, backbone)
    print(
        f"extract: {len(prepared.rows)} images through {backbone} ({bb.weights}) on {dev}, "
        f"batch {batch_size} -> {out}",
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
    )
    print(
        f"extract: {res.n_images} images in {res.seconds:.1f} s ({res.images_per_second:.1f} images/s), "
        f"{res.n_skipped} skipped",
        flush=True,
    )
    return res
