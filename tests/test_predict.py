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
import torchvision
import yaml
from conftest import ROOT, sample_folder
from helpers_images import truncated_jpeg, write

from pipeline.__main__ import main
from pipeline.backbones import load_backbone
from pipeline.data.images import load_rgb
from pipeline.errors import PipelineError
from pipeline.finetune.checkpoint import save_finetuned
from pipeline.finetune.network import build_network
from pipeline.heads.batch import make_head
from pipeline.heads.model import save_head
from pipeline.serve.bundle import load_bundle

pytestmark = pytest.mark.sample_data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project folder as ``dvc repro`` leaves it: three models and the metrics.

    The heads are fitted on 12 photos per class (seconds); the fine-tuned
    network is the one the finetune stage starts from.
    """
    folder = sample_folder("catsdogs")
    project = tmp_path_factory.mktemp("predict") / "project"
    (project / "reports").mkdir(parents=True)
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


def test_the_bundle_not_params_yaml_says_which_backbone(stale, capsys):
    project, photos = stale
    # params.yaml now asks for another backbone; the models say what they were made with.
    (project / "params.yaml").write_text(yaml.safe_dump({"backbone": {"name": "resnet18", "weights": "none"}}))
    code, out, err = _predict(capsys, *_good(photos), "--project", project, "--model", "finetune")
    assert code == 0, err
    assert out.splitlines()[0] == "# model finetune (efficientnet_lite0): probabilities"


def test_head_whose_weights_file_changed_is_refused(tmp_path, capsys):
    """A head records its backbone's weights file by path and sha256; a changed file makes it stale."""
    project = tmp_path / "project"
    weights = project / "weights" / "r18.pt"
    weights.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    bb = load_backbone("resnet18", str(weights))
    # As the train_heads stage records it: the path as params.yaml spells it, relative to the project.
    provenance = dict(bb.provenance(), weights="weights/r18.pt")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(8, bb.feature_dim)), np.array([0, 1] * 4)
    save_head(project / "models" / "logreg.joblib", make_head("logreg", C=[1.0], cv_folds=2).fit(X, y),
              provenance, ["cat", "dog"])
    photo = sample_folder("catsdogs") / "cat" / sorted(os.listdir(sample_folder("catsdogs") / "cat"))[0]

    # Found beside the project wherever predict runs, and its content checked.
    code, out, err = _predict(capsys, photo, "--project", project, "--model", "logreg")
    assert code == 0, err
    assert out.splitlines()[0] == "# model logreg on resnet18: probabilities"

    torch.manual_seed(2)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    code, _, err = _predict(capsys, photo, "--project", project, "--model", "logreg")
    assert code == 1
    line = _error_line(err)
    assert f"head {project / 'models' / 'logreg.joblib'} was made with weights_sha256=" in line
    assert "it is stale: run dvc repro" in line


def test_bundle_scores_and_network_agree(trained):
    """``network()`` (features + one linear layer) gives the probabilities ``scores`` gives."""
    project, photos = trained
    for name in ("logreg", "finetune"):
        b = load_bundle(project / "models", name)
        x = torch.stack([b.transform(load_rgb(p)) for p in _good(photos)])
        net = b.network()
        with torch.no_grad():
            probs = net(x).softmax(1).numpy()
        np.testing.assert_allclose(probs, b.scores(x), atol=1e-5)
        assert b.spec()["name"] == "efficientnet_lite0" and b.spec()["transform"]["crop"] == 224
        x.requires_grad_(True)
        net(x).softmax(1)[:, 0].sum().backward()  # differentiable with respect to the image
        assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with pytest.raises(PipelineError, match="classes=.*stale: run dvc repro"):
        load_bundle(project / "models", "svm", expected={"classes": ["dog", "cat"]})
    with pytest.raises(PipelineError, match="unknown model 'mlp'; accepted: logreg, svm, finetune"):
        load_bundle(project / "models", "mlp")


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
