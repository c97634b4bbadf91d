"""`dvc plots show` renders without a network: the page carries Vega inline and loads no script from the web."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow

SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?([^\"' >]+)", re.IGNORECASE)


def _show(project, name: str) -> str:
    csv = project.path / "reports" / "confusion_check.csv"
    csv.parent.mkdir(exist_ok=True)
    # Class names no library holds: finding them in the page shows the chart's data is there.
    csv.write_text("actual,predicted\n" + "zorblat_cat,zorblat_cat\nquuxy_dog,zorblat_cat\nquuxy_dog,quuxy_dog\n")
    out = project.path / name
    project.dvc("plots", "show", str(csv), "--template", "confusion", "-x", "predicted", "-y", "actual",
                "-o", str(out))
    return (out / "index.html").read_text(encoding="utf-8")


def test_plots_page_loads_no_script_from_the_web(project):
    project.dvc("repro", "plots_template")
    page = _show(project, "plots_offline")
    assert SCRIPT_SRC.findall(page) == [], "the page loads scripts from elsewhere"
    assert "vegaEmbed" in page and "zorblat_cat" in page and "quuxy_dog" in page
    assert "{plot_divs}" not in page and "{scripts}" not in page

    # The check above fails where DVC's default page is used: its scripts come from a CDN.
    project.dvc("config", "--unset", "plots.html_template")
    default = _show(project, "plots_default")
    assert any(src.startswith("http") for src in SCRIPT_SRC.findall(default)), default[:500]
