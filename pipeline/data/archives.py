"""Unpacking dataset archives (.zip, .tar, .tar.gz, .tgz) safely.

The promise, so that a later run can trust what it finds on disk: an
archive's members never land outside the target folder, and an interrupted
extraction is never mistaken for a complete one. Members are unpacked into a
temporary sibling folder, moved into place, and a marker naming the archive is
written last. Fetching the archives is :mod:`pipeline.data.download`.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PureWindowsPath

from tqdm import tqdm

from pipeline.data.download import _write_error
from pipeline.errors import PipelineError
from pipeline.fileio import write_json

# Python before 3.10.12 has no extraction filters: our own checks then stand alone.
_DATA_FILTER = getattr(tarfile, "data_filter", None)
_FILTER_ERROR = getattr(tarfile, "FilterError", ())


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Unpack a .zip, .tar, .tar.gz or .tgz archive into ``target``, refusing unsafe members.

    Refused, before anything reaches ``target``: absolute paths, paths that
    climb out of it with ``..``, symbolic or hard links that point outside it,
    and device files, FIFOs and other special files. Zip archives are
    CRC-checked first.

    Several archives may share one target (each top-level entry of an archive
    replaces the same entry in ``target``). A hidden marker
    ``.<archive name>.extracted.json`` records the archive's size and
    modification time; it is written last, and when it matches the archive the
    extraction is skipped.

    Returns:
        ``target`` as a :class:`~pathlib.Path`.

    Raises:
        PipelineError: the archive is corrupt, of an unknown kind, or holds an
            unsafe member (the message names it); ``target`` is then unchanged.

    Example:
        >>> safe_extract("data/raw/images.tar.gz", "data/raw/oxford-iiit-pet")  # doctest: +SKIP
    """
    archive, target = Path(archive), Path(target)
    try:
        st = archive.stat()
    except OSError as e:
        raise PipelineError(f"cannot read archive {archive}: {e.strerror}; download it again") from None
    stamp = {"archive": archive.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    marker = target / f".{archive.name}.extracted.json"
    if _read_marker(marker) == stamp:
        print(f"extract: {archive.name} already extracted in {target}, skipping", flush=True)
        return target

    name = archive.name.lower()
    if name.endswith(".zip"):
        extract = _extract_zip
    elif name.endswith((".tar", ".tar.gz", ".tgz")):
        extract = _extract_tar
    else:
        raise PipelineError(f"cannot extract {archive}: expected a .zip, .tar, .tar.gz or .tgz "
                            f"file; found the extension {archive.suffix or '(none)'}")

    print(f"extract: {archive} -> {target}", flush=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of interrupted runs: never complete, only taking space.
        for stale in target.parent.glob(f".{target.name}.extracting-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extracting-", dir=target.parent))
    except OSError as e:
        raise _write_error(target.parent, e) from None
    try:
        extract(archive, tmp)
        _check_links_inside(archive, tmp)
        target.mkdir(exist_ok=True)
        # From the first replaced entry on, the old extraction is incomplete.
        marker.unlink(missing_ok=True)
        for entry in sorted(tmp.iterdir()):
            _remove(target / entry.name)
            os.replace(entry, target / entry.name)
        write_json(marker, stamp)
    except OSError as e:
        raise _write_error(target, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _read_marker(marker: Path):
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _refuse(archive: Path, member: str, why: str) -> PipelineError:
    return PipelineError(f"refusing to extract {archive}: member '{member}' {why}; "
                         f"the archive is corrupt or malicious: delete it and download it again")


def _corrupt(archive: Path, e: BaseException) -> PipelineError:
    reason = " ".join(str(e).split()) or type(e).__name__
    return PipelineError(f"archive {archive} is corrupt or incomplete ({reason}); "
                         f"delete it and run again to download it anew")


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _member_dest(archive: Path, root: str, name: str) -> str:
    """Where member ``name`` lands under ``root``; refuses names that leave it."""
    if (not name or name.startswith(("/", "\\")) or os.path.isabs(name)
            or PureWindowsPath(name).drive):
        raise _refuse(archive, name, "has an absolute path")
    dest = os.path.normpath(os.path.join(root, name))
    if not _inside(dest, root):
        raise _refuse(archive, name, "has a path that leads outside the target folder")
    return dest


def _check_link(archive: Path, root: str, member: str, link_from: str, link: str,
                kind: str, *, real: bool) -> None:
    """Refuse a link whose target is outside ``root``.

    ``link_from`` is the folder ``link`` is relative to. With ``real``, links
    already extracted are followed too (a chain of links that are each inside
    can still lead out, e.g. ``a -> .`` then ``b -> a/..``).
    """
    if os.path.isabs(link) or PureWindowsPath(link).drive:
        raise _refuse(archive, member, f"is a {kind} to the absolute path {link}")
    resolved = os.path.join(link_from, link)
    # Not normpath before realpath: "s/.." is not "." when s is a link.
    resolved = os.path.realpath(resolved) if real else os.path.normpath(resolved)
    if not _inside(resolved, os.path.realpath(root) if real else root):
        raise _refuse(archive, member, f"is a {kind} to {link}, outside the target folder")


def _check_tar_member(archive: Path, root: str, m: tarfile.TarInfo, *, real: bool) -> None:
    dest = _member_dest(archive, root, m.name)
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        raise _refuse(archive, m.name, "is a device file, FIFO or other special file")
    if real and not _inside(os.path.realpath(os.path.join(root, m.name)), os.path.realpath(root)):
        raise _refuse(archive, m.name, "would be written through a link that leads outside "
                                       "the target folder")
    if m.issym():
        _check_link(archive, root, m.name, os.path.dirname(dest), m.linkname, "symbolic link",
                    real=real)
    elif m.islnk():
        # A tar hard link names its target from the archive's root.
        _check_link(archive, root, m.name, root, m.linkname, "hard link", real=real)


def _extract_tar(archive: Path, tmp: Path) -> None:
    root = str(tmp)
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            # Every name is checked before anything is written...
            for m in members:
                _check_tar_member(archive, root, m, real=False)

            # ...and again as each is extracted, following the links extracted so far.
            def check(m: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
                _check_tar_member(archive, root, m, real=True)
                return _DATA_FILTER(m, path) if _DATA_FILTER else m

            bar = tqdm(members, desc=f"extract {archive.name}", unit="file")
            if _DATA_FILTER:
                tf.extractall(tmp, members=bar, filter=check)
            else:  # Python without extraction filters (before 3.10.12): same checks, by hand
                for m in bar:
                    tf.extract(check(m, root), tmp)
    except _FILTER_ERROR as e:
        member = getattr(getattr(e, "tarinfo", None), "name", "?")
        raise _refuse(archive, member, f"is unsafe ({e})") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _corrupt(archive, e) from None


def _extract_zip(archive: Path, tmp: Path) -> None:
    root = str(tmp)
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise _corrupt(archive, f"bad CRC in member '{bad}'")
            infos = zf.infolist()
            for info in infos:
                dest = _member_dest(archive, root, info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    # zipfile writes links as small files holding the target; they
                    # are refused anyway when they point outside.
                    link = zf.read(info).decode("utf-8", "replace")
                    _check_link(archive, root, info.filename, os.path.dirname(dest), link,
                                "symbolic link", real=False)
                elif stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise _refuse(archive, info.filename,
                                  "is a device file, FIFO or other special file")
            for info in tqdm(infos, desc=f"extract {archive.name}", unit="file"):
                zf.extract(info, tmp)
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as e:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression.
        raise _corrupt(archive, e) from None


def _check_links_inside(archive: Path, tmp: Path) -> None:
    """Final pass: every link in the extracted tree resolves inside it."""
    root = os.path.realpath(tmp)
    for folder, dirs, files in os.walk(tmp):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not _inside(os.path.realpath(path), root):
                raise _refuse(archive, os.path.relpath(path, tmp),
                              f"is a symbolic link to {os.readlink(path)}, outside the target folder")
