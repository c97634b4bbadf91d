"""Bad input through the real ``dvc repro``: one-line errors, nothing half-written."""

from __future__ import annotations

import pytest
from helpers_images import make_class_folder, write


@pytest.fixture
def tiny_project(project, tmp_path):
    folder = make_class_folder(tmp_path / "photos", {"red": 6, "blue": 6})
    project.set_params(
        data={"source": "folder", "folder": str(folder)},
        backbone={"name": "resnet18", "weights": "none"},  # random init: plumbing only
        heads={"cv_folds": 2},
    )
    project.commit("tiny folder")
    return project, folder


def _error_line(res) -> str:
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_tiny_folder_runs_through_with_random_weights(tiny_project):
    project, _ = tiny_project
    project.dvc("repro", "evaluate")
    assert (project.path / "reports/metrics.json").is_file()


@pytest.mark.parametrize(
    "params, stage_output, fragment",
    [
        ({"backbone": {"name": "resnet51"}}, "data/features", "unknown backbone 'resnet51'"),
        ({"backbone": {"weights": "missing/weights.pth"}}, "data/features", "weights file missing/weights.pth not found"),
        ({"data": {"source": "imagenet"}}, "data/prepared", "unknown data.source 'imagenet'"),
        ({"data": {"folder": "/nonexistent/photos"}}, "data/prepared", "/nonexistent/photos"),
        ({"heads": {"logreg": {"C": "big"}}}, "models", "heads.logreg.C"),
        ({"backbone": {"nam": "vgg16"}}, "data/prepared", "unknown params key 'backbone.nam'"),
    ],
)
def test_bad_params_fail_with_one_line_and_leave_nothing(tiny_project, params, stage_output, fragment):
    project, _ = tiny_project
    project.set_params(**params)
    res = project.dvc("repro", "evaluate", check=False)
    assert res.returncode != 0
    line = _error_line(res)
    assert fragment in line, line
    out = project.path / stage_output
    # Nothing half-written where a later stage would read it.
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), list(out.rglob("*"))


def test_empty_class_folder_is_named(tiny_project):
    project, folder = tiny_project
    (folder / "green").mkdir()
    write(folder / "green" / "broken.jpg", b"")
    res = project.dvc("repro", "evaluate", check=False)
    assert res.returncode != 0
    assert "green" in _error_line(res)
