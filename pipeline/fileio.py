"""Writing outputs so that a later stage never reads a half-written file.

Every output is written to a temporary file beside its final path and renamed
into place only when complete; ``os.replace`` is atomic on one filesystem.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from pipeline.errors import PipelineError


def _os_error(path, e: OSError) -> PipelineError:
    what = {
        errno.ENOSPC: "no space left on device",
        errno.EACCES: "permission denied",
        errno.EROFS: "read-only file system",
        errno.EPERM: "operation not permitted",
    }.get(e.errno, e.strerror or str(e))
    return PipelineError(f"cannot write {path}: {what}; free space or choose a writable folder")


def _errno_of(e: BaseException) -> int | None:
    """The OS error behind ``e``, also where HDF5 reports it only inside a RuntimeError."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    if isinstance(e, (OSError, RuntimeError)):
        m = re.search(r"errno = (\d+)", str(e))
        if m and int(m.group(1)):
            return int(m.group(1))
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", durable: bool = False):
    """Yield a temporary path next to ``path``; move it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    ``durable``: the file's bytes, then the rename, reach the disk before this
    returns (fsync of the file and of its folder), so that a power cut or a
    kill right after cannot leave a name pointing at a torn file.

    Example:
        >>> with atomic_path("out.h5") as tmp:  # doctest: +SKIP
        ...     write_everything(tmp)
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _os_error(path, e) from None
    tmp = Path(tmp)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        code = _errno_of(e)
        if code is not None:
            raise _os_error(path, OSError(code, os.strerror(code))) from None
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, wait: bool = True):
    """Hold an exclusive lock on the file ``path`` (made if missing); yields whether it was taken.

    ``wait`` False: yield False at once when another process holds it. POSIX
    only; elsewhere no lock is taken (yields True), and the atomic rename of
    :func:`atomic_path` still keeps every file whole.
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike, prefix: str) -> None:
    """Delete temporaries that an interrupted :func:`atomic_path` left in ``folder``.

    A killed process (SIGKILL, power loss) cannot clean up after itself; its
    temporaries are named ``.<prefix>...tmp``, which no reader opens, and the
    next writer of the same files removes them.
    """
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.glob(f".{prefix}*.tmp"):
            tmp.unlink(missing_ok=True)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (archives and weights are large)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(path, header: list[str], rows) -> None:
    """Write rows under a header as CSV, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)


def read_json(path, what: str):
    """Read a JSON file that an earlier stage wrote; ``what`` names it in errors."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} not found at {path}; run the earlier stages first (dvc repro)")
    return json.loads(path.read_text(encoding="utf-8"))


def file_stem(name: str) -> str:
    """A flat, safe file name for a backbone name (feature caches, store folders, reports).

    ``timm/convnext_tiny.fb_in22k_ft_in1k`` -> ``timm--convnext_tiny.fb_in22k_ft_in1k``.
    Registry names hold only letters, digits, ``_ . - /``; the slash becomes
    ``--`` (no registry name contains ``--``, so two names never share a stem)
    and anything else unexpected becomes ``_``.
    """
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "--").replace("\\", "--"))
    return stem.lstrip(".") or "_"
