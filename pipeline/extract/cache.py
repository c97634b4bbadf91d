"""The HDF5 feature cache: its layout, its one writer and its one opener.

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
description of resize/crop/normalisation), ``decoder``, ``precision``,
``torch_version``, ``classes`` (JSON list), ``feature_dim``, ``manifest_sha256``
(:func:`~pipeline.data.manifest.rows_sha256` of the manifest it was made
from) and ``content_sha256`` (of every row's features, path, label, split and
image hash, in order: the identity a head records and evaluate checks).
:func:`open_cache` checks them against what the reader expects, so a cache
made with another backbone, transform, decoder or precision is refused, not
mixed in.

Both engines write the file with the one :class:`CacheWriter` (from the
per-image store, in manifest order), and every reader opens it with
:func:`open_cache`, in memory or streamed in chunks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.data.manifest import Row, read_prepared, row_bytes, rows_sha256
from pipeline.errors import PipelineError
from pipeline.fileio import file_stem, write_json

#: Attributes a reader may require to match (besides ``classes``).
#: ``input_size`` is present only where one was asked for (backbone.input_size != 0).
#: The descriptive keys come first, so that a mismatch names the most telling
#: difference; the content hash catches whatever they do not say.
CHECKED_ATTRS = ("backbone", "weights", "weights_sha256", "transform", "input_size", "decoder", "precision",
                 "manifest_sha256", "content_sha256")

_STR = h5py.string_dtype("utf-8")
_ASCII = h5py.string_dtype("ascii")

#: dataset -> (dtype, per-row shape given the feature width): the layout, written once.
SCHEMA = {
    "features": ("f4", lambda dim: (dim,)),
    "labels": ("i8", lambda dim: ()),
    "paths": (_STR, lambda dim: ()),
    "splits": (_STR, lambda dim: ()),
    "sha256": (_ASCII, lambda dim: ()),
}

def features_path(out_dir: str | Path, backbone: str) -> Path:
    """``data/features/<backbone>.h5``: the path dvc.yaml names, ``data/features/${backbone.name}.h5``.

    dvc.yaml cannot transform a name, so a ``timm/<model>.<tag>`` name gives a
    ``timm/`` sub-folder rather than a flattened file name; each part of the
    name must itself be a safe file name (no ``..``, no separators of another
    kind), which registry names are.
    """
    parts = backbone.split("/")
    if any(p in ("", ".", "..") or file_stem(p) != p for p in parts):
        raise PipelineError(f"backbone name {backbone!r} cannot name a cache file; "
                            "use a registry name (python -m pipeline backbones)")
    return Path(out_dir, *parts[:-1]) / f"{parts[-1]}.h5"


#: The extract_extra stage's folder under the features folder, and the index it writes there.
EXTRA_DIR, EXTRA_INDEX = "extra", "index.json"


def write_extra_index(extra_dir: str | Path, backbones) -> Path:
    """Record which backbones' caches ``extra_dir`` holds, in ``heads.backbones`` order (also when none)."""
    path = Path(extra_dir) / EXTRA_INDEX
    write_json(path, {"backbones": list(backbones)})
    return path


def head_features_paths(out_dir: str | Path, backbone: str, extra=()) -> list[Path]:
    """The caches a head reads: ``backbone``'s, then each of ``heads.backbones`` (under ``extra/``).

    The extract_extra stage's index must list exactly ``extra``: a folder
    made for another ``heads.backbones`` is stale, not partly usable.

    Raises:
        PipelineError: the index is missing or lists other backbones.
    """
    extra_dir = Path(out_dir) / EXTRA_DIR
    index = extra_dir / EXTRA_INDEX
    try:
        listed = json.loads(index.read_text(encoding="utf-8"))["backbones"]
    except (OSError, ValueError, KeyError, TypeError):
        raise PipelineError(f"{index} not found or unreadable; run dvc repro (the extract_extra stage "
                            "writes it, also when heads.backbones is [])") from None
    if list(listed) != list(extra):
        raise PipelineError(f"{extra_dir} holds the caches of {listed} but heads.backbones is {list(extra)}; "
                            "it is stale: run dvc repro")
    return [features_path(out_dir, backbone)] + [features_path(extra_dir, b) for b in extra]


def cache_attrs(provenance: dict, classes, decoder: str, precision: str, feature_dim: int, rows=None,
                preprocessing: dict | None = None) -> dict:
    """The cache's attributes: provenance, decoder, precision, versions, class list, the manifest's hash.

    ``preprocessing`` is the backbone's :class:`~pipeline.data.transform.TransformSpec`
    as a dict, kept as JSON so that a head's model folder records it as data
    (``transform`` says the same in words, and is what readers compare).

    ``rows`` are the manifest's rows the cache is made from (before any image
    is skipped as unreadable); without them no ``manifest_sha256`` is recorded.
    ``content_sha256`` is added by the writer.
    """
    # Imported here, by the extraction that writes a cache (torch is loaded by
    # then): the heads' stages only read caches, and skip torch's start-up.
    import torch

    attrs = dict(
        provenance,
        decoder=decoder,
        precision=precision,
        torch_version=str(torch.__version__),  # a str subclass h5py cannot store
        classes=json.dumps(classes, ensure_ascii=False),
        feature_dim=int(feature_dim),
    )
    if rows is not None:
        attrs["manifest_sha256"] = rows_sha256(classes, rows)
    if preprocessing is not None:
        attrs["preprocessing"] = json.dumps(preprocessing)
    return attrs


def check_free_space(path: Path, n_rows: int, dim: int) -> None:
    """Refuse before writing: HDF5 running out of space mid-file fails badly."""
    needed = n_rows * (dim * 4 + 200) + (1 << 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise PipelineError(
            f"cannot write {path}: no space left on device (needs about {needed / 2**20:.1f} MB, "
            f"{free / 2**20:.1f} MB free); free space or choose another folder"
        )


def _columns(rows: list[Row]) -> dict:
    return {
        "labels": np.array([r.label for r in rows], dtype=np.int64),
        "paths": np.array([r.path for r in rows], dtype=object),
        "splits": np.array([r.split for r in rows], dtype=object),
        "sha256": np.array([r.sha256 for r in rows], dtype=object),
    }


class CacheWriter:
    """A file of :data:`SCHEMA` that grows as rows arrive (the only writer of cache rows).

    Args:
        path: the file to create (the caller makes it appear atomically).
        dim: the feature width.
        attrs: from :func:`cache_attrs`.
    """

    def __init__(self, path: str | Path, dim: int, attrs: dict):
        self.path, self.n = Path(path), 0
        self._sha = hashlib.sha256()
        # HDF5 chunks of about 1 MB along the sample axis: a small file stays small.
        chunk_rows = max(16, (1 << 20) // (4 * dim))
        self.h5 = h5py.File(self.path, "w")
        for name, (dtype, shape) in SCHEMA.items():
            s = shape(dim)
            self.h5.create_dataset(name, (0, *s), dtype, maxshape=(None, *s), chunks=(chunk_rows, *s))
        self.h5.attrs.update(attrs)

    def append(self, features: np.ndarray, rows: list[Row]) -> int:
        """Append rows and their features; returns the index of the first new row."""
        start, k = self.n, len(rows)
        self.n += k
        self._sha.update(np.ascontiguousarray(features, dtype="<f4").tobytes())
        for r in rows:
            self._sha.update(row_bytes(r))
        for name, data in dict(_columns(rows), features=features).items():
            ds = self.h5[name]
            ds.resize(self.n, axis=0)
            ds[start : self.n] = data
        return start

    def close(self) -> None:
        if self.h5:
            self.h5.attrs["content_sha256"] = self._sha.hexdigest()
            self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------ read


def check_provenance(found: dict, expected: dict, what: str) -> None:
    """Raise if ``found`` disagrees with ``expected`` on any key ``expected`` names."""
    for key, want in expected.items():
        have = found.get(key)
        if have != want:
            raise PipelineError(
                f"{what} was made with {key}={have!r} but the current setting is {want!r}; "
                "it is stale: run dvc repro to rebuild it"
            )


def _open_h5(path: Path) -> h5py.File:
    """Open a cache for reading, checking that its datasets are there."""
    if not path.is_file():
        raise PipelineError(f"feature cache {path} not found; run the extract stage first (dvc repro)")
    try:
        h5 = h5py.File(path, "r")
        for name in SCHEMA:
            h5[name]
    except (OSError, KeyError) as e:
        raise PipelineError(f"cannot read feature cache {path} ({e}); delete it and run dvc repro") from None
    return h5


def _attrs(h5: h5py.File) -> dict:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}


@dataclass
class FeatureSet:
    """The cache loaded into memory (in-memory heads need all of it anyway)."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    splits: np.ndarray
    sha256: np.ndarray
    classes: list[str]
    attrs: dict

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.splits == split
        return self.features[mask], self.labels[mask]

    def rows(self) -> list[Row]:
        return [Row(str(p), int(y), str(s), str(h))
                for p, y, s, h in zip(self.paths, self.labels, self.splits, self.sha256)]


class StreamedFeatures:
    """A cache opened for chunked reading: :class:`FeatureSet`'s metadata, features in chunks.

    ``labels``, ``splits`` and ``paths`` are read on first use, ``chunk_rows``
    at a time; features are only ever read in chunks of at most ``chunk_rows``.
    """

    def __init__(self, path: str | Path, chunk_rows: int = 65536):
        if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 2:
            raise PipelineError(f"heads.chunk_rows must be an integer of at least 2, found {chunk_rows!r}")
        self.path, self.chunk_rows = Path(path), chunk_rows
        with self.open() as h5:
            self.attrs = _attrs(h5)
            self.n, self.dim = h5["features"].shape
        self.classes = json.loads(self.attrs["classes"])
        self._cols: dict[str, np.ndarray] = {}

    def open(self) -> h5py.File:
        return _open_h5(self.path)

    def ranges(self):
        """``(start, stop)`` of consecutive chunks covering the file."""
        for s in range(0, self.n, self.chunk_rows):
            yield s, min(s + self.chunk_rows, self.n)

    def _column(self, name: str) -> np.ndarray:
        if name not in self._cols:
            with self.open() as h5:
                ds = h5[name].asstr() if name in ("splits", "paths", "sha256") else h5[name]
                parts = [np.asarray(ds[s:e]) for s, e in self.ranges()]
            self._cols[name] = np.concatenate(parts) if parts else np.empty(0, dtype=object)
        return self._cols[name]

    @property
    def labels(self) -> np.ndarray:
        return self._column("labels")

    @property
    def splits(self) -> np.ndarray:
        return self._column("splits")

    @property
    def paths(self) -> np.ndarray:
        return self._column("paths")

    @property
    def sha256(self) -> np.ndarray:
        return self._column("sha256")

    def mask(self, split: str) -> np.ndarray:
        """Boolean per row: is it in ``split``? Built chunk by chunk: one byte per row, not a string."""
        key = f"mask:{split}"
        if key not in self._cols:
            if "splits" in self._cols:
                self._cols[key] = self._cols["splits"] == split
            else:
                out = np.zeros(self.n, dtype=bool)
                with self.open() as h5:
                    ds = h5["splits"].asstr()
                    for s, e in self.ranges():
                        out[s:e] = np.asarray(ds[s:e]) == split
                self._cols[key] = out
        return self._cols[key]

    def labels_of(self, split: str) -> np.ndarray:
        return self.labels[self.mask(split)]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Features of rows ``start:stop`` (one contiguous read)."""
        with self.open() as h5:
            return h5["features"][start:stop]

    def chunks(self, split: str):
        """Yield ``(X, y)`` of ``split``'s rows, in file order, at most ``chunk_rows`` rows per read."""
        mask, labels = self.mask(split), self.labels
        with self.open() as h5:
            feats = h5["features"]
            for s, e in self.ranges():
                m = mask[s:e]
                if m.any():
                    yield feats[s:e][m], labels[s:e][m]

    def predict(self, estimator, split: str, score):
        """Stream ``split`` through a fitted head: ``(y_true, y_pred, score(estimator, X))``."""
        ys, preds, ss = [], [], []
        for X, y in self.chunks(split):
            ys.append(y)
            preds.append(estimator.predict(X))
            ss.append(score(estimator, X))
        if not ys:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, len(self.classes)))
        return np.concatenate(ys), np.concatenate(preds), np.concatenate(ss)


def open_cache(path, expected: dict | None = None, *, stream: bool = False,
               chunk_rows: int = 65536) -> FeatureSet | StreamedFeatures:
    """Open a feature cache, refusing one that does not match ``expected``.

    ``path`` may be a list of caches of the same images made by several
    backbones: their features are concatenated column-wise (see :func:`concatenate`).

    Args:
        expected: attribute values the caller requires, e.g. ``{"backbone":
            "resnet50", "classes": [...]}``: any of :data:`CHECKED_ATTRS` and ``classes``.
        stream: return a :class:`StreamedFeatures` (nothing loaded yet) instead
            of a :class:`FeatureSet` in memory.

    Raises:
        PipelineError: missing, unreadable or incomplete file, or stale provenance.
    """
    if isinstance(path, (list, tuple)):
        if len(path) > 1:
            if stream:
                raise PipelineError("heads.out_of_core streams one cache; with heads.backbones set, "
                                    "keep heads.out_of_core: false (the concatenated features are read into memory)")
            return concatenate([open_cache(p, expected) for p in path], path)
        path = path[0]
    path = Path(path)
    if stream:
        fs = StreamedFeatures(path, chunk_rows)
    else:
        with _open_h5(path) as h5:
            try:
                attrs = _attrs(h5)
                fs = FeatureSet(
                    features=h5["features"][:],
                    labels=h5["labels"][:],
                    paths=h5["paths"].asstr()[:],
                    splits=h5["splits"].asstr()[:],
                    sha256=h5["sha256"].asstr()[:],
                    classes=json.loads(attrs["classes"]),
                    attrs=attrs,
                )
            except (OSError, KeyError) as e:
                raise PipelineError(f"cannot read feature cache {path} ({e}); delete it and run dvc repro") from None
    found = {k: fs.attrs.get(k) for k in CHECKED_ATTRS}
    found["classes"] = fs.classes
    check_provenance(found, expected or {}, f"feature cache {path}")
    return fs


def concatenate(sets: list[FeatureSet], paths) -> FeatureSet:
    """Several backbones' caches of the same images as one: features side by side.

    The rows must be the same images in the same order with the same labels
    and splits, checked row by row (paths and content hashes); the
    provenance attributes join each cache's values with `` + ``.
    """
    first = sets[0]
    for fs, p in zip(sets[1:], paths[1:]):
        for name in ("paths", "sha256", "labels", "splits"):
            a, b = getattr(first, name), getattr(fs, name)
            if len(a) != len(b) or not np.array_equal(a, b):
                bad = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
                raise PipelineError(
                    f"feature caches {paths[0]} and {p} disagree on {name} at row {bad} "
                    f"({len(a)} and {len(b)} rows); run dvc repro so that both are extracted from the same manifest"
                )
        if fs.classes != first.classes:
            raise PipelineError(f"feature caches {paths[0]} and {p} have different class lists; run dvc repro")
    attrs = {k: " + ".join(str(fs.attrs.get(k, "")) for fs in sets)
             for k in CHECKED_ATTRS if any(k in fs.attrs for fs in sets)}
    attrs.update(classes=first.attrs["classes"], feature_dim=sum(int(fs.attrs["feature_dim"]) for fs in sets))
    # The first backbone's: a head on several backbones is scored on the caches only
    # (predict and export need one backbone), and its folder records the first.
    if "preprocessing" in first.attrs:
        attrs["preprocessing"] = first.attrs["preprocessing"]
    return FeatureSet(np.concatenate([fs.features for fs in sets], axis=1), first.labels, first.paths,
                      first.splits, first.sha256, first.classes, attrs)


def manifest_rows(fs, features_file, prepared_dir) -> tuple[Path, list[Row]]:
    """The cache's test rows as the manifest lists them: ``(dataset root, rows)``, in cache order.

    Raises:
        PipelineError: the cache holds a test image the manifest does not
            list, or one whose content hash differs (the cache is stale).
    """
    prepared = read_prepared(prepared_dir)
    listed = {r.path: r for r in prepared.split("test")}
    test = fs.splits == "test"
    rows = []
    for path, sha in zip(fs.paths[test], fs.sha256[test]):
        row = listed.get(str(path))
        if row is None or row.sha256 != sha:
            why = "does not list it" if row is None else "records another content hash"
            raise PipelineError(f"{features_file} holds test image {path} but {prepared_dir}/manifest.csv {why}; "
                                "the cache is stale: run dvc repro")
        rows.append(row)
    return prepared.root, rows
