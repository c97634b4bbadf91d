"""Pictures in and out of the visualize stage.

In: test photos as pixel tensors in [0, 1], read through
:func:`pipeline.data.images.decode_checked` (the content hash of the manifest
row is checked) and the backbone's :meth:`~pipeline.data.transform.TransformSpec.pixels`.
Out: PNGs, captioned grids and whole folders that replace the previous run's
only when the new one is complete.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipeline.data.images import decode_checked
from pipeline.data.manifest import Row
from pipeline.fileio import atomic_path


def load_pixels(root, rows: list[Row], pixels: Callable) -> tuple[list[Row], torch.Tensor | None]:
    """Decode ``rows`` with ``pixels`` (``TransformSpec.pixels()``); skip, and say so, what cannot be used.

    Returns:
        the rows kept and their images stacked (N, 3, crop, crop) in [0, 1],
        or ``None`` when no row could be used.
    """
    kept, xs = [], []
    for row in rows:
        x, why = decode_checked(root, row, pixels)
        if why:
            tqdm.write(f"visualize: skipped {row.path}: {why}")
            continue
        kept.append(row)
        xs.append(x)
    return kept, (torch.stack(xs) if xs else None)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round pixels in [0, 1] to the 256 levels of an 8-bit PNG: what is scored is what is saved."""
    return (x.clamp(0, 1) * 255).round() / 255


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB image."""
    a = (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(a, "RGB")


def save_png(image: Image.Image | torch.Tensor, path) -> None:
    """Write a PNG atomically."""
    if isinstance(image, torch.Tensor):
        image = to_pil(image)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")


def captioned_grid(images: list[Image.Image], captions: list[str], columns: int = 4) -> Image.Image:
    """Images in a grid, each with a one-line caption under it."""
    font = ImageFont.load_default()
    w, h = images[0].size
    cap = 14
    cols = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * (w + 4), rows * (h + cap + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, (im, text) in enumerate(zip(images, captions)):
        x0, y0 = (k % cols) * (w + 4), (k // cols) * (h + cap + 4)
        grid.paste(im, (x0, y0))
        draw.text((x0 + 2, y0 + h + 1), text[: max(8, w // 6)], fill=(0, 0, 0), font=font)
    return grid


def slug(text: str) -> str:
    """A file-name-safe form of a class name."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "class"


@contextlib.contextmanager
def fresh_dir(path: Path):
    """Yield an empty temporary folder that replaces ``path`` when the block succeeds.

    So a folder of images from an earlier run (other classes, other ε) never
    mixes with this run's, and a failed run leaves the old folder as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
