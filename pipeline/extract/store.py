"""The per-image feature store: computed rows kept by image content hash.

Every row extraction computes is also kept here, keyed by the image's content
hash together with everything else that determines it (backbone, weights,
transform, decoder, precision). Re-running after adding images computes only
the new ones, identical files are computed once, switching a setting back
finds its rows again, and a killed run resumes from the last flushed shard.

The store is a folder per configuration, ``<root>/<backbone>-<digest>/``, of
small HDF5 shards (``sha256``, ``features``), each written to a temporary file
and renamed when complete.

Every executor (local, Ray) feeds rows into a store and then writes the cache
file from it with :func:`write_from_store`, in manifest order, through the one
:class:`~pipeline.extract.cache.CacheWriter`: whichever ran, the same file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from tqdm import tqdm

from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.extract.cache import CacheWriter, check_free_space
from pipeline.fileio import atomic_path, file_stem, remove_stale_temporaries, write_json

if TYPE_CHECKING:
    from pipeline.backbones import Backbone
    from pipeline.runtime import Precision


def store_key(backbone: Backbone, decoder: str, precision: Precision, calibration: str = "") -> dict:
    """Everything besides the pixels that determines a feature row.

    ``calibration``: for int8, :func:`~pipeline.extract.compute.calibration_id`
    (the photos that set the quantization ranges change every row).
    """
    key = dict(backbone.provenance(), decoder=decoder, precision=precision.name)
    return dict(key, calibration=calibration) if calibration else key


class FeatureStore:
    """Feature rows keyed by image content hash, for one configuration.

    Args:
        root: the store's parent folder (``data/cache/features``).
        key: everything that determines a feature row besides the pixels.
        flush_rows: rows per shard: a killed run recomputes at most these.
    """

    def __init__(self, root: str | Path, key: dict, flush_rows: int = 256):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / f"{file_stem(key.get('backbone', 'features'))}-{digest}"
        self.key = key
        self.flush_rows = flush_rows
        self._hashes: list[str] = []
        self._rows: list[np.ndarray] = []
        self._index: dict[str, tuple[Path, int]] | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / "key.json").is_file():
                write_json(self.dir / "key.json", key)
        except OSError as e:
            raise PipelineError(f"cannot create the feature store {self.dir}: {e.strerror or e}") from None
        remove_stale_temporaries(self.dir, "shard-")

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

    def todo(self, rows: list[Row]) -> list[Row]:
        """The rows whose features are not stored yet, each distinct content once."""
        seen = set(self.index())
        out = []
        for r in rows:
            if r.sha256 not in seen:
                seen.add(r.sha256)
                out.append(r)
        return out

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

    def reader(self, keep: int = 4) -> ShardReader:
        return ShardReader(self.index(), keep)


class ShardReader:
    """Reads stored rows by content hash, keeping a few recent shards in memory."""

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

    def stack(self, rows: list[Row]) -> np.ndarray:
        return np.stack([self(r.sha256) for r in rows])


def write_from_store(out_path: Path, rows: list[Row], store: FeatureStore, dim: int, attrs: dict,
                     block: int = 1024) -> None:
    """Write the cache file of ``rows`` from the store, in their order, atomically."""
    check_free_space(out_path, len(rows), dim)
    read = store.reader()
    with atomic_path(out_path, suffix=".h5") as tmp:
        with CacheWriter(tmp, dim, attrs) as w:
            for s in range(0, len(rows), block):
                part = rows[s : s + block]
                w.append(read.stack(part), part)
