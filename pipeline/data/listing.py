"""Listing a dataset's files before their content is checked.

A source's layout (a folder of ``<class>/<image>``, or the Oxford-IIIT Pet
annotation lists) becomes a :class:`Listing`: candidate images with their
label (and split, where the source has one), and the files already known to be
unusable, each with a reason. Odd entries (links out of the folder, FIFOs,
names that are not UTF-8, nested folders) are rejected here, never followed.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.images import IMAGE_EXTENSIONS
from pipeline.errors import PipelineError

LAYOUT = "expected <class>/<image>"


@dataclass
class Listing:
    """A dataset's files before their content is checked.

    ``candidates`` holds ``(path, label, split)``; ``split`` is None where it is
    still to be drawn. ``rejected`` holds files already known to be unusable.
    """

    classes: list[str] = field(default_factory=list)
    candidates: list[tuple[str, str, str | None]] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def reject(self, path: str, reason: str) -> None:
        self.rejected.append({"path": _shown(path), "reason": reason})






def _utf8(name: str) -> bool:
    """False for names Python decoded with surrogate escapes (invalid UTF-8 bytes)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def join(shown: str, name: str) -> str:
    """``shown/name`` for messages, without doubling a trailing slash of ``shown``."""
    return f"{shown.rstrip('/')}/{name}"


def plural(n: int, word: str) -> str:
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


def _reject_tree(listing: Listing, root: Path, rel: str, reason: str) -> None:
    """Reject every file under the folder ``root/rel``."""
    for folder, dirs, files in os.walk(root / rel):
        dirs.sort()
        for name in sorted(files):
            listing.reject(Path(folder, name).relative_to(root).as_posix(), reason)


def list_class_folders(root: Path, shown: str) -> Listing:
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
        raise PipelineError(f"data folder {shown} is a file, not a folder; {LAYOUT}")
    listing = Listing()
    for entry in _scandir(root, shown):
        kind = _accept_entry(listing, root, entry, entry.name)
        if kind == "dir":
            listing.classes.append(entry.name)
            _list_class(listing, root, entry.name, join(shown, entry.name))
        elif kind == "file":
            listing.reject(entry.name, f"not in a class folder ({LAYOUT})")
        elif kind == "other":
            listing.reject(entry.name, _special_reason(entry, "not a regular file or folder"))

    if not listing.classes:
        raise PipelineError(f"data folder {shown} has no class subfolders; {LAYOUT}, "
                            f"e.g. {join(shown, 'cat/001.jpg')}")
    if len(listing.classes) == 1:
        raise PipelineError(f"data folder {shown} has a single class folder "
                            f"({listing.classes[0]}); a classifier needs at least 2: add a "
                            f"folder of images per class")
    return listing


def _accept_entry(listing: Listing, root: Path, entry: os.DirEntry, rel: str) -> str | None:
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


def _list_class(listing: Listing, root: Path, label: str, shown: str) -> None:
    for entry in _scandir(root / label, shown):
        rel = f"{label}/{entry.name}"
        kind = _accept_entry(listing, root, entry, rel)
        if kind == "dir":
            _reject_tree(listing, root, rel, f"in a subfolder of class folder '{label}' "
                                             f"({LAYOUT}; subfolders are not read)")
        elif kind == "other":
            listing.reject(rel, _special_reason(entry, "not a regular file"))
        elif kind == "file":
            if reason := _not_image_reason(entry.name):
                listing.reject(rel, reason)
            else:
                listing.candidates.append((rel, label, None))


def list_oxford(root: Path) -> Listing:
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

    listing = Listing(classes=labels)
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

