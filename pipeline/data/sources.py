"""From a dataset source to a manifest: which images, with which label, in which split.

Every source (a folder of ``<class>/<image>``, the Microsoft Cats vs Dogs
archive, the Oxford-IIIT Pet archives) ends in the same four files in
``out_dir``, each written atomically:

``manifest.csv``
    ``path,label,split,sha256``: one row per usable image; ``path`` is POSIX
    and relative to the dataset root, ``label`` is the class name, ``split`` is
    ``train`` or ``test``, ``sha256`` is of the file's bytes. Rows are sorted
    by (split, label, path), so the same data always gives the same bytes.
``classes.json``
    The class names; a label's integer id is its index in this list (sorted by
    name, except Oxford-IIIT Pet, which keeps its official class-id order).
``rejected.json``
    ``[{"path", "reason"}]`` for every file of the dataset that is not used.
``dataset.json``
    ``source``, ``root``, ``n_train``, ``n_test``, ``n_rejected``, ``classes``
    (their number), ``archive_sha256`` for cats-vs-dogs, and with
    ``data.exclude`` set, ``exclude`` (the file) and ``excluded`` (the photos
    it left out, sorted). Written last: it is present only when the other
    three are complete.

Every image is checked with :func:`pipeline.data.images.load_rgb`, the same decoder
feature extraction uses, so a file that passes here decodes there. Nothing in
the user's folders is ever written, moved or deleted.
"""

from __future__ import annotations

import os
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType

from tqdm import tqdm

from pipeline.config import SOURCES, check_split_params
from pipeline.data.archives import safe_extract
from pipeline.data.download import download
from pipeline.data.exclude import apply_exclude
from pipeline.data.images import load_rgb
from pipeline.data.listing import Listing, join, list_class_folders, list_oxford, plural
from pipeline.data.manifest import MANIFEST_HEADER, stratified_holdout
from pipeline.errors import BadImage, PipelineError
from pipeline.fileio import file_digest, write_csv, write_json

OXFORD_BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/"
#: The checksums torchvision's ``OxfordIIITPet`` verifies.
OXFORD_MD5 = MappingProxyType({
    "images.tar.gz": "5c4f3ee8e5d25df40f4fd59a7f44e54c",
    "annotations.tar.gz": "95a8c909bbe2e81eed6a22bccdf3f68f",
})
CATSDOGS_URL = ("https://download.microsoft.com/download/3/E/1/"
                "3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip")

#: Images are checked at this size: JPEGs then decode at a reduced scale, which
#: still finds truncated and corrupt files, several times faster.
CHECK_SIZE = (224, 224)
#: Each class needs one image to train on and one to test on.
MIN_IMAGES_PER_CLASS = 2

def prepare(*, source: str, out_dir, folder=None, download_dir="data/raw", test_fraction=0.2,
            seed=0, oxford_base_url=OXFORD_BASE_URL, oxford_md5=OXFORD_MD5,
            catsdogs_url=CATSDOGS_URL, catsdogs_sha256=None, exclude=None) -> dict:
    """List a dataset's usable images, their labels and split into ``out_dir``.

    Args:
        source: ``folder``, ``cats-vs-dogs`` or ``oxford-iiit-pet``.
        out_dir: where the four output files go (see the module docstring).
        folder: for ``folder``: the dataset root, laid out as ``<class>/<image>``;
            recorded in dataset.json as given, not resolved.
        download_dir: where archives are downloaded and extracted.
        test_fraction: for ``folder`` and ``cats-vs-dogs``: the share of each
            class held out for testing, in (0, 1). Oxford uses its official split.
        seed: the split's random seed (a non-negative integer).
        oxford_base_url, oxford_md5: where the Oxford archives are, and their
            md5 by file name (a missing or empty entry skips that check).
        catsdogs_url, catsdogs_sha256: the Cats vs Dogs archive and, optionally,
            its pinned sha256 (no official checksum is published; without one
            the archive's integrity is checked and its sha256 recorded).
        exclude: ``data.exclude``: a file of photos to leave out (see
            :mod:`pipeline.data.exclude`), applied after the split, so that the
            photos that stay keep their split; ``None`` or ``""``: none.

    Returns:
        The contents of dataset.json.

    Raises:
        PipelineError: unknown source, bad parameter, missing folder, a class
            with fewer than 2 usable images, a failed download or checksum, an
            exclude file naming photos the dataset lacks or leaving a class
            without a train photo.

    Example:
        >>> prepare(source="folder", folder="data/images",
        ...         out_dir="data/prepared")  # doctest: +SKIP
        prepare: folder data/images: 240 images in 2 classes (192 train / 48 test), 3 rejected
    """
    check_split_params(test_fraction, seed)
    out_dir = Path(out_dir)
    extra = {}
    if source == "folder":
        if not folder:
            raise PipelineError("data.source is 'folder' but data.folder is empty; set it to "
                                "a folder of images laid out as <class>/<image>")
        root, shown = Path(folder), str(folder)
        listing = list_class_folders(root, shown)
    elif source == "cats-vs-dogs":
        root, extra["archive_sha256"] = _fetch_cats_vs_dogs(
            Path(download_dir), catsdogs_url, catsdogs_sha256)
        shown = root.as_posix()
        listing = list_class_folders(root, shown)
    elif source == "oxford-iiit-pet":
        root = _fetch_oxford(Path(download_dir), oxford_base_url, oxford_md5)
        shown = root.as_posix()
        listing = list_oxford(root)
    else:
        raise PipelineError(f"unknown data.source '{source}'; accepted: {', '.join(SOURCES)}")

    print(f"prepare: {source} {shown}: {len(listing.classes)} classes, "
          f"checking {len(listing.candidates)} images", flush=True)
    usable = _check_candidates(root, listing)
    if source != "oxford-iiit-pet":  # the others have no official split: draw one
        _require_images_per_class(listing, usable, shown, out_dir)
        usable = _stratified_split(usable, test_fraction, seed)
    if exclude:
        known = {p for p, _, _ in listing.candidates} | {r["path"] for r in listing.rejected}
        extra["exclude"] = str(exclude)
        usable, extra["excluded"] = apply_exclude(usable, exclude, known, listing.classes)
        print(f"prepare: {plural(len(extra['excluded']), 'photo')} left out, as {exclude} (data.exclude) "
              "lists", flush=True)

    rows = sorted(usable, key=lambda r: (r[2], r[1], r[0]))
    splits = Counter(split for _, _, split, _ in rows)
    info = {"source": source, "root": shown, "n_train": splits["train"],
            "n_test": splits["test"], "n_rejected": len(listing.rejected),
            "classes": len(listing.classes), **extra}

    _write_rejected(out_dir, listing.rejected)
    write_json(out_dir / "classes.json", listing.classes)
    write_csv(out_dir / "manifest.csv", MANIFEST_HEADER, rows)
    write_json(out_dir / "dataset.json", info)
    print(f"prepare: {source} {shown}: {len(rows)} images in {len(listing.classes)} classes "
          f"({info['n_train']} train / {info['n_test']} test), {info['n_rejected']} rejected",
          flush=True)
    if listing.rejected:
        print(f"prepare: {plural(len(listing.rejected), 'file')} rejected; reasons in "
              f"{out_dir / 'rejected.json'}", flush=True)
    return info


# --------------------------------------------------------------------------- downloads


def _fetch_cats_vs_dogs(download_dir: Path, url: str, sha256: str | None) -> tuple[Path, str]:
    """Download and extract the Microsoft archive; return its PetImages folder and sha256."""
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    archive = download(url, download_dir / (name or "kagglecatsanddogs.zip"), sha256=sha256,
                       desc="cats-vs-dogs")
    # No official checksum exists: without a pinned one, integrity rests on the
    # zip's own CRCs (checked by safe_extract) and the recorded sha256.
    target = safe_extract(archive, download_dir / "cats-vs-dogs")
    archive_sha256 = sha256.strip().lower() if sha256 else file_digest(archive)
    if not sha256:
        print(f"prepare: cats-vs-dogs archive sha256 {archive_sha256}; pin it as "
              f"data.archive_sha256 in params.yaml to notice if it ever changes", flush=True)
    root = target / "PetImages"
    if not root.is_dir():
        raise PipelineError(f"{archive} holds no PetImages folder; expected Microsoft's Cats "
                            f"vs Dogs archive: check the URL, delete {archive} and run again")
    return root, archive_sha256


def _fetch_oxford(download_dir: Path, base_url: str, md5s) -> Path:
    """Download, verify and extract the two Oxford-IIIT Pet archives; return the root."""
    md5s = md5s or {}
    target = download_dir / "oxford-iiit-pet"
    for name in ("images.tar.gz", "annotations.tar.gz"):
        archive = download(f"{base_url.rstrip('/')}/{name}", download_dir / name,
                           md5=md5s.get(name), desc=name)
        safe_extract(archive, target)
    return target


# --------------------------------------------------------------------------- checking images


def _check_image(path: Path) -> tuple[str | None, str | None]:
    """``(sha256, None)`` for a usable image, ``(None, reason)`` otherwise."""
    try:
        load_rgb(path, draft_size=CHECK_SIZE)
        return file_digest(path), None
    except BadImage as e:
        return None, e.reason
    except OSError as e:
        return None, f"cannot read the file ({e.strerror or e})"


def _check_candidates(root: Path, listing: Listing) -> list[tuple[str, str, str | None, str]]:
    """Decode every candidate; return ``(path, label, split, sha256)`` of the usable ones.

    Unusable candidates join ``listing.rejected``, which ends sorted by path.
    """
    paths = [path for path, _, _ in listing.candidates]
    # Threads suffice: Pillow's decoders and hashlib release the GIL.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(tqdm(pool.map(lambda p: _check_image(root / p), paths), total=len(paths),
                            desc="prepare: checking images", unit="img"))
    usable = []
    for (path, label, split), (sha256, reason) in zip(listing.candidates, results):
        if reason is None:
            usable.append((path, label, split, sha256))
        else:
            listing.reject(path, reason)
    listing.rejected.sort(key=lambda r: (r["path"], r["reason"]))
    return usable


def _require_images_per_class(listing: Listing, usable, shown: str, out_dir: Path) -> None:
    """Each class folder needs MIN_IMAGES_PER_CLASS usable images; rejected.json tells why not."""
    counts = Counter(label for _, label, _, _ in usable)
    for label in listing.classes:
        if counts[label] >= MIN_IMAGES_PER_CLASS:
            continue
        _write_rejected(out_dir, listing.rejected)
        n_rejected = sum(r["path"].startswith(f"{label}/") for r in listing.rejected)
        found = "no usable image" if counts[label] == 0 else f"only {counts[label]} usable image"
        raise PipelineError(
            f"class folder {join(shown, label)} has {found} ({plural(n_rejected, 'file')} "
            f"rejected: see "
            f"{out_dir / 'rejected.json'}); each class needs at least {MIN_IMAGES_PER_CLASS} "
            f"(one to train on, one to test on): remove the folder or add images")


def _stratified_split(usable, test_fraction: float, seed: int):
    """Hold out ``test_fraction`` of each class as the test split (see :func:`stratified_holdout`)."""
    test = stratified_holdout([r[0] for r in usable], [r[1] for r in usable], test_fraction, seed)
    return [(path, label, "test" if t else "train", sha256)
            for (path, label, _, sha256), t in zip(usable, test)]


# --------------------------------------------------------------------------- writing


def _write_rejected(out_dir: Path, rejected: list[dict]) -> None:
    # dataset.json is written last and marks a complete output: remove it first.
    (out_dir / "dataset.json").unlink(missing_ok=True)
    write_json(out_dir / "rejected.json", rejected)
