"""Plots that work offline: the page ``dvc plots show`` fills, with Vega inlined.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so
without a network every chart is blank. This page carries the three libraries
in one inline script, bundled by vl-convert-python (the Vega project's own
converter, which ships them in its wheel), and has no ``{scripts}``
placeholder, so DVC adds no CDN tag. The ``plots_template`` stage writes it
to :data:`TEMPLATE`, and ``.dvc/config`` points ``plots.html_template`` at it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_path

#: Where the stage writes the page (``.dvc/config``'s plots.html_template names it).
TEMPLATE = "data/plots/offline.html"

#: dvc-render's placeholders: it replaces each wherever it occurs in the page.
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

_PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <script>
%s
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_page() -> str:
    """The page: DVC's default, with the Vega libraries inline instead of the CDN's ``<script src>``."""
    try:
        import vl_convert
    except ImportError:
        raise PipelineError("the offline plots page needs vl-convert-python: pip install vl-convert-python "
                            "(it is a dependency of this project: pip install -e .)") from None
    bundle = vl_convert.javascript_bundle()  # sets window.vegaEmbed, vegaLite, vega
    for placeholder in PLACEHOLDERS:
        if placeholder in bundle:  # dvc-render would replace it inside the library's code
            raise PipelineError(f"vl-convert's bundle holds {placeholder}; pin vl-convert-python to a release "
                                "that does not")
    return _PAGE % bundle.replace("</script", "<\\/script")


def write_offline_page(path: str | Path = TEMPLATE) -> Path:
    """Write :func:`offline_page` to ``path``, atomically."""
    path = Path(path)
    page = offline_page()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".html") as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    print(f"plots_template: Vega, Vega-Lite and Vega-Embed inlined ({len(page) / 1e6:.1f} MB) -> {path}",
          flush=True)
    return path
