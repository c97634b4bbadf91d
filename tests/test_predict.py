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
from helpers_models import BACKBONE, good_photos as _good
from safetensors.torch import load_file

from pipeline.__main__ import main
from pipeline.backbones import load_backbone
from pipeline.data.images import load_rgb
from pipeline.errors import PipelineError
from pipeline.extract.cache import features_path
from pipeline.heads.batch import make_head
from pipeline.config import HeadsConfig
from pipeline.heads.model import load_head, save_head
from pipeline.heads.train import train_head
from pipeline.serve.bundle import load_bundle

pytestmark = pytest.mark.sample_data


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _predict(capsys, *args):
    """Run ``python -m pipeline predict`` in this process: (exit status, stdout, stderr)."""
    try:
        main(["predict", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


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


def test_good_files_only_exit_zero(stale, capsys):
    project, photos = stale
    # The test accuracies predict ranks by, in each folder's config.json (6 test photos score
    # every model alike): svm "best", so the default choice is visible.
    for name, accuracy in (("logreg", 0.95), ("svm", 0.97), ("finetune", 0.96)):
        config = json.loads((project / "models" / name / "config.json").read_text())
        config["metrics"]["accuracy"] = accuracy
        (project / "models" / name / "config.json").write_text(json.dumps(config))
    code, out, err = _predict(capsys, *_good(photos), "--project", project, "--top-k", "1")
    assert code == 0, err
    lines = out.splitlines()
    # Default: the best by recorded test accuracy, here the SVM.
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


def test_a_failed_fine_tuning_ends_as_the_users_logreg_head(trained, pretrained, capsys, tmp_path):
    """The guard: no epoch beats the warm start (lr 10), so the model is the logreg head, photo for photo.

    The reference is the head ``train_heads@logreg`` fits with the default
    params (the logreg grid, 5 folds, seed 0) on the whole train split; the
    fine-tuned model is scored through ``predict`` on photos it never saw.
    """
    project, photos = trained
    info = json.loads((project / "models/finetune/config.json").read_text())
    assert info["training"]["best_epoch"] == 0 and info["warm_start"]["n_train"] == 14, info
    assert info["kept"] == f"logreg head (C={info['kept'].split('C=')[1].split(',')[0]}, refit on all 18 train photos)"
    code, out, _ = _predict(capsys, *_good(photos), "--project", project, "--json", "--model", "finetune")
    assert code == 0
    predicted = {p["path"]: {t["class"]: t["score"] for t in p["top"]} for p in json.loads(out)["predictions"]}

    features = features_path(project / "data/features", BACKBONE.name)
    defaults = HeadsConfig()
    head = defaults.head("logreg")
    train_head(name="logreg", kind=head.kind, features_file=features, heads_dir=tmp_path, C=list(head.C),
               max_iter=head.max_iter, cv_folds=defaults.cv_folds, seed=defaults.seed)
    users, _ = load_head(tmp_path / "logreg")
    expected = users.predict_proba(pretrained[0])
    for path, probs in zip(_good(photos), expected):
        got = [predicted[str(path)][c] for c in ("cat", "dog")]
        np.testing.assert_allclose(got, probs, atol=1e-3)
        assert np.argmax(got) == np.argmax(probs)
    assert float(users.named_steps["clf"].C) == float(info["kept"].split("C=")[1].split(",")[0])


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
    attrs = dict(bb.provenance(), weights="weights/r18.pt", feature_dim=bb.feature_dim, decoder="pillow-exact",
                 precision="fp32", preprocessing=json.dumps(bb.transform_spec.to_dict()))
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(8, bb.feature_dim)), np.array([0, 1] * 4)
    save_head(project / "models" / "logreg", make_head("logreg", C=[1.0], cv_folds=2).fit(X, y), attrs=attrs,
              made_from={}, classes=["cat", "dog"], kind="logreg", description="logistic regression")
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
    assert f"head {project / 'models' / 'logreg'} was made with weights_sha256=" in line
    assert "it is stale: run dvc repro" in line


def test_bundle_scores_and_network_agree(trained, pretrained):
    """``scores`` and ``network()`` both give what the saved weights compute, worked out without the bundle.

    The reference: the photos' features through a freshly loaded backbone
    (the fixture's fine-tuning trains the head only), then for a head
    scikit-learn's own scores, for the fine-tuned network the head layer of
    ``models/finetune/model.safetensors`` applied by hand in float64.
    """
    project, photos = trained
    X, x = pretrained
    saved = load_file(project / "models/finetune/model.safetensors")
    W, bias = saved["head.weight"].double().numpy(), saved["head.bias"].double().numpy()
    reference = {
        "logreg": load_head(project / "models/logreg")[0].predict_proba(X),
        "finetune": _softmax(X @ W.T + bias),
    }
    for name, expected in reference.items():
        b = load_bundle(project / "models", name)
        torch.testing.assert_close(torch.stack([b.transform(load_rgb(p)) for p in _good(photos)]), x)
        net = b.network()
        with torch.no_grad():
            probs = net(x).softmax(1).numpy()
        np.testing.assert_allclose(b.scores(x), expected, atol=1e-5, err_msg=f"{name}: scores")
        np.testing.assert_allclose(probs, expected, atol=1e-5, err_msg=f"{name}: network()")
        assert b.config["backbone"]["name"] == "efficientnet_lite0" and b.transform_spec.crop == 224
        x_grad = x[:1].clone().requires_grad_(True)
        net(x_grad).softmax(1)[:, 0].sum().backward()  # differentiable with respect to the image
        assert x_grad.grad is not None and float(x_grad.grad.abs().sum()) > 0
    with pytest.raises(PipelineError, match="classes=.*stale: run dvc repro"):
        load_bundle(project / "models", "svm", expected={"classes": ["dog", "cat"]})
    with pytest.raises(PipelineError, match="no model 'mlp' .*; saved in .*: logreg, svm, finetune"):
        load_bundle(project / "models", "mlp")


def test_without_metrics_the_model_must_be_named(stale, capsys):
    project, photos = stale
    for name in ("logreg", "svm", "finetune"):  # as a head's folder before evaluate publishes it
        config = json.loads((project / "models" / name / "config.json").read_text())
        (project / "models" / name / "config.json").write_text(json.dumps(dict(config, metrics={})))
    code, _, err = _predict(capsys, photos, "--project", project)
    assert code == 1
    assert "no best model to pick; run dvc repro, or choose one with --model" in _error_line(err)


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
