"""The prepare stage's output read back: :class:`Row` records and the class list.

A row of ``manifest.csv`` is a :class:`Row` everywhere in the package
(``row.path``, ``row.sha256``), never a positional tuple. The one stratified
hold-out, :func:`stratified_holdout`, draws the test split here and the
validation slices of fine-tuning and of the streaming heads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from pipeline.errors import PipelineError

MANIFEST_HEADER = ["path", "label", "split", "sha256"]


class Row(NamedTuple):
    """One image of the manifest.

    Attributes:
        path: POSIX path relative to the dataset root.
        label: index into the class list.
        split: ``train`` or ``test``.
        sha256: of the file's bytes; ``""`` where none is recorded (a user's
            new photo in ``predict``), which turns the content check off.
    """

    path: str
    label: int
    split: str
    sha256: str


@dataclass(frozen=True)
class Prepared:
    """The prepare stage's output, read back and checked.

    Attributes:
        root: the dataset root that manifest paths are relative to.
        classes: class names; a label index points into this list.
        rows: :class:`Row` records in manifest order.
    """

    root: Path
    classes: list[str]
    rows: list[Row]

    def split(self, name: str) -> list[Row]:
        return [r for r in self.rows if r.split == name]

    @property
    def sha256(self) -> str:
        """The manifest's identity: :func:`rows_sha256` of its classes and rows."""
        return rows_sha256(self.classes, self.rows)


def rows_sha256(classes: Sequence[str], rows: Sequence[Row]) -> str:
    """sha256 of a class list and rows (path, label, split, content hash), in order.

    Computed from the records, not the CSV's bytes, so that a manifest and a
    cache made from it can be compared however either is stored.
    """
    h = hashlib.sha256(json.dumps(list(classes), ensure_ascii=False).encode("utf-8"))
    for r in rows:
        h.update(row_bytes(r))
    return h.hexdigest()


def row_bytes(row: Row) -> bytes:
    """A row's fields as the bytes the manifest's and a cache's content hashes are computed over."""
    return f"\n{row.path}\t{row.label}\t{row.split}\t{row.sha256}".encode("utf-8")


def read_prepared(out_dir) -> Prepared:
    """Read and cross-check what the prepare stage wrote to ``out_dir``.

    Raises:
        PipelineError: a file is missing (run the prepare stage first) or the
            files disagree with each other.

    Example:
        >>> p = read_prepared("data/prepared")  # doctest: +SKIP
        >>> p.rows[0].path, p.rows[0].sha256  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    again = "run the prepare stage again (dvc repro prepare)"
    for name in ("dataset.json", "classes.json", "manifest.csv"):
        if not (out_dir / name).is_file():
            raise PipelineError(f"{out_dir / name} not found; run the prepare stage first "
                                f"(dvc repro prepare)")
    try:
        info = json.loads((out_dir / "dataset.json").read_text(encoding="utf-8"))
        classes = json.loads((out_dir / "classes.json").read_text(encoding="utf-8"))
        root = Path(info["root"])
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{out_dir} holds a damaged dataset.json or classes.json ({e}); "
                            f"{again}") from None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
            and len(set(classes)) == len(classes)):
        raise PipelineError(f"{out_dir / 'classes.json'}: expected a list of distinct class "
                            f"names; {again}")
    index = {name: i for i, name in enumerate(classes)}
    manifest = out_dir / "manifest.csv"
    rows = []
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != MANIFEST_HEADER:
            raise PipelineError(f"{manifest}: expected the header {','.join(MANIFEST_HEADER)}, "
                                f"found {','.join(header or [])}; {again}")
        for line, fields in enumerate(reader, start=2):
            if len(fields) != len(MANIFEST_HEADER):
                raise PipelineError(f"{manifest}:{line}: expected {len(MANIFEST_HEADER)} "
                                    f"fields, found {len(fields)}; {again}")
            path, label, split, sha256 = fields
            if label not in index:
                raise PipelineError(f"{manifest}:{line}: label '{label}' is not in "
                                    f"classes.json; {again}")
            if split not in ("train", "test"):
                raise PipelineError(f"{manifest}:{line}: split must be train or test, "
                                    f"found '{split}'; {again}")
            rows.append(Row(path, index[label], split, sha256))
    return Prepared(root=root, classes=classes, rows=rows)


def stratified_holdout(keys: Sequence[str], groups: Sequence, fraction: float, seed: int,
                       min_holdout: int = 1) -> np.ndarray:
    """A boolean mask: ``fraction`` of each group held out, at least ``min_holdout``, never all.

    Each group is shuffled by its own generator, seeded by ``seed`` and the
    group's name, over its members sorted by ``keys`` (paths): the hold-out does
    not depend on the order rows arrive in, and adding images to one group
    leaves the hold-out of the others as it was.

    Args:
        keys: a sortable, unique key per row (its path).
        groups: the row's class (name or index).
        fraction: share of each group to hold out, in [0, 1).
        min_holdout: the least held out per group of two or more.
    """
    keys, groups = list(keys), list(groups)
    mask = np.zeros(len(keys), dtype=bool)
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for group, idx in members.items():
        idx.sort(key=lambda i: keys[i])
        n = len(idx)
        k = min(n - 1, max(min_holdout if fraction > 0 else 0, int(n * fraction + 0.5)))
        rng = np.random.default_rng([seed, zlib.crc32(str(group).encode("utf-8"))])
        for j in rng.permutation(n)[:k].tolist():
            mask[idx[j]] = True
    return mask
