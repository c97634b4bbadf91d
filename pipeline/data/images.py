"""Decoding one image file into an upright 8-bit RGB picture.

Every image the pipeline reads, when it checks a dataset and when it extracts
features, goes through :func:`load_rgb`, so a file is either usable everywhere
or rejected everywhere, with the same reason.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import BadImage

#: Extensions considered when scanning a folder. Anything else (Thumbs.db,
#: .DS_Store, readme files) is listed in ``rejected.json`` as "not an image file".
#: ``.jfif`` and ``.jpe`` are JPEGs (browsers on Windows save photos as .jfif).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

#: The only Pillow decoders a file may reach, whatever its extension. A file's
#: content picks its decoder, so without this list a file named .jpg could reach
#: any of Pillow's ~40 readers, including EPS, which runs Ghostscript on it.
#: (JPEG includes MPO, the multi-picture JPEG some cameras write.)
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
_FORMATS_SHOWN = "JPEG, PNG, GIF, BMP, WebP or TIFF"

#: Larger images are refused as possible decompression bombs (Pillow's own
#: default limit; a 12-megapixel phone photo is far below it).
MAX_PIXELS = 89_478_485

#: More elongated images are refused too: preprocessing resizes the shorter
#: side to a few hundred pixels, so a 1x20000 strip (a few kilobytes on disk)
#: would become a 256x5,120,000 picture, gigabytes in memory. A 360-degree
#: panorama is about 10:1.
MAX_ASPECT_RATIO = 100

#: EXIF orientation -> the transpose that shows the image upright (EXIF 2.3,
#: tag 0x0112). 1 (or a missing or invalid value) means as stored.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation.

    Not ``ImageOps.exif_transpose``: it also re-serialises the EXIF block, and
    raises (``struct.error``) on photos whose other EXIF tags are malformed,
    which cameras and editors do write. Only the orientation matters here; an
    EXIF block that cannot be read at all counts as no orientation, as in
    image viewers.
    """
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 (any parse failure of a metadata block)
        return im
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    # transpose keeps im.info, and with it a palette's or colour key's transparency.
    return im if method is None else im.transpose(method)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping or black backgrounds."""
    if "transparency" in im.info and im.mode in ("1", "L", "RGB", "P"):
        # A palette entry or a colour key marked transparent (PNG tRNS, GIF):
        # handled below like an alpha channel.
        im = im.convert("RGBA")
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16"):
        # 16-bit greyscale: Pillow's convert('RGB') clips values above 255,
        # which turns a 16-bit photo white. Rescale the full 16-bit range.
        return _grey_to_rgb(np.asarray(im, dtype=np.float64) / 65535.0)
    if im.mode == "I":
        # 32-bit integers, whose range the mode does not say: taken as 8-bit
        # when every value fits, else as 16-bit (what 16-bit files decode to
        # with older Pillow).
        a = np.asarray(im, dtype=np.float64)
        return _grey_to_rgb(a / (65535.0 if a.max(initial=0) > 255 else 255.0))
    if im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        lo, hi = float(a.min(initial=0)), float(a.max(initial=1))
        return _grey_to_rgb((a - lo) / max(hi - lo, 1e-12))
    if im.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        # Transparent pixels carry arbitrary colour (often black); a photo
        # pasted on white is what a viewer shows and what the network expects.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _grey_to_rgb(a: np.ndarray) -> Image.Image:
    """Grey values in [0, 1] (clipped) to 8-bit RGB."""
    a = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")


def load_rgb(
    path: str | os.PathLike,
    *,
    data: bytes | None = None,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Read an image file as an upright RGB :class:`PIL.Image.Image`.

    Applies the EXIF orientation, takes the first frame of animated files and
    converts every mode (L, LA, P, RGBA, CMYK, I;16, ...) to 8-bit RGB;
    transparent pixels become white. Only the :data:`FORMATS` decoders are
    used, whatever the file's extension.

    Args:
        path: the file (also named in errors).
        data: the file's bytes, when the caller has read them already (to hash
            them); then ``path`` is not opened.
        draft_size: if given, JPEGs may be decoded at a reduced scale that is
            still at least this (width, height); used where full resolution is
            not needed (validation, resizing to 224 pixels).

    Raises:
        BadImage: the file is empty, not an image in one of :data:`FORMATS`,
            truncated or corrupt, over :data:`MAX_PIXELS` or over
            :data:`MAX_ASPECT_RATIO`.

    Example:
        >>> load_rgb("cat.jpg").mode  # doctest: +SKIP
        'RGB'
    """
    path = Path(path)
    try:
        size = len(data) if data is not None else path.stat().st_size
        if size == 0:
            raise BadImage(path, "empty file (0 bytes)")
        # Image.open reads only the header: the size checks run before any
        # pixel is decoded. Pillow's own bomb check raises at twice its limit
        # and only warns below; ours refuses from MAX_PIXELS on, whatever
        # Image.MAX_IMAGE_PIXELS another library may have set.
        with Image.open(io.BytesIO(data) if data is not None else path, formats=FORMATS) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise BadImage(
                    path,
                    f"image too large ({w}x{h} pixels; the limit is {MAX_PIXELS:,} pixels, "
                    f"a guard against decompression bombs)",
                )
            if max(w, h) > MAX_ASPECT_RATIO * max(min(w, h), 1):
                raise BadImage(
                    path,
                    f"image too elongated ({w}x{h} pixels; the limit is {MAX_ASPECT_RATIO}:1, "
                    f"as resizing its shorter side would take gigabytes)",
                )
            if draft_size is not None and im.format in ("JPEG", "MPO"):
                im.draft("RGB", draft_size)
            im.load()  # frame 0: animated files give their first frame
            return _to_rgb(_upright(im))
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(path, f"not an image (content not recognised as {_FORMATS_SHOWN})") from None
    except Image.DecompressionBombError as e:
        raise BadImage(path, f"image too large ({e})") from None
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except PermissionError:
        raise BadImage(path, "permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated and corrupt data as OSError/SyntaxError.
        msg = str(e) or type(e).__name__
        if "truncated" in msg:
            msg = "truncated image data"
        raise BadImage(path, f"corrupt image ({msg})") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        # Pillow's readers parse untrusted bytes, and a malformed file now and
        # then escapes as struct.error, IndexError, KeyError, ...: a property
        # of the file, which must not stop a run over thousands of them.
        raise BadImage(path, f"corrupt image ({type(e).__name__}: {e})") from None


def read_checked(root: str | os.PathLike, row) -> tuple[bytes | None, str | None]:
    """A row's file bytes, checked against its recorded content hash.

    Every reader of dataset images (extraction with either decoder,
    fine-tuning, evaluation, visualisation) comes through here, so a file that
    changed since the prepare stage listed it is refused everywhere alike.
    A row without a hash (``row.sha256 == ""``: a user's new photo in
    ``predict``) is read unchecked.

    Returns:
        ``(data, None)``, or ``(None, reason)`` when the file cannot be used.
    """
    try:
        data = (Path(root) / row.path).read_bytes()
    except OSError as e:
        return None, f"cannot read file ({e.strerror or e})"
    if row.sha256 and hashlib.sha256(data).hexdigest() != row.sha256:
        return None, "file changed since the prepare stage listed it; run dvc repro again"
    return data, None


def decode_checked(root: str | os.PathLike, row, transform=None, draft_size=None):
    """Read, check and decode one row: ``(image, None)`` or ``(None, reason)``.

    ``transform`` (a :class:`~pipeline.data.transform.TransformSpec` callable)
    is applied to the upright RGB picture when given.
    """
    data, why = read_checked(root, row)
    if why:
        return None, why
    try:
        image = load_rgb(Path(root) / row.path, data=data, draft_size=draft_size)
    except BadImage as e:
        return None, e.reason
    return (transform(image) if transform is not None else image), None
