"""Bad input through the real ``dvc repro``: one-line errors, nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_images import image_bytes, make_class_folder, write

from pipeline.data.manifest import read_prepared
from pipeline.extract.cache import open_cache
from pipeline.heads.model import load_head
from pipeline.model_folder import model_folders

pytestmark = pytest.mark.slow

#: Everything a stage writes, relative to the project root (DVC's own files and the copied code aside).
OUTPUTS = ("data", "models", "reports", "dvclive")
#: The prepare stage's files (data/prepared).
PREPARED = ("classes.json", "dataset.json", "manifest.csv", "rejected.json")


@pytest.fixture
def tiny_project(project, tmp_path):
    folder = make_class_folder(tmp_path / "photos", {"red": 6, "blue": 6})
    project.set_params(
        data={"source": "folder", "folder": str(folder)},
        backbone={"name": "resnet18", "weights": "none"},  # random init: plumbing only
        heads={"cv_folds": 2},
        finetune={"epochs": 1, "unfreeze": "none", "batch_size": 4},
    )
    project.commit("tiny folder")
    return project, folder


def _error_line(res) -> str:
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def _written(project) -> list[str]:
    """The files the stages have written (git-ignored placeholders aside)."""
    return sorted(str(p.relative_to(project.path)) for name in OUTPUTS for p in (project.path / name).rglob("*")
                  if p.is_file() and p.name != ".gitignore")


def test_tiny_folder_runs_through_with_random_weights(tiny_project):
    project, _ = tiny_project
    project.dvc("repro", "evaluate")
    root = project.path
    prepared = read_prepared(root / "data/prepared")
    # The cache holds every listed photo, as the manifest lists it.
    fs = open_cache(root / "data/features/resnet18.h5")
    assert sorted(zip(fs.paths, fs.sha256)) == sorted((r.path, r.sha256) for r in prepared.rows) and len(fs.paths) == 12
    X_test, y_test = fs.subset("test")
    assert len(y_test) == len(prepared.split("test")) > 0

    # The heads' test metrics, wherever the metrics files are declared (`dvc metrics show`
    # finds them): each head's accuracy is what its saved model scores on the cache's test rows.
    shown = json.loads(project.dvc("metrics", "show", "--json").stdout)
    reported = {head: m for f in next(iter(shown.values()))["data"].values()
                for head, m in f.get("data", {}).items() if isinstance(m, dict) and "accuracy" in m}
    # evaluate publishes each head it scored as the model folder models/<head>; finetune did not run.
    heads = model_folders(root / "models")
    assert "logreg" in heads and sorted(reported) == heads, (heads, reported)
    for head in heads:
        m = reported[head]
        estimator, config = load_head(root / "models" / head)
        assert config["metrics"] == m, (head, config["metrics"], m)
        assert m["n_test"] == len(y_test), (head, m)
        assert m["accuracy"] == pytest.approx(float(np.mean(estimator.predict(X_test) == y_test)), abs=1e-6), head
        assert 0 <= m["mean_class_accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1, (head, m)


def test_a_stage_that_fails_after_it_started_leaves_no_output_under_its_final_name(tiny_project):
    """A test photo changed after extract is found by finetune after training, at test scoring: nothing is kept."""
    project, folder = tiny_project
    project.dvc("repro", "extract")
    before = _written(project)
    test = read_prepared(project.path / "data/prepared").split("test")
    write(folder / test[0].path, image_bytes(999))  # still a photo, but not the one prepare listed

    # --single-item: finetune alone, so the prepare stage does not list the photos again.
    res = project.dvc("repro", "--single-item", "finetune", check=False)
    assert res.returncode != 0
    assert "finetune: epoch 1" in res.stdout, res.stdout  # it trained, and wrote its live log, before failing
    line = _error_line(res)
    assert f"cannot use {test[0].path}: file changed since the prepare stage" in line, line
    # No model and no report of the failed run under its final name; nothing the
    # earlier stages wrote is touched. DVCLive's per-epoch log is written as
    # training goes by design (dvc plots follows a run with it), and the run's
    # checkpoint stays in the cache, whole, so that the next run resumes instead
    # of training again; no stage reads either.
    new = sorted(set(_written(project)) - set(before))
    left = [p for p in new if not p.startswith(("dvclive/", "data/cache/finetune/"))]
    assert left == [], f"the failed finetune stage left {left}"
    cache = [p for p in new if p.startswith("data/cache/finetune/")]
    assert len(cache) == 1 and cache[0].endswith("/checkpoint.safetensors"), cache  # no temporary beside it
    assert set(before) <= set(_written(project))
    assert open_cache(project.path / "data/features/resnet18.h5").paths.size == 12


@pytest.mark.parametrize(
    "params, stage, fragment",
    [
        ({"backbone": {"name": "resnet51"}}, "extract", "unknown backbone 'resnet51'"),
        ({"backbone": {"weights": "missing/weights.pth"}}, "extract", "weights file missing/weights.pth not found"),
        ({"data": {"source": "imagenet"}}, "prepare", "unknown data.source 'imagenet'"),
        ({"data": {"folder": "/nonexistent/photos"}}, "prepare", "/nonexistent/photos"),
        ({"heads": {"train": {"logreg": {"C": "big"}}}}, "prepare", "heads.train.logreg.C"),
        ({"backbone": {"nam": "vgg16"}}, "prepare", "unknown params key 'backbone.nam'"),
    ],
)
def test_bad_params_fail_with_one_line_and_leave_only_the_earlier_stages_outputs(tiny_project, params, stage,
                                                                                 fragment):
    project, _ = tiny_project
    project.set_params(**params)
    res = project.dvc("repro", "evaluate", check=False)
    assert res.returncode != 0
    line = _error_line(res)
    assert fragment in line, line
    assert f"failed to reproduce '{stage}'" in res.stderr, res.stderr
    # The stage that refused wrote nothing; the stages before it wrote all of theirs.
    if stage == "prepare":  # every params key is checked there, the backbone's registry by extract
        assert _written(project) == []
    else:
        assert _written(project) == [f"data/prepared/{f}" for f in PREPARED], _written(project)
        assert len(read_prepared(project.path / "data/prepared").rows) == 12


def test_empty_class_folder_is_named(tiny_project):
    project, folder = tiny_project
    (folder / "green").mkdir()
    write(folder / "green" / "broken.jpg", b"")
    res = project.dvc("repro", "evaluate", check=False)
    assert res.returncode != 0
    assert "green" in _error_line(res)
    # Only the reasons the error points to: no manifest, no class list.
    assert _written(project) == ["data/prepared/rejected.json"], _written(project)
    rejected = json.loads((project.path / "data/prepared/rejected.json").read_text())
    assert [r["path"] for r in rejected] == ["green/broken.jpg"] and rejected[0]["reason"], rejected
