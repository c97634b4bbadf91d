"""Test helpers: tiny images, broken files, archives, and a local HTTP server.

Imported by tests/test_datasets.py and tests/test_download.py; everything runs
offline, on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(200, 30, 30), (30, 160, 60), (40, 60, 210), (230, 200, 40), (120, 40, 160)]


def image_bytes(i: int = 0, *, fmt: str = "JPEG", size=(64, 48)) -> bytes:
    """A small image: a solid colour plus seeded noise, so every ``i`` differs."""
    rng = np.random.default_rng(i)
    base = np.array(COLOURS[i % len(COLOURS)], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-20, 21, (size[1], size[0], 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buf, fmt)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    """A JPEG cut in the middle of its scan data."""
    data = image_bytes(99, size=(64, 64))
    return data[: len(data) // 2]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_class_folder(root: Path, counts: dict[str, int], *, fmt: str = "JPEG") -> Path:
    """``root/<class>/<i>.jpg`` (or .png) with ``counts[class]`` images each."""
    ext = ".png" if fmt == "PNG" else ".jpg"
    for c, (label, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            write(root / label / f"{i:03d}{ext}", image_bytes(100 * c + i, fmt=fmt))
    return root


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    """A .tar or .tar.gz (by extension) holding ``files`` as regular members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


class _Handler(BaseHTTPRequestHandler):
    """Serves files from ``server.directory``; honours ``Range: bytes=N-`` if asked to.

    With ``server.cut_at`` set, the connection closes after that byte of the file.
    """

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.requests.append((self.path, self.headers.get("Range")))
        path = self.server.directory / self.path.lstrip("/").split("?")[0]
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        start = 0
        wanted = self.headers.get("Range", "")
        if self.server.ranges and wanted.startswith("bytes=") and wanted.endswith("-"):
            start = int(wanted[len("bytes="):-1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if self.server.cut_at is not None:  # a connection lost mid-way
            self.wfile.write(data[start:self.server.cut_at])
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def log_message(self, *args):  # keep test output quiet
        pass


@contextlib.contextmanager
def http_server(directory: Path, *, ranges: bool = True):
    """Serve ``directory`` on 127.0.0.1; yields the server.

    The server has ``.url``, ``.requests`` (``(path, Range header)`` of each
    GET) and ``.cut_at`` (set it to lose the connection after that byte).
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.directory = Path(directory)
    server.ranges = ranges
    server.requests = []
    server.cut_at = None
    server.url = f"http://127.0.0.1:{server.server_address[1]}/"
    # A short poll keeps shutdown() quick: tests start many servers.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x"
