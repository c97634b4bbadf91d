"""``python -m pipeline predict``: top-k per photo, unreadable files listed, exit status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, sample_folder
from helpers_images import truncated_jpeg, write

from pipeline.__main__ import main
from pipeline.backbones import load_backbone
from pipeline.finetune.train import build_network, save_finetuned
from pipeline.heads.batch import make_head, save_head
from pipeline.data.images import load_rgb

pytestmark = pytest.mark.sample_data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project folder as ``dvc repro`` leaves it: params.yaml, three models, metrics.

    The heads are fitted on 12 photos per class (seconds); the fine-tuned
    network is the one the finetune stage starts from.
    """
    folder = sample_folder("catsdogs")
    project = tmp_path_factory.mktemp("predict") / "project"
    (project / "reports").mkdir(parents=True)
    (project / "params.yaml").write_text(
        yaml.safe_dump({"backbone": {"name": "efficientnet_lite0", "weights": "DEFAULT"}})
    )
    bb = load_backbone("efficientnet_lite0")
    classes = ["cat", "dog"]
    files = [(folder / c / f.name, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())[:12]]
    with torch.inference_mode():
        X = bb.features(torch.stack([bb.transform(load_rgb(f)) for f, _ in files])).numpy()
    y = np.array([label for _, label in files])
    for name, C in (("logreg", [0.1]), ("svm", [0.001])):
        search = make_head(name, C=C, cv_folds=2, y=y).fit(X, y)
        save_head(project / "models" / f"{name}.joblib", search, bb.provenance(), classes)
        if name == "logreg":
            net = build_network(bb.features, search.best_estimator_)
            save_finetuned(project / "models" / "finetune.pt", net, bb, classes)
    # svm "best", so the default choice is visible.
    metrics = {"logreg": {"accuracy": 0.95}, "svm": {"accuracy": 0.97}, "finetune": {"accuracy": 0.96}}
    (project / "reports" / "metrics.json").write_text(json.dumps(metrics))

    photos = project.parent / "photos"
    (photos / "nested" / "dog").mkdir(parents=True)
    for f in sorted((folder / "cat").iterdir())[100:102]:
        shutil.copy(f, photos / f"cat-{f.name}")
    for f in sorted((folder / "dog").iterdir())[100:102]:
        shutil.copy(f, photos / "nested" / "dog" / f.name)
    write(photos / "broken.jpg", truncated_jpeg())
    write(photos / "notes.txt", b"not a photo; ignored inside folders")
    return project, photos


def _predict(capsys, *args):
    """Run ``python -m pipeline predict`` in this process: (exit status, stdout, stderr)."""
    try:
        main(["predict", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _good(photos):
    return sorted(p for p in photos.rglob("*.jpg") if p.name != "broken.jpg")


def test_folder_with_a_corrupt_file_lists_it_and_fails(trained, capsys):
    project, photos = trained
    code, out, err = _predict(capsys, photos, "--project", project, "--model", "logreg")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("# model logreg on efficientnet_lite0: probabilities")
    predicted = {line.split(": ")[0]: line.split(": ")[1] for line in lines[1:]}
    assert sorted(predicted) == sorted(map(str, _good(photos)))  # recursive, .txt ignored
    for path, shown in predicted.items():
        top = [part.rsplit(" ", 1) for part in shown.split(", ")]
        assert [c for c, _ in top] in (["cat", "dog"], ["dog", "cat"])  # top-3 of 2 classes: both
        assert abs(sum(float(s) for _, s in top) - 1) < 0.01
        assert top[0][0] == ("dog" if "/nested/dog/" in path else "cat"), (path, shown)
    skipped = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and "broken.jpg" in skipped[0] and "truncated" in skipped[0], err
    assert err.splitlines()[-1] == "error: 1 of 5 files could not be classified (listed above)"


def test_good_files_only_exit_zero(trained, capsys):
    project, photos = trained
    code, out, err = _predict(capsys, *_good(photos), "--project", project, "--top-k", "1")
    assert code == 0, err
    lines = out.splitlines()
    # Default: the best by test accuracy in reports/metrics.json, here the SVM.
    assert lines[0] == "# model svm on efficientnet_lite0: scores: softmax of SVM decision values, not probabilities"
    assert len(lines) == 5 and all(len(line.split(": ")[1].split(", ")) == 1 for line in lines[1:])


def test_json_is_one_document_with_failures_and_reasons(trained, capsys, tmp_path):
    project, photos = trained
    missing = tmp_path / "gone.jpg"
    code, out, err = _predict(capsys, photos, missing, "--project", project, "--json", "--model", "finetune")
    assert code == 1
    doc = json.loads(out)
    assert doc["model"] == "finetune" and doc["scores"] == "probabilities" and doc["top_k"] == 2
    assert len(doc["predictions"]) == 4
    for p in doc["predictions"]:
        assert [t["class"] for t in p["top"]] in (["cat", "dog"], ["dog", "cat"])
        assert p["top"][0]["score"] >= p["top"][1]["score"]
    reasons = {f["path"]: f["reason"] for f in doc["failed"]}
    assert reasons[str(missing)] == "file not found"
    assert "truncated" in reasons[str(photos / "broken.jpg")]
    assert "error: 2 of 6 files could not be classified (listed in the JSON)" in err


def test_finetune_starts_with_the_logreg_heads_probabilities(trained, capsys):
    project, photos = trained
    docs = {}
    for model in ("logreg", "finetune"):
        code, out, _ = _predict(capsys, *_good(photos), "--project", project, "--json", "--model", model)
        assert code == 0
        docs[model] = {p["path"]: p["top"] for p in json.loads(out)["predictions"]}
    for path, top in docs["logreg"].items():
        other = docs["finetune"][path]
        assert [t["class"] for t in top] == [t["class"] for t in other]
        assert abs(top[0]["score"] - other[0]["score"]) < 1e-3


@pytest.fixture
def stale(trained, tmp_path):
    project, photos = trained
    copy = tmp_path / "project"
    shutil.copytree(project, copy)
    return copy, photos


def _error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_head_from_other_weights_is_refused(stale, capsys):
    project, photos = stale
    params = {"backbone": {"name": "efficientnet_lite0", "weights": "none"}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    code, out, err = _predict(capsys, photos, "--project", project, "--model", "logreg")
    assert code == 1
    assert "weights=" in _error_line(err) and "stale" in _error_line(err)


def test_finetuned_from_other_backbone_is_refused(stale, capsys):
    project, photos = stale
    (project / "params.yaml").write_text(yaml.safe_dump({"backbone": {"name": "resnet18"}}))
    code, _, err = _predict(capsys, photos, "--project", project, "--model", "finetune")
    assert code == 1
    assert "fine-tuned from efficientnet_lite0 but params.yaml's backbone.name is resnet18" in _error_line(err)


def test_without_metrics_the_model_must_be_named(stale, capsys):
    project, photos = stale
    (project / "reports" / "metrics.json").unlink()
    code, _, err = _predict(capsys, photos, "--project", project)
    assert code == 1
    assert "--model logreg|svm|finetune" in _error_line(err)


def test_command_line_exit_status(trained):
    project, photos = trained
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "predict", str(photos), "--model", "logreg"],
        cwd=project,  # --project defaults to the current folder
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr
    assert len(run.stdout.splitlines()) == 5 and "broken.jpg" in run.stderr
