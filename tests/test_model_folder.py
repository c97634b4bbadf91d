"""Model folders: config.json + model.safetensors + README.md, exact round trips, portable, and every refusal."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from helpers_models import good_photos

from pipeline.backbones import load_backbone
from pipeline.data.images import load_rgb
from pipeline.errors import PipelineError
from pipeline.extract.cache import features_path, open_cache
from pipeline.finetune.checkpoint import save_finetuned
from pipeline.heads.batch import make_head
from pipeline.heads.model import load_head, save_head, scores
from pipeline.heads.streaming import StreamingHead
from pipeline.model_folder import CONFIG, WEIGHTS, is_pickle, read_model
from pipeline.provenance import FORMAT_VERSION
from pipeline.serve.bundle import load_bundle

pytestmark = pytest.mark.sample_data


def _cache(project):
    return open_cache(features_path(project / "data/features", "efficientnet_lite0"))


@pytest.mark.parametrize("kind", ["logreg", "svm", "streaming-logreg"])
def test_a_saved_head_scores_bit_for_bit_as_the_fitted_one(trained, tmp_path, kind):
    project, _ = trained
    fs = _cache(project)
    X, y = fs.subset("train")
    if kind == "streaming-logreg":
        fitted = StreamingHead("logreg", C=[0.1, 1.0], epochs=3).fit(open_cache(
            features_path(project / "data/features", "efficientnet_lite0"), stream=True, chunk_rows=8))
    else:
        fitted = make_head(kind, C=[0.01, 1.0], cv_folds=2, y=y).fit(X, y)
    save_head(tmp_path / "h", fitted, attrs=fs.attrs, made_from={"x": 1}, classes=fs.classes, kind=kind,
              description=kind)
    loaded, config = load_head(tmp_path / "h")
    X_all = fs.features
    for method in ("predict", "decision_function") + (("predict_proba",) if kind != "svm" else ()):
        want, got = getattr(fitted.best_estimator_, method)(X_all), getattr(loaded, method)(X_all)
        assert want.tobytes() == got.tobytes(), method
    assert scores(loaded, X_all).tobytes() == scores(fitted.best_estimator_, X_all).tobytes()
    assert config["preprocessing"]["crop"] == 224 and config["preprocessing"]["decoder"] == fs.attrs["decoder"]
    assert config["classes"] == fs.classes and config["format_version"] == FORMAT_VERSION


def test_the_network_round_trip_scores_within_1e6(trained, tmp_path):
    project, photos = trained
    b = load_bundle(project / "models/finetune")
    with torch.no_grad():  # a network that is not the fixture's warm start: its weights moved
        for p in b.net.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    bb = load_backbone(b.config["backbone"]["name"], "DEFAULT")
    save_finetuned(tmp_path / "finetune", b.net, bb, b.classes, precision="fp32", made_from={})
    again = load_bundle(tmp_path / "finetune")
    x = torch.stack([b.transform(load_rgb(p)) for p in good_photos(photos)])
    assert np.abs(again.scores(x) - b.scores(x)).max() <= 1e-6
    assert np.abs(again.scores(x) - load_bundle(project / "models/finetune").scores(x)).max() > 1e-6  # it moved
    assert set(os.listdir(tmp_path / "finetune")) == {CONFIG, WEIGHTS, "README.md"}


def test_models_hold_folders_without_pickles_and_a_card(trained):
    project, _ = trained
    models = project / "models"
    assert sorted(os.listdir(models)) == ["finetune", "logreg", "svm"]
    for folder in models.iterdir():
        assert set(os.listdir(folder)) == {CONFIG, WEIGHTS, "README.md"}, folder
        assert not any(is_pickle(f) for f in folder.iterdir()), folder
        card = (folder / "README.md").read_text()
        config = read_model(folder)
        assert f"| accuracy | {config['metrics']['accuracy']:.4f} |" in card
        assert "cat 9, dog 9" in card and "efficientnet_lite0" in card  # class counts (train), backbone
        assert f"python -m pipeline predict --model path/to/{folder.name}" in card


def test_a_copied_folder_predicts_the_same_from_anywhere(trained, tmp_path):
    """No params.yaml, no dvc.yaml, no repository: the copy's top-k equals the project's."""
    project, photos = trained
    copy = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(project / "models/logreg", copy)
    cwd = tmp_path / "somewhere-else"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def predict(model, where):
        run = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--model", str(model), "--json",
                              "--top-k", "2", *map(str, good_photos(photos))],
                             cwd=where, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)["predictions"]

    inside = predict("models/logreg", project)
    assert not (cwd / "params.yaml").exists() and not (copy.parent / "dvc.yaml").exists()
    assert predict(copy, cwd) == inside
    assert len(inside) == 4 and all(len(p["top"]) == 2 for p in inside)


@pytest.fixture
def copy(trained, tmp_path):
    project, _ = trained
    folder = tmp_path / "logreg"
    shutil.copytree(project / "models/logreg", folder)
    return folder


def test_a_pickle_is_refused_given_or_planted(copy, tmp_path):
    given = tmp_path / "logreg.joblib"
    given.write_bytes(pickle.dumps({"estimator": "anything"}))
    with pytest.raises(PipelineError, match=r"logreg.joblib is a pickle, which can run code when opened"):
        load_bundle(given)
    planted = copy / "extra.dat"  # a pickle by content, whatever its name
    planted.write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    with pytest.raises(PipelineError, match=r"holds extra.dat: pickles can run code when opened"):
        load_bundle(copy)


def test_tampered_weights_are_refused(copy):
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[-1] ^= 1  # one bit of one number
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"model.safetensors has sha256 .* but .*config.json records .*: the file "
                                            r"was changed or damaged; copy the model folder again"):
        load_bundle(copy)


def test_a_wrong_class_count_is_refused(copy):
    config = json.loads((copy / CONFIG).read_text())
    config["classes"].append("rabbit")
    (copy / CONFIG).write_text(json.dumps(config))
    with pytest.raises(PipelineError, match=r"config.json lists 3 classes but its weights score 2"):
        load_bundle(copy)


def test_a_missing_config_is_refused(copy):
    (copy / CONFIG).unlink()
    with pytest.raises(PipelineError, match=r"has no config.json, so it is not a model folder"):
        load_bundle(copy)


def test_a_future_format_is_refused(copy):
    config = json.loads((copy / CONFIG).read_text())
    (copy / CONFIG).write_text(json.dumps(dict(config, format_version=FORMAT_VERSION + 1)))
    with pytest.raises(PipelineError, match=rf"written by a newer transfer-pipeline \(model format "
                                            rf"{FORMAT_VERSION + 1}; this one reads up to {FORMAT_VERSION}\): upgrade"):
        load_bundle(copy)
