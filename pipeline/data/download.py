"""Fetching dataset archives and unpacking them safely.

Two promises, so that a later run can trust what it finds on disk:

* a file at a download's destination has been checked (its checksum, or at
  least its full length): bytes arrive in ``<dest>.part`` and are renamed into
  place only once verified;
* an archive's members never land outside the target folder, and an
  interrupted extraction is never mistaken for a complete one: members are
  unpacked into a temporary sibling folder, moved into place, and a marker
  naming the archive is written last.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PureWindowsPath

from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.fileio import write_json

#: Seconds without a byte from the server before a download is given up.
TIMEOUT_S = 30

_CHUNK = 1 << 20
# Python before 3.10.12 has no extraction filters: our own checks then stand alone.
_DATA_FILTER = getattr(tarfile, "data_filter", None)
_FILTER_ERROR = getattr(tarfile, "FilterError", ())
_USER_AGENT = "transfer-pipeline (python urllib)"


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (archives are large)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str | os.PathLike, *, md5: str | None = None,
             sha256: str | None = None, desc: str | None = None) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is already there.

    Bytes are streamed to ``<dest>.part``; a leftover ``.part`` from an
    interrupted run is resumed with an HTTP Range request when the server
    allows it. The checksums given are verified before the file is renamed to
    ``dest``, so ``dest`` only ever holds a verified file. Without a checksum,
    the received length must match the server's Content-Length.

    Args:
        url: an ``http(s)://`` or ``file://`` URL.
        dest: where the file goes.
        md5, sha256: expected hex digests; either, both or neither.
        desc: label of the progress bar (default: the file name).

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        PipelineError: the network failed, or the checksum did not match (the
            partial file is then deleted).

    Example:
        >>> download("https://example.org/a.tar.gz", "data/raw/a.tar.gz",
        ...          md5="5c4f3ee8e5d25df40f4fd59a7f44e54c")  # doctest: +SKIP
    """
    dest = Path(dest)
    expected = {name: value.strip().lower()
                for name, value in (("md5", md5), ("sha256", sha256)) if value}
    if dest.is_file():
        if not expected:
            print(f"download: {dest} already present (no checksum to check it against), skipping",
                  flush=True)
            return dest
        if _digests(dest, expected) == expected:
            print(f"download: {dest} already present and verified, skipping", flush=True)
            return dest
        # Left in place until a verified copy replaces it.
        print(f"download: {dest} does not match its checksum; downloading it again", flush=True)

    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(dest.parent, e) from None
    hashers = {name: hashlib.new(name) for name in expected}
    _fetch(url, part, dest, hashers, desc or dest.name)

    for name, want in expected.items():
        found = hashers[name].hexdigest()
        if found != want:
            part.unlink(missing_ok=True)
            raise PipelineError(
                f"{name} checksum mismatch for {url}: expected {want}, found {found}; the download "
                f"was corrupt or the file changed upstream; it was deleted: run again to retry, "
                f"or update the expected checksum if the new file is legitimate"
            )
    os.replace(part, dest)
    return dest


def _digests(path: Path, expected: dict[str, str]) -> dict[str, str]:
    return {name: file_digest(path, name) for name in expected}


def _fetch(url: str, part: Path, dest: Path, hashers: dict, desc: str) -> None:
    """Stream ``url`` into ``part``, resuming it when the server honours Range."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            # "Range not satisfiable": the .part is as long as the file or longer,
            # so it cannot be a prefix we can trust. Start over.
            part.unlink()
            return _fetch(url, part, dest, hashers, desc)
        raise _network_error(url, dest, f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise _network_error(url, dest, e) from None

    with response:
        # file:// responses have no status; a server that ignores Range answers
        # 200 with the whole file. Either way the .part is rewritten from byte 0.
        resumed = (offset > 0 and getattr(response, "status", None) == 206
                   and _content_range_start(response) == offset)
        if resumed:
            print(f"download: resuming {part} at {offset:,} bytes", flush=True)
            with open(part, "rb") as f:
                while chunk := f.read(_CHUNK):
                    for h in hashers.values():
                        h.update(chunk)
        else:
            offset = 0
            print(f"download: {url} -> {dest}", flush=True)
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        received = 0
        try:
            f = open(part, "ab" if resumed else "wb")
        except OSError as e:
            raise _write_error(part, e) from None
        with f, tqdm(total=None if length is None else offset + length, initial=offset,
                     unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    # The .part is kept: the next run resumes from here.
                    raise _network_error(url, dest, e) from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:
                    raise _write_error(part, e) from None
                for h in hashers.values():
                    h.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if length is not None and received != length:
        raise _network_error(url, dest, f"connection closed after {offset + received:,} of "
                                        f"{offset + length:,} bytes")


def _content_range_start(response) -> int | None:
    """First byte of a 206 response, from ``Content-Range: bytes START-END/TOTAL``."""
    value = response.headers.get("Content-Range", "")
    unit, _, spec = value.partition(" ")
    start = spec.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _network_error(url: str, dest: Path, reason) -> PipelineError:
    if isinstance(reason, urllib.error.URLError) and not isinstance(reason, urllib.error.HTTPError):
        reason = reason.reason
    if isinstance(reason, OSError) and reason.strerror:
        reason = reason.strerror
    reason = " ".join(str(reason).split()) or type(reason).__name__
    return PipelineError(f"could not download {url} ({reason}); check your network, "
                         f"or download it yourself and place it at {dest}")


def _write_error(path: Path, e: OSError) -> PipelineError:
    return PipelineError(f"cannot write {path}: {e.strerror or e}; free some space or "
                         f"choose another download folder (data.download_dir)")


# --------------------------------------------------------------------------- extraction


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
