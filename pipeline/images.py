"""Decoding one image file into an upright 8-bit RGB picture.

Every image the pipeline reads, when it checks a dataset and when it extracts
features, goes through :func:`load_rgb`, so a file is either usable everywhere
or rejected everywhere, with the same reason.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import BadImage

#: Extensions considered when scanning a folder. Anything else (Thumbs.db,
#: .DS_Store, readme files) is listed in ``rejected.json`` as "not an image file".
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

#: Larger images are refused as possible decompression bombs (Pillow's own
#: default limit; a 12-megapixel phone photo is far below it).
MAX_PIXELS = 89_478_485


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping or black backgrounds."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: Pillow's convert('RGB') clips values above 255,
        # which turns a 16-bit photo white. Rescale to 8 bits instead.
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min(initial=0)), float(a.max(initial=1))
        a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels carry arbitrary colour (often black); a photo
        # pasted on white is what a viewer shows and what the network expects.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(
    path: str | os.PathLike,
    *,
    data: bytes | None = None,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Read an image file as an upright RGB :class:`PIL.Image.Image`.

    Applies the EXIF orientation, takes the first frame of animated files and
    converts every mode (L, LA, P, RGBA, CMYK, I;16, ...) to 8-bit RGB.

    Args:
        path: the file (also named in errors).
        data: the file's bytes, when the caller has read them already (to hash
            them); then ``path`` is not opened.
        draft_size: if given, JPEGs may be decoded at a reduced scale that is
            still at least this (width, height); used where full resolution is
            not needed (validation, resizing to 224 pixels).

    Raises:
        BadImage: the file is empty, not an image, truncated, or too large.

    Example:
        >>> load_rgb("cat.jpg").mode  # doctest: +SKIP
        'RGB'
    """
    path = Path(path)
    try:
        size = len(data) if data is not None else path.stat().st_size
        if size == 0:
            raise BadImage(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if data is not None else path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise BadImage(
                        path,
                        f"image too large ({im.width}x{im.height} pixels; the limit is "
                        f"{MAX_PIXELS:,} pixels, a guard against decompression bombs)",
                    )
                if draft_size is not None and im.format == "JPEG":
                    im.draft("RGB", draft_size)
                im.load()  # frame 0: animated files give their first frame
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(path, "not an image (content not recognised as any image format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
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
