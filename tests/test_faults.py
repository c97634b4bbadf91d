"""Fault injection: the files real photo folders hold, from the decoder to ``dvc repro``.

Three levels, each with exact expectations:

* :func:`pipeline.data.images.load_rgb` on each odd or broken file: good ones give
  upright RGB of the right size and colours, bad ones a :class:`BadImage`
  with a specific reason, the same whether decoded from the path, from bytes
  (as extract does) or at draft scale (as prepare does);
* ``prepare`` over a messy folder whose class folders hold symbolic links to
  the sample photos beside the odd and broken files: every good file is in the
  manifest, every bad one in rejected.json with its reason;
* the real ``dvc repro`` over that folder and over the same folder without the
  bad files: equal metrics, and EXIF-rotated photos upright in the features.

Run on its own with ``python -m pytest -m faults``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers_images import image_bytes, truncated_jpeg
from PIL import Image, PngImagePlugin

import pipeline.data.images as images
from pipeline.data.sources import CHECK_SIZE, prepare
from pipeline.errors import BadImage
from pipeline.data.images import load_rgb

# "faults" is registered in pyproject.toml (markers are strict there).
pytestmark = pytest.mark.faults

T = Image.Transpose

# --------------------------------------------------------------------------- crafting files


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 200, 60), (40, 60, 220), (230, 210, 40)


def upright_pattern(w: int = 48, h: int = 64) -> Image.Image:
    """Four solid quadrants (red, green / blue, yellow): every rotation and flip differs."""
    a = np.empty((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2 :] = RED, GREEN
    a[h // 2 :, : w // 2], a[h // 2 :, w // 2 :] = BLUE, YELLOW
    return Image.fromarray(a, "RGB")


#: How the stored pixels relate to the upright picture, per EXIF 2.3's words for
#: tag 0x0112 ("the 0th row is the visual ..., the 0th column is the visual ...").
#: Written from the standard, not from the code under test.
STORED_FROM_UPRIGHT = {
    1: None,                 # top, left
    2: T.FLIP_LEFT_RIGHT,    # top, right
    3: T.ROTATE_180,         # bottom, right
    4: T.FLIP_TOP_BOTTOM,    # bottom, left
    5: T.TRANSPOSE,          # left, top
    6: T.ROTATE_90,          # right, top: stored turned a quarter counter-clockwise
    7: T.TRANSVERSE,         # right, bottom
    8: T.ROTATE_270,         # left, bottom: stored turned a quarter clockwise
}
#: The manual correction: the inverse of the above.
UPRIGHT_FROM_STORED = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM,
                       5: T.TRANSPOSE, 6: T.ROTATE_270, 7: T.TRANSVERSE, 8: T.ROTATE_90}


def _transpose(im: Image.Image, method) -> Image.Image:
    return im.copy() if method is None else im.transpose(method)


def exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    e[0x010F] = "TestCam"  # Make: the orientation is rarely alone
    return e.tobytes()


def exif_with_malformed_tag(orientation: int) -> bytes:
    """A big-endian EXIF block: a valid orientation beside ImageWidth typed as text.

    Seen in the wild from editors that rewrite tags; Pillow reads it, but its
    ``ImageOps.exif_transpose`` raises ``struct.error`` writing it back.
    """
    ifd = struct.pack(">H", 2)
    ifd += struct.pack(">HHII", 0x0100, 2, 6, 38)                   # ImageWidth, ASCII, at 38
    ifd += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)      # Orientation, SHORT
    ifd += struct.pack(">I", 0)                                     # no next IFD
    return b"Exif\0\0" + b"MM\0*" + struct.pack(">I", 8) + ifd + b"Canon\0"


def exif_rotated(upright: Image.Image, orientation: int, fmt: str = "JPEG", *,
                 exif_block: bytes | None = None) -> bytes:
    """``upright`` stored as a camera would for ``orientation``, with the tag set."""
    stored = _transpose(upright, STORED_FROM_UPRIGHT[orientation])
    kw = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    if fmt == "WEBP":
        kw = {"lossless": True}
    return encode(stored, fmt, exif=exif_block or exif(orientation), **kw)


def grey16(value_or_array, fmt: str = "PNG", *, big_endian: bool = False) -> bytes:
    a = np.asarray(value_or_array, dtype=np.uint16)
    if a.ndim == 0:
        a = np.full((24, 32), a, np.uint16)
    if big_endian:
        return encode(Image.fromarray(a.astype(">u2")), fmt)
    return encode(Image.fromarray(a), fmt)


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming ``width`` x ``height``, with a few bytes of data.

    What a decompression bomb looks like before decoding: tiny on disk, huge in
    memory.
    """
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen size
    return bytes(data)


def animated(fmt: str, colours) -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in colours]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100,
                  loop=0, **kw)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"
#: The start of an OLE2 compound file: what Thumbs.db holds.
OLE2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 504


def pixels(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im, dtype=np.int16)


def close(a: np.ndarray, b: np.ndarray, *, mean: float, peak: float) -> bool:
    if a.shape != b.shape:
        return False
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()) <= mean and int(d.max()) <= peak


def quadrant_centres(a: np.ndarray) -> list[tuple]:
    h, w = a.shape[:2]
    return [tuple(a[y, x]) for y in (h // 4, 3 * h // 4) for x in (w // 4, 3 * w // 4)]


def load_all_ways(path: Path):
    """load_rgb from the path, from bytes (as extract) and at draft scale (as prepare)."""
    out = []
    for kw in ({}, {"data": path.read_bytes()}, {"draft_size": CHECK_SIZE}):
        try:
            out.append(load_rgb(path, **kw))
        except BadImage as e:
            out.append(e.reason)
    return out


# --------------------------------------------------------------------------- (a) load_rgb: EXIF


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg_comes_out_upright(tmp_path, orientation):
    upright = upright_pattern()
    path = tmp_path / f"o{orientation}.jpg"
    path.write_bytes(exif_rotated(upright, orientation))

    got = load_rgb(path)
    assert got.size == upright.size == (48, 64)
    # Pixel for pixel what a manual rotation of the stored (decoded) picture gives...
    with Image.open(path) as stored:
        manual = _transpose(stored.convert("RGB"), UPRIGHT_FROM_STORED[orientation])
    assert np.array_equal(pixels(got), pixels(manual))
    # ...and, within JPEG's loss, the picture the camera saw.
    assert close(pixels(got), pixels(upright), mean=4, peak=80)
    for found, want in zip(quadrant_centres(pixels(got)), (RED, GREEN, BLUE, YELLOW)):
        assert np.abs(np.subtract(found, want)).max() <= 12, (found, want)


@pytest.mark.parametrize("fmt, orientation", [("PNG", 6), ("PNG", 8), ("PNG", 3), ("PNG", 5),
                                              ("TIFF", 6), ("WEBP", 8)])
def test_exif_orientation_lossless_formats_are_exact(tmp_path, fmt, orientation):
    upright = upright_pattern()
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    path.write_bytes(exif_rotated(upright, orientation, fmt))
    with Image.open(path) as raw:
        assert raw.getexif().get(0x0112) == orientation  # the file does carry the tag
    assert np.array_equal(pixels(load_rgb(path)), pixels(upright))


def test_exif_orientation_with_draft_decoding(tmp_path):
    """prepare decodes JPEGs at reduced scale: the rotation still applies."""
    upright = upright_pattern(480, 640)
    path = tmp_path / "big.jpg"
    path.write_bytes(exif_rotated(upright, 6))
    got = load_rgb(path, draft_size=(100, 100))
    assert got.size == (120, 160)  # 1/4 scale, still at least 100 each way; portrait
    small = upright.resize(got.size, Image.Resampling.BOX)
    assert close(pixels(got), pixels(small), mean=6, peak=120)


def test_malformed_exif_tag_beside_orientation(tmp_path):
    """Before: ImageOps.exif_transpose raised struct.error, which stopped prepare."""
    upright = upright_pattern()
    path = tmp_path / "edited.jpg"
    path.write_bytes(exif_rotated(upright, 6, exif_block=exif_with_malformed_tag(6)))
    got = load_rgb(path)
    assert got.size == upright.size
    assert close(pixels(got), pixels(upright), mean=4, peak=80)


def test_exif_orientation_keeps_palette_transparency(tmp_path):
    index = np.zeros((64, 48), np.uint8)
    index[:32, :24] = 1  # top-left quadrant blue, the rest transparent
    upright = _palette([(0, 0, 0), BLUE], index)
    path = tmp_path / "p.png"
    path.write_bytes(encode(upright.transpose(STORED_FROM_UPRIGHT[6]), "PNG", transparency=0,
                            exif=exif(6)))
    a = pixels(load_rgb(path))
    assert a.shape == (64, 48, 3)
    assert (a[:32, :24] == BLUE).all() and (a[32:] == 255).all() and (a[:, 24:] == 255).all()


@pytest.mark.parametrize("block", [b"Exif\0\0" + b"\x13" * 40,        # not TIFF-structured
                                   b"Exif\0\0II*\0\xff\xff\xff\x7f",   # IFD offset past the end
                                   exif(9), exif(0)],                  # no such orientations
                         ids=["garbage", "bad-offset", "orientation-9", "orientation-0"])
def test_unusable_exif_means_as_stored(tmp_path, block):
    stored = upright_pattern(48, 64).transpose(T.ROTATE_90)
    path = tmp_path / "x.jpg"
    path.write_bytes(encode(stored, "JPEG", quality=95, subsampling=0, exif=block))
    got = load_rgb(path)
    assert got.size == stored.size
    assert close(pixels(got), pixels(stored), mean=4, peak=80)


# --------------------------------------------------------------------------- (a) load_rgb: modes


@pytest.mark.parametrize("value, expected", [(0, 0), (200, 1), (32768, 128), (65535, 255)])
@pytest.mark.parametrize("fmt, big_endian", [("PNG", False), ("TIFF", False), ("TIFF", True)],
                         ids=["png", "tiff-le", "tiff-be"])
def test_16bit_grey_keeps_its_brightness(tmp_path, value, expected, fmt, big_endian):
    """Before: a dark 16-bit image (all values <= 255) was read as 8-bit: bright grey."""
    path = tmp_path / f"g.{fmt.lower()}"
    path.write_bytes(grey16(value, fmt, big_endian=big_endian))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16")  # the file really is 16-bit
    a = pixels(load_rgb(path))
    assert a.shape == (24, 32, 3)
    assert np.abs(a - expected).max() <= 1, (value, a[0, 0])


def test_16bit_gradient_keeps_its_detail(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 512).astype(np.uint16), (8, 1))
    path = tmp_path / "ramp.png"
    path.write_bytes(grey16(ramp))
    row = pixels(load_rgb(path))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) == 256


def _palette(colours, index: np.ndarray) -> Image.Image:
    im = Image.fromarray(index.astype(np.uint8), "P")
    im.putpalette([v for c in colours for v in c] + [0] * (768 - 3 * len(colours)))
    return im


HALF = np.zeros((30, 40), np.uint8)
HALF[:, 20:] = 1  # left half index 0, right half index 1


MODE_CASES = [
    ("rgba-transparent.png", encode(Image.new("RGBA", (40, 30), (0, 0, 0, 0)), "PNG"),
     (255, 255, 255), (255, 255, 255)),
    ("rgba-half.png", encode(Image.fromarray(np.concatenate(
        [np.full((30, 20, 4), (200, 30, 30, 255)), np.full((30, 20, 4), (0, 0, 0, 0))],
        axis=1).astype(np.uint8), "RGBA"), "PNG"), (200, 30, 30), (255, 255, 255)),
    ("rgba-semi.png", encode(Image.new("RGBA", (40, 30), (0, 0, 0, 128)), "PNG"),
     (127, 127, 127), (127, 127, 127)),
    ("la-transparent.png", encode(Image.new("LA", (40, 30), (0, 0)), "PNG"),
     (255, 255, 255), (255, 255, 255)),
    ("palette.png", encode(_palette([RED, BLUE], HALF), "PNG"), RED, BLUE),
    ("palette-trns.png", encode(_palette([(0, 0, 0), BLUE], HALF), "PNG", transparency=0),
     (255, 255, 255), BLUE),
    ("palette-trns.gif", encode(_palette([(0, 0, 0), BLUE], HALF), "GIF", transparency=0),
     (255, 255, 255), BLUE),
    ("grey-key.png", encode(Image.fromarray(HALF * 150, "L"), "PNG", transparency=0),
     (255, 255, 255), (150, 150, 150)),
    ("rgb-key.png", encode(_palette([(0, 0, 0), BLUE], HALF).convert("RGB"), "PNG",
                           transparency=(0, 0, 0)), (255, 255, 255), BLUE),
    ("bilevel.png", encode(Image.fromarray(HALF.astype(bool)), "PNG"), (0, 0, 0),
     (255, 255, 255)),
    ("grey.jpg", encode(Image.new("L", (40, 30), 90), "JPEG", quality=95), (90, 90, 90),
     (90, 90, 90)),
    ("png-named.jpg", encode(_palette([RED, BLUE], HALF).convert("RGB"), "PNG"), RED, BLUE),
]


@pytest.mark.parametrize("name, data, left, right", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_modes_convert_to_rgb_on_white(tmp_path, name, data, left, right):
    """Before: a colour-key transparency (grey-key, rgb-key) came out black, not white."""
    path = tmp_path / name
    path.write_bytes(data)
    a = pixels(load_rgb(path))
    assert a.shape == (30, 40, 3)
    assert np.abs(a[:, :18] - left).max() <= 2, a[0, 0]
    assert np.abs(a[:, 22:] - right).max() <= 2, a[0, -1]


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
@pytest.mark.parametrize("cmyk, rgb", [
    ((0, 255, 255, 0), (255, 0, 0)), ((255, 0, 0, 0), (0, 255, 255)),
    ((0, 0, 255, 0), (255, 255, 0)), ((0, 0, 0, 0), (255, 255, 255)),
    ((0, 0, 0, 255), (0, 0, 0)), ((0, 0, 0, 128), (127, 127, 127)),
])
def test_cmyk(tmp_path, fmt, cmyk, rgb):
    path = tmp_path / f"c.{fmt.lower()}"
    path.write_bytes(encode(Image.new("CMYK", (40, 30), cmyk), fmt,
                            **({"quality": 95} if fmt == "JPEG" else {})))
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    a = pixels(load_rgb(path))
    assert a.shape == (30, 40, 3)
    assert np.abs(a - rgb).max() <= 6, (cmyk, a[0, 0])


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_gives_first_frame(tmp_path, fmt):
    path = tmp_path / f"anim.{fmt.lower()}"
    path.write_bytes(animated(fmt, [RED, BLUE, GREEN]))
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    a = pixels(load_rgb(path))
    assert a.shape == (30, 40, 3)
    assert np.abs(a - RED).max() <= 8, a[0, 0]


# --------------------------------------------------------------------------- (a) load_rgb: bad


def _truncated_png() -> bytes:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(
        0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    return data[: len(data) // 2]


TOO_LARGE = f"image too large (10000x10000 pixels; the limit is {images.MAX_PIXELS:,} pixels"
NOT_IMAGE = "not an image (content not recognised as JPEG, PNG, GIF, BMP, WebP or TIFF)"

BAD_FILES = {
    # name: (content, the reason, exactly or up to "...")
    "empty.jpg": (b"", "empty file (0 bytes)"),
    "cut.jpg": (truncated_jpeg(), "corrupt image (truncated image data)"),
    "cut.png": (_truncated_png(), "corrupt image ..."),
    "notes.jpg": (b"this is text, not a JPEG\n", NOT_IMAGE),
    "page.jpg": (b"<html><body>404 Not Found</body></html>", NOT_IMAGE),
    "Thumbs.jpg": (OLE2, NOT_IMAGE),
    "vector.jpg": (EPS, NOT_IMAGE),  # never handed to Ghostscript
    "header.jpg": (b"P6\n4 4\n255\n" + b"\0" * 48, NOT_IMAGE),  # PPM: not a format we read
    "bomb.png": (png_claiming(20000, 20000), "image too large (Image size (400000000 pixels) ..."),
    "bomb10k.png": (png_claiming(10000, 10000), TOO_LARGE + " ..."),
    "bomb.gif": (gif_claiming(20000, 20000), "image too large (Image size (400000000 pixels) ..."),
    "strip.png": (encode(Image.new("RGB", (1, 20000)), "PNG"),
                  "image too elongated (1x20000 pixels; the limit is 100:1 ..."),
}


def _matches(reason: str, expected: str) -> bool:
    if expected.endswith(" ..."):
        return reason.startswith(expected[:-4])
    return reason == expected


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_refused_with_its_reason(tmp_path, name, monkeypatch):
    from PIL import EpsImagePlugin

    def no_ghostscript(*args, **kwargs):
        raise AssertionError("an EPS file reached Ghostscript")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    data, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    reasons = load_all_ways(path)
    for reason in reasons:
        assert isinstance(reason, str), f"{name} decoded as an image"
        assert _matches(reason, expected), reason
    assert len(set(reasons)) == 1  # prepare and extract say the same


def test_pixel_limit_applies_to_real_images(tmp_path, monkeypatch):
    path = tmp_path / "photo.jpg"
    path.write_bytes(image_bytes(1, size=(64, 48)))
    assert load_rgb(path).size == (64, 48)
    monkeypatch.setattr(images, "MAX_PIXELS", 3000)
    with pytest.raises(BadImage) as e:
        load_rgb(path)
    assert e.value.reason == ("image too large (64x48 pixels; the limit is 3,000 pixels, a "
                              "guard against decompression bombs)")


def test_pixel_limit_holds_when_pillows_is_lifted(tmp_path, monkeypatch):
    """Some libraries set Image.MAX_IMAGE_PIXELS = None; the pipeline's own limit stays."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(20000, 20000))
    with pytest.raises(BadImage, match=r"image too large \(20000x20000 pixels"):
        load_rgb(path)


def test_unexpected_decoder_exception_is_a_bad_image(tmp_path, monkeypatch):
    """A reader that trips over a malformed file with IndexError etc. must not stop a run."""
    def trip(self):
        raise IndexError("list index out of range")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load_end", trip)
    path = tmp_path / "odd.png"
    path.write_bytes(image_bytes(3, fmt="PNG"))
    with pytest.raises(BadImage) as e:
        load_rgb(path)
    assert e.value.reason == "corrupt image (IndexError: list index out of range)"


def test_missing_file(tmp_path):
    with pytest.raises(BadImage) as e:
        load_rgb(tmp_path / "gone.jpg")
    assert e.value.reason == "file not found"


# --------------------------------------------------------------------------- (b) messy folder

N_PHOTOS = 30  # real photos per class, linked; the shared set has 120 each


def _photo(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _symlink(target: Path, link: Path) -> None:
    os.symlink(target.resolve(), link)


def build_folder(root: Path, catsdogs: Path, *, bad: bool) -> tuple[dict, dict]:
    """``root/{cat,dog}``: links to real photos, odd-format good images and, with ``bad``, junk.

    The odd-format images are made from other real photos of the class (never
    copied: decoded, converted, written anew), so they are classifiable and
    the accuracy stays meaningful. Returns ``(good, bad)``: good path ->
    label, and bad path (as rejected.json shows it) -> expected reason.
    """
    good: dict[str, str] = {}
    rejected: dict[str, str] = {}
    for label in ("cat", "dog"):
        folder = root / label
        folder.mkdir(parents=True)
        photos = sorted((catsdogs / label).glob("*.jpg"))
        assert len(photos) >= N_PHOTOS + 20, f"too few sample photos in {catsdogs / label}"
        for p in photos[:N_PHOTOS]:
            _symlink(p, folder / p.name)
            good[f"{label}/{p.name}"] = label
        spare = iter(photos[N_PHOTOS:])
        # Names that CSV, JSON and HDF5 must carry intact: case, spaces, commas,
        # quotes, a line break, non-ASCII (all valid UTF-8).
        for name in ("IMG_0001.JPG", "chat noir, été.jpg", 'say "cheese".jpg',
                     "line\nbreak.jpg", "\N{PAW PRINTS}.jpeg"):
            _symlink(next(spare), folder / name)
            good[f"{label}/{name}"] = label

        def add(name: str, data: bytes, label=label, folder=folder) -> None:
            (folder / name).write_bytes(data)
            good[f"{label}/{name}"] = label

        add("cmyk.jpg", encode(_photo(next(spare)).convert("CMYK"), "JPEG", quality=92))
        grey = np.asarray(_photo(next(spare)).convert("L"), dtype=np.uint16) * 257
        add("grey16.png", grey16(grey))
        im = _photo(next(spare)).convert("RGBA")
        alpha = Image.new("L", im.size, 0)
        alpha.paste(255, (8, 8, im.width - 8, im.height - 8))  # a transparent frame
        im.putalpha(alpha)
        add("rgba.png", encode(im, "PNG"))
        add("palette.png", encode(_photo(next(spare)).quantize(256), "PNG"))
        im = _photo(next(spare)).quantize(255)
        im.paste(255, (0, 0, im.width, 10))  # a transparent band over index 255
        add("palette-trns.gif", encode(im, "GIF", transparency=255))
        add("png-named.jpg", encode(_photo(next(spare)), "PNG"))
        add("saved-by-a-browser.jfif", encode(_photo(next(spare)), "JPEG", quality=90))
        first = _photo(next(spare))
        other = _photo(next(spare)).resize(first.size)
        data = encode(first, "GIF", save_all=True, duration=100, loop=0,
                      append_images=[other.transpose(T.ROTATE_180), other])
        add("animated.gif", data)
        if label == "cat":  # its first frame as a still image, decoded by plain Pillow
            with Image.open(io.BytesIO(data)) as gif:
                assert gif.n_frames == 3 and "transparency" not in gif.info
                add("animated-frame0.png", encode(gif.convert("RGB"), "PNG"))
        for orientation in ((6, 3) if label == "cat" else (8,)):
            photo = _photo(next(spare))
            data = exif_rotated(photo, orientation)
            add(f"exif{orientation}.jpg", data)
            # The manual copy: the stored pixels as decoded, turned by hand, no EXIF.
            with Image.open(io.BytesIO(data)) as stored:
                stored = stored.convert("RGB")
            add(f"exif{orientation}-upright.png",
                encode(_transpose(stored, UPRIGHT_FROM_STORED[orientation]), "PNG"))
            if orientation == 6:  # and as a viewer ignoring EXIF would show it
                add("exif6-sideways.png", encode(stored, "PNG"))

    if not bad:
        return good, rejected

    def put(rel: str, data: bytes, reason: str) -> None:
        (root / rel).write_bytes(data)
        rejected[rel] = reason

    cut = sorted((catsdogs / "cat").glob("*.jpg"))[-1]  # not one of those used above
    put("cat/empty.jpg", b"", "empty file (0 bytes)")
    put("cat/truncated.jpg", cut.read_bytes()[: cut.stat().st_size // 2],
        "corrupt image (truncated image data)")
    put("cat/Thumbs.db", OLE2, "not an image file (extension .db)")
    put("cat/.DS_Store", b"\0\0\0\1Bud1" + b"\0" * 32, "hidden file (name starts with '.')")
    os.symlink("loop.jpg", root / "cat" / "loop.jpg")
    rejected["cat/loop.jpg"] = ("symbolic link that cannot be followed (Too many levels of "
                                "symbolic links)")
    os.symlink(root / "cat" / "moved-away.jpg", root / "cat" / "broken.jpg")
    rejected["cat/broken.jpg"] = f"broken symbolic link (to {root}/cat/moved-away.jpg)"
    # A good picture, but a name manifest.csv and the HDF5 file cannot hold.
    with open(os.path.join(os.fsencode(root / "cat"), b"caf\xe9.jpg"), "wb") as f:
        f.write(image_bytes(4))
    rejected["cat/caf\\xe9.jpg"] = "file name is not valid UTF-8 (rename the file to use it)"
    put("dog/notes.jpg", b"this is text, not a JPEG\n", NOT_IMAGE)
    put("dog/vector.jpg", EPS, NOT_IMAGE)
    put("dog/bomb.png", png_claiming(20000, 20000), "image too large ...")
    put("dog/bomb10k.png", png_claiming(10000, 10000), TOO_LARGE + " ...")
    put("dog/strip.png", encode(Image.new("RGB", (1, 20000)), "PNG"), "image too elongated ...")
    put("dog/desktop.ini", b"[.ShellClassInfo]\n", "not an image file (extension .ini)")
    put("Thumbs.db", OLE2, "not in a class folder ...")
    return good, rejected


def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _tree(root: Path) -> dict:
    """Every entry under root (links not followed) with its bytes' hash or link target."""
    out = {}
    for folder, dirs, files in os.walk(os.fsencode(root)):
        for name in dirs + files:
            p = os.path.join(folder, name)
            st = os.lstat(p)
            if os.path.islink(p):
                out[p] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                out[p] = (st.st_mtime_ns, hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


@pytest.fixture
def messy(tmp_path, catsdogs):
    if sys.platform != "linux":
        pytest.skip("needs a file system that takes any bytes in file names")
    root = tmp_path / "messy"
    good, bad = build_folder(root, catsdogs, bad=True)
    return root, good, bad


@pytest.mark.sample_data
def test_messy_folder_every_file_decodes_or_is_refused_the_same_way(messy):
    """Each odd or broken file of the folder, through load_rgb three ways."""
    root, good, bad = messy
    for rel in good:
        results = load_all_ways(root / rel)
        assert all(isinstance(r, Image.Image) and r.mode == "RGB" for r in results), (rel, results)
        assert results[0].size == results[1].size
        assert np.array_equal(pixels(results[0]), pixels(results[1]))
    for rel, expected in bad.items():
        path = root / rel
        if path.suffix not in images.IMAGE_EXTENSIONS or not path.is_file() \
                or "\\x" in rel or path.name.startswith("."):
            continue  # refused by the listing, never decoded
        results = load_all_ways(path)
        assert all(isinstance(r, str) and _matches(r, expected) for r in results), (rel, results)


@pytest.mark.sample_data
def test_prepare_over_messy_folder(messy, tmp_path, capsys):
    root, good, bad = messy
    before = _tree(root)
    out = tmp_path / "prepared"
    info = prepare(source="folder", folder=str(root), out_dir=out)

    rows = _manifest(out)
    assert {r["path"]: r["label"] for r in rows} == good  # every good image, nothing else
    for r in rows:  # links are followed: the hash is of the photo they point to
        assert r["sha256"] == hashlib.sha256((root / r["path"]).read_bytes()).hexdigest()
    found = {r["path"]: r["reason"] for r in json.loads((out / "rejected.json").read_text())}
    assert found.keys() == bad.keys()
    for rel, expected in bad.items():
        assert _matches(found[rel], expected), (rel, found[rel])

    n_good, n_bad = len(good), len(bad)
    assert info["n_rejected"] == n_bad and info["n_train"] + info["n_test"] == n_good
    printed = capsys.readouterr().out
    assert f"{n_good} images in 2 classes" in printed and f", {n_bad} rejected" in printed
    assert f"prepare: {n_bad} files rejected; reasons in {out / 'rejected.json'}" in printed
    assert _tree(root) == before  # nothing in the user's folder changed


@pytest.mark.sample_data
def test_split_ignores_rejected_files(messy, tmp_path, catsdogs):
    """The same usable files give the same split, whatever junk lies beside them."""
    root, good, bad = messy
    clean = tmp_path / "clean"
    build_folder(clean, catsdogs, bad=False)
    prepare(source="folder", folder=str(root), out_dir=tmp_path / "a")
    prepare(source="folder", folder=str(clean), out_dir=tmp_path / "b")
    a, b = _manifest(tmp_path / "a"), _manifest(tmp_path / "b")
    assert [(r["path"], r["split"]) for r in a] == [(r["path"], r["split"]) for r in b]
    # ... and not trivially: the junk was there and refused, every usable file is
    # listed, and each class is split (an empty manifest, or all-train, is equal too).
    assert len(json.loads((tmp_path / "a/rejected.json").read_text())) == len(bad) > 0
    assert json.loads((tmp_path / "b/rejected.json").read_text()) == []
    assert sorted(r["path"] for r in a) == sorted(good)
    assert {(r["label"], r["split"]) for r in a} == {(c, s) for c in ("cat", "dog") for s in ("train", "test")}


# --------------------------------------------------------------------------- (c) dvc repro


def _features(h5_path: Path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(h5_path, "r") as h5:
        return dict(zip(h5["paths"].asstr()[:], h5["features"][:]))


@pytest.mark.slow
@pytest.mark.sample_data
def test_repro_over_messy_folder_equals_clean_folder(project, tmp_path, catsdogs):
    if sys.platform != "linux":
        pytest.skip("needs a file system that takes any bytes in file names")
    runs = {}
    for name, bad in (("messy", True), ("clean", False)):
        folder = tmp_path / name
        good, rejected = build_folder(folder, catsdogs, bad=bad)
        project.set_params(
            data={"source": "folder", "folder": str(folder), "test_fraction": 0.2, "seed": 0},
            backbone={"name": "efficientnet_lite0", "weights": "DEFAULT"},
        )
        out = project.dvc("repro", "evaluate").stdout
        root = project.path
        found = json.loads((root / "data/prepared/rejected.json").read_text())
        assert {r["path"] for r in found} == rejected.keys()
        if bad:
            assert f"prepare: {len(rejected)} files rejected; reasons in" in out
        assert "extract: skipped" not in out  # prepare let through only what extract can read
        feats = _features(root / "data/features/efficientnet_lite0.h5")
        assert feats.keys() == good.keys()
        metrics = {h: json.loads((root / f"reports/metrics_{h}.json").read_text())[h] for h in ("logreg", "svm")}
        runs[name] = (metrics, feats,
                      (root / "data/prepared/manifest.csv").read_bytes())

    (metrics, feats, manifest), (clean_metrics, clean_feats, clean_manifest) = \
        runs["messy"], runs["clean"]
    assert manifest == clean_manifest
    assert metrics == clean_metrics
    for path, row in feats.items():
        assert np.allclose(row, clean_feats[path], rtol=1e-4, atol=1e-5), path
    assert metrics["logreg"]["accuracy"] >= 0.8, metrics  # 15 test images, real photos

    # EXIF-rotated photos are upright in the features: the same row as the
    # manually rotated copy, and far from the sideways one.
    for rel in ("cat/exif6", "cat/exif3", "dog/exif8"):
        rotated, upright = feats[f"{rel}.jpg"], feats[f"{rel}-upright.png"]
        assert np.allclose(rotated, upright, rtol=1e-3, atol=1e-4), rel
    # The animated GIF is its first frame.
    assert np.allclose(feats["cat/animated.gif"], feats["cat/animated-frame0.png"],
                       rtol=1e-3, atol=1e-4)
    sideways = feats["cat/exif6-sideways.png"]
    scale = np.linalg.norm(feats["cat/exif6-upright.png"])
    assert np.linalg.norm(feats["cat/exif6.jpg"] - sideways) > 0.1 * scale
