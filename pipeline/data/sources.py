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
    (their number), and ``archive_sha256`` for cats-vs-dogs. Written last: it
    is present only when the other three are complete.

Every image is checked with :func:`pipeline.data.images.load_rgb`, the same decoder
feature extraction uses, so a file that passes here decodes there. Nothing in
the user's folders is ever written, moved or deleted.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from tqdm import tqdm

from pipeline.data.download import download, file_digest, safe_extract
from pipeline.data.images import IMAGE_EXTENSIONS, load_rgb
from pipeline.data.manifest import MANIFEST_HEADER, stratified_holdout
from pipeline.config import SOURCES, check_split_params
from pipeline.errors import BadImage, PipelineError
from pipeline.fileio import write_csv, write_json


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

_LAYOUT = "expected <class>/<image>"


@dataclass
class _Listing:
    """A dataset's files before their content is checked.

    ``candidates`` holds ``(path, label, split)``; ``split`` is None where it is
    still to be drawn. ``rejected`` holds files already known to be unusable.
    """

    classes: list[str] = field(default_factory=list)
    candidates: list[tuple[str, str, str | None]] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def reject(self, path: str, reason: str) -> None:
        self.rejected.append({"path": _shown(path), "reason": reason})


def prepare(*, source: str, out_dir, folder=None, download_dir="data/raw", test_fraction=0.2,
            seed=0, oxford_base_url=OXFORD_BASE_URL, oxford_md5=OXFORD_MD5,
            catsdogs_url=CATSDOGS_URL, catsdogs_sha256=None) -> dict:
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

    Returns:
        The contents of dataset.json.

    Raises:
        PipelineError: unknown source, bad parameter, missing folder, a class
            with fewer than 2 usable images, a failed download or checksum.

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
        listing = _list_class_folders(root, shown)
    elif source == "cats-vs-dogs":
        root, extra["archive_sha256"] = _fetch_cats_vs_dogs(
            Path(download_dir), catsdogs_url, catsdogs_sha256)
        shown = root.as_posix()
        listing = _list_class_folders(root, shown)
    elif source == "oxford-iiit-pet":
        root = _fetch_oxford(Path(download_dir), oxford_base_url, oxford_md5)
        shown = root.as_posix()
        listing = _list_oxford(root)
    else:
        raise PipelineError(f"unknown data.source '{source}'; accepted: {', '.join(SOURCES)}")

    print(f"prepare: {source} {shown}: {len(listing.classes)} classes, "
          f"checking {len(listing.candidates)} images", flush=True)
    usable = _check_candidates(root, listing)
    if source != "oxford-iiit-pet":  # the others have no official split: draw one
        _require_images_per_class(listing, usable, shown, out_dir)
        usable = _stratified_split(usable, test_fraction, seed)

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
        print(f"prepare: {_plural(len(listing.rejected), 'file')} rejected; reasons in "
              f"{out_dir / 'rejected.json'}", flush=True)
    return info


# --------------------------------------------------------------------------- parameters


# --------------------------------------------------------------------------- listing files


def _utf8(name: str) -> bool:
    """False for names Python decoded with surrogate escapes (invalid UTF-8 bytes)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _join(shown: str, name: str) -> str:
    """``shown/name`` for messages, without doubling a trailing slash of ``shown``."""
    return f"{shown.rstrip('/')}/{name}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _shown(path: str) -> str:
    """A path that JSON can hold, the bytes of non-UTF-8 names written as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _not_image_reason(name: str) -> str | None:
    ext = os.path.splitext(name)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return None
    return f"not an image file (extension {ext})" if ext else "not an image file (no extension)"


def _scandir(folder: Path, shown: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise PipelineError(f"cannot read folder {shown}: {e.strerror}; check its "
                            f"permissions") from None


def _reject_tree(listing: _Listing, root: Path, rel: str, reason: str) -> None:
    """Reject every file under the folder ``root/rel``."""
    for folder, dirs, files in os.walk(root / rel):
        dirs.sort()
        for name in sorted(files):
            listing.reject(Path(folder, name).relative_to(root).as_posix(), reason)


def _list_class_folders(root: Path, shown: str) -> _Listing:
    """List ``root/<class>/<image>`` files; everything else is rejected with a reason.

    Hidden entries (names starting with '.') are rejected, not read: a hidden
    folder gives one entry for the folder, not one per file inside it.
    Subfolders of a class folder are not read either (their files are
    rejected): a root given one level too high (``data/`` holding ``train/``
    and ``test/``) then fails loudly instead of training on the wrong classes.
    """
    if not root.exists():
        raise PipelineError(f"data folder {shown} not found (looked for {root.absolute()}); "
                            f"set data.folder in params.yaml to a folder of images laid out "
                            f"as <class>/<image>")
    if not root.is_dir():
        raise PipelineError(f"data folder {shown} is a file, not a folder; {_LAYOUT}")
    listing = _Listing()
    for entry in _scandir(root, shown):
        kind = _accept_entry(listing, root, entry, entry.name)
        if kind == "dir":
            listing.classes.append(entry.name)
            _list_class(listing, root, entry.name, _join(shown, entry.name))
        elif kind == "file":
            listing.reject(entry.name, f"not in a class folder ({_LAYOUT})")
        elif kind == "other":
            listing.reject(entry.name, _special_reason(entry, "not a regular file or folder"))

    if not listing.classes:
        raise PipelineError(f"data folder {shown} has no class subfolders; {_LAYOUT}, "
                            f"e.g. {_join(shown, 'cat/001.jpg')}")
    if len(listing.classes) == 1:
        raise PipelineError(f"data folder {shown} has a single class folder "
                            f"({listing.classes[0]}); a classifier needs at least 2: add a "
                            f"folder of images per class")
    return listing


def _accept_entry(listing: _Listing, root: Path, entry: os.DirEntry, rel: str) -> str | None:
    """What an entry is, following symbolic links: "dir", "file" or "other".

    None when the entry is rejected here: hidden, a non-UTF-8 name, or a link
    that cannot be followed (a loop of links, a folder without permission).
    Symbolic links to files and folders are followed, as for any folder of
    photos; the manifest keeps the link's own path.
    """
    try:
        kind = "dir" if entry.is_dir() else "file" if entry.is_file() else "other"
        error = None
    except OSError as e:  # DirEntry.is_dir/is_file let through all but "not found"
        kind, error = None, e
    if entry.name.startswith("."):
        listing.reject(rel, "hidden folder (name starts with '.'), not read" if kind == "dir"
                       else "hidden file (name starts with '.')")
        return None
    if not _utf8(entry.name):
        if kind == "dir":
            _reject_tree(listing, root, rel, "folder name is not valid UTF-8 (rename the folder "
                                             "to use its files)")
        else:
            listing.reject(rel, "file name is not valid UTF-8 (rename the file to use it)")
        return None
    if error is not None:
        why = error.strerror or str(error)
        listing.reject(rel, f"symbolic link that cannot be followed ({why})"
                       if _is_link(entry) else f"cannot be read ({why})")
        return None
    return kind


def _is_link(entry: os.DirEntry) -> bool:
    try:
        return entry.is_symlink()
    except OSError:
        return False


def _special_reason(entry: os.DirEntry, what: str) -> str:
    """Why an entry that is neither a file nor a folder is rejected."""
    if _is_link(entry) and not os.path.exists(entry.path):
        try:
            return f"broken symbolic link (to {_shown(os.readlink(entry.path))})"
        except OSError:
            return "broken symbolic link"
    return f"{what} (a FIFO, a socket, a device, ...)"


def _list_class(listing: _Listing, root: Path, label: str, shown: str) -> None:
    for entry in _scandir(root / label, shown):
        rel = f"{label}/{entry.name}"
        kind = _accept_entry(listing, root, entry, rel)
        if kind == "dir":
            _reject_tree(listing, root, rel, f"in a subfolder of class folder '{label}' "
                                             f"({_LAYOUT}; subfolders are not read)")
        elif kind == "other":
            listing.reject(rel, _special_reason(entry, "not a regular file"))
        elif kind == "file":
            if reason := _not_image_reason(entry.name):
                listing.reject(rel, reason)
            else:
                listing.candidates.append((rel, label, None))


def _list_oxford(root: Path) -> _Listing:
    """List the images named in the official trainval/test lists.

    The lists' lines read ``Abyssinian_100 1 1 1``: image name, class id
    (1..37), species, breed id. The class name is the image name without its
    trailing ``_<number>``; classes are ordered by id.
    """
    redo = f"delete {root} and run again to extract the archives anew"
    names: dict[int, str] = {}  # class id -> class name
    listed: dict[str, tuple[str, str]] = {}  # path -> (label, split)
    conflicts: set[str] = set()
    for list_name, split in (("trainval.txt", "train"), ("test.txt", "test")):
        list_path = root / "annotations" / list_name
        try:
            lines = list_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise PipelineError(f"cannot read the official list {list_path} "
                                f"({getattr(e, 'strerror', None) or e}); {redo}") from None
        for n, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) < 2 or not fields[1].isdigit():
                raise PipelineError(f"{list_path}:{n}: expected 'name class_id species "
                                    f"breed_id', found '{line.strip()}'; {redo}")
            name, class_id = fields[0], int(fields[1])
            label = re.sub(r"_\d+$", "", name)
            if names.setdefault(class_id, label) != label:
                raise PipelineError(f"{list_path}:{n}: class id {class_id} is given to both "
                                    f"'{names[class_id]}' and '{label}'; {redo}")
            path = f"images/{name}.jpg"
            if listed.get(path, (label, split))[1] != split:
                conflicts.add(path)
            listed[path] = (label, split)

    labels = [names[i] for i in sorted(names)]
    if len(set(labels)) != len(labels):
        twice = sorted(label for label, k in Counter(labels).items() if k > 1)
        raise PipelineError(f"{root / 'annotations'}: class {twice[0]} has several class ids; "
                            f"{redo}")
    images = root / "images"
    if not images.is_dir():
        raise PipelineError(f"{images} not found; the images archive is incomplete; {redo}")

    listing = _Listing(classes=labels)
    found = set()
    for folder, dirs, files in os.walk(images):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder, name).relative_to(root).as_posix()
            found.add(path)
            if not _utf8(path):
                listing.reject(path, "file name is not valid UTF-8")
            elif path in conflicts:
                listing.reject(path, "listed in both trainval.txt and test.txt")
            elif path in listed:
                listing.candidates.append((path, *listed[path]))
            else:
                listing.reject(path, "not in the official trainval/test lists")
    for path in sorted(listed.keys() - found):
        listing.reject(path, "listed in the official trainval/test lists, but the file is "
                             "missing")
    return listing


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


def _check_candidates(root: Path, listing: _Listing) -> list[tuple[str, str, str | None, str]]:
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


def _require_images_per_class(listing: _Listing, usable, shown: str, out_dir: Path) -> None:
    """Each class folder needs MIN_IMAGES_PER_CLASS usable images; rejected.json tells why not."""
    counts = Counter(label for _, label, _, _ in usable)
    for label in listing.classes:
        if counts[label] >= MIN_IMAGES_PER_CLASS:
            continue
        _write_rejected(out_dir, listing.rejected)
        n_rejected = sum(r["path"].startswith(f"{label}/") for r in listing.rejected)
        found = "no usable image" if counts[label] == 0 else f"only {counts[label]} usable image"
        raise PipelineError(
            f"class folder {_join(shown, label)} has {found} ({_plural(n_rejected, 'file')} "
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
