"""Fetching dataset files over HTTP, resumably, and checking their bytes.

The promise, so that a later run can trust what it finds on disk: a file at a
download's destination has been checked (its checksum, or at least its full
length). Bytes arrive in ``<dest>.part`` and are renamed into place only once
verified; an interrupted download is resumed from its ``.part``. Unpacking
what was downloaded is :mod:`pipeline.data.archives`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.fileio import file_digest

#: Seconds without a byte from the server before a download is given up.
TIMEOUT_S = 30

_CHUNK = 1 << 20
_USER_AGENT = "transfer-pipeline (python urllib)"


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
