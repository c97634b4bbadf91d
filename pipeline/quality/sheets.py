"""Contact sheets: one PNG per kind of suspect, thumbnails with their path, label and suggestion.

``dvc plots show`` shows them (dvc.yaml declares each under ``plots``). Every
kind's sheet is always written, "none found" where it has no suspect, so the
stage's outputs always exist. A duplicate or leak is drawn beside the copy
that is kept. Each picture is read through
:func:`~pipeline.data.images.decode_checked`, as every reader of the data set's
photos is: a photo changed since the prepare stage is drawn as a grey box with
the reason.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pipeline.data.images import decode_checked
from pipeline.fileio import atomic_path

THUMB = 160  # pixels, the longer side of a thumbnail
CAPTION = 4  # lines under a thumbnail
LINE = 14  # pixels per caption line
PAD = 8
COLUMNS = 6  # thumbnails per row
#: Suspects drawn per sheet, the most suspect first; suspects.csv lists them all.
MAX_SHOWN = 48


def _font():
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _thumb(root, row) -> Image.Image:
    image, why = decode_checked(root, row, draft_size=(2 * THUMB, 2 * THUMB))
    if image is None:
        image = Image.new("RGB", (THUMB, THUMB), (128, 128, 128))
        ImageDraw.Draw(image).text((4, 4), why[:24], fill=(255, 255, 255), font=_font())
        return image
    image.thumbnail((THUMB, THUMB))
    return image


def _fit(text: str, n: int = 26) -> str:
    """The end of a long path: the file name says more than the folders."""
    return text if len(text) <= n else "…" + text[-(n - 1):]


def contact_sheet(path, kind: str, cells: list[dict], root, n_total: int) -> None:
    """Write ``kind``'s sheet to ``path`` (atomically).

    Args:
        cells: the suspects drawn, most suspect first (at most :data:`MAX_SHOWN`
            are): each ``{"row": Row, "caption": [lines], "partner": Row or None}``.
        root: the dataset root the rows' paths are relative to.
        n_total: how many suspects of this kind there are (the title says it).
    """
    font, cells = _font(), cells[:MAX_SHOWN]
    pairs = any(c.get("partner") is not None for c in cells)
    cell_w = (2 * THUMB + PAD if pairs else THUMB) + 2 * PAD
    cell_h = THUMB + CAPTION * LINE + 2 * PAD
    columns = max(1, COLUMNS // (2 if pairs else 1))
    title = (f"{kind}: none found" if not n_total else
             f"{kind}: {n_total} suspect{'s' * (n_total != 1)}, most suspect first"
             + (f" (the first {len(cells)} shown; all in suspects.csv)" if n_total > len(cells) else ""))
    n_rows = -(-len(cells) // columns)
    width = max(min(len(cells), columns) * cell_w, 7 * len(title) + 2 * PAD, 320)
    sheet = Image.new("RGB", (width, 2 * LINE + PAD + n_rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), title, fill="black", font=font)
    for k, cell in enumerate(cells):
        x, y = (k % columns) * cell_w + PAD, 2 * LINE + PAD + (k // columns) * cell_h
        for j, row in enumerate([cell["row"], cell.get("partner")]):
            if row is not None:
                sheet.paste(_thumb(root, row), (x + j * (THUMB + PAD), y))
        for i, line in enumerate(cell["caption"][:CAPTION]):
            draw.text((x, y + THUMB + 2 + i * LINE), _fit(line, 26 * (2 if pairs else 1)), fill="black", font=font)
    with atomic_path(Path(path), suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")
