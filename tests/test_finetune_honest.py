"""Fine-tuning's honest validation slice: no fitted head sees it, epoch 0 (the head) can win, and then the
model is the guard's head: the same logistic regression refit on the whole train split."""

from __future__ import annotations

import dataclasses
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.backbones import load_backbone
from pipeline.config import (
    BackboneConfig,
    Config,
    EvaluateConfig,
    ExtractConfig,
    FinetuneConfig,
)
from pipeline.data.manifest import read_prepared
from pipeline.data.sources import prepare
from pipeline.extract.cache import open_cache
from pipeline.extract.stage import run_extract
from pipeline.finetune.checkpoint import load_finetuned
from pipeline.finetune.data import split_validation
from pipeline.finetune.network import build_network
from pipeline.finetune.stage import run_finetune
from pipeline.finetune.warmstart import fit_warm_start
from pipeline.heads.model import to_torch_linear

pytestmark = pytest.mark.sample_data


@pytest.fixture
def small_project(tmp_path, catsdogs):
    """Eight photos of each class, prepared and extracted through efficientnet_lite0: the real cache."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path / "photos"
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for f in sorted((catsdogs / c).iterdir())[:8]:
            shutil.copy2(f, folder / c / f.name)
    prepare(source="folder", out_dir=tmp_path / "prepared", folder=str(folder), test_fraction=0.25, seed=0)
    backbone = BackboneConfig(name="efficientnet_lite0", weights="DEFAULT")
    run_extract(backbone=backbone, extract=ExtractConfig(store="", precision="fp32", compile=False),
                prepared_dir=tmp_path / "prepared", out_dir=tmp_path / "features")
    # Training that can only make the head worse (lr 10 on the head), so epoch 0
    # must win: real features give the head a validation score to keep. The
    # backbone's last stage trains too, so that every weight moves in epoch 1.
    # One C: cross-validation over a grid on 8 photos would be this test's noise, not its subject.
    ft = FinetuneConfig(epochs=1, batch_size=4, unfreeze="last", lr_head=10.0, val_fraction=0.25,
                        device="cpu", precision="fp32", patience=1, head_C=[0.1])
    cfg = Config(backbone=backbone, finetune=ft, evaluate=EvaluateConfig())
    yield tmp_path, cfg
    torch.set_num_threads(threads)


def _poison(cache, paths) -> None:
    """NaN features for ``paths``: a head fitted on any of them raises."""
    with h5py.File(cache, "r+") as h5:
        listed = h5["paths"].asstr()[:]
        for i in np.flatnonzero(np.isin(listed, list(paths))):
            h5["features"][i] = np.nan


def _run(tmp_path, cfg):
    return run_finetune(cfg, prepared_dir=tmp_path / "prepared", features_dir=tmp_path / "features",
                        out_dir=tmp_path / "models/finetune", live_dir=tmp_path / "dvclive",
                        reports_dir=tmp_path / "reports", cache_dir=tmp_path / "cache")


def test_no_validation_image_reaches_the_warm_start_head(small_project, capsys):
    tmp_path, cfg = small_project
    train = read_prepared(tmp_path / "prepared").split("train")
    fit_rows, val_rows = split_validation(train, cfg.finetune.val_fraction, cfg.finetune.seed)
    assert len(val_rows) == 4 and len(fit_rows) == 8
    cache = tmp_path / "features/efficientnet_lite0.h5"
    _poison(cache, [r.path for r in val_rows])

    # The validation photos' features are NaN: the warm start and the choice of the epoch run
    # on the other photos; only the guard's head, fitted once the choice is made, reads them all.
    with pytest.raises(ValueError, match="NaN"):
        _run(tmp_path, cfg)
    out = capsys.readouterr().out
    assert "fitted on the cached features of 8 train photos; 4 held out for validation" in out
    assert "epoch 0 (the warm-start head): validation" in out and "finetune: epoch 1: " in out
    assert "fine-tuning did not beat the warm-start head on the validation slice; keeping the head's weights" in out
    # The check can fail: poison one photo of the fitting part and the warm start refuses it at once.
    _poison(cache, [fit_rows[0].path])
    with pytest.raises(ValueError, match="NaN"):
        _run(tmp_path, cfg)
    assert "finetune: epoch" not in capsys.readouterr().out


def test_when_the_head_wins_the_model_is_the_guards_head(small_project, capsys):
    """Epoch 1 (lr 10) loses to epoch 0: the model is the backbone as loaded with the head refit on all photos."""
    tmp_path, cfg = small_project
    train = read_prepared(tmp_path / "prepared").split("train")
    cache = tmp_path / "features/efficientnet_lite0.h5"
    result = _run(tmp_path, cfg)
    out = capsys.readouterr().out
    assert result.best_epoch == 0, out
    assert result.history[1]["val/loss"] != result.history[0]["val/loss"]  # epoch 1 did move the weights
    assert "no epoch beat the warm-start head on validation; the model is a logreg head (C=0.1, refit on all " \
           "12 train photos)" in out
    net, info = load_finetuned(tmp_path / "models/finetune")
    assert info["training"]["best_epoch"] == 0 and info["warm_start"] == {"head": "logreg", "C": 0.1, "n_train": 8}
    guard = build_network(load_backbone("efficientnet_lite0", "DEFAULT").features,
                          fit_warm_start(open_cache(cache), train, C=[0.1], seed=0, source=cache)).state_dict()
    saved = load_file(tmp_path / "models/finetune/model.safetensors")
    assert saved.keys() == guard.keys()
    differ = [k for k, v in guard.items() if not torch.equal(saved[k], v)]
    assert not differ, f"models/finetune is not the guard's network: {differ[:5]} ... ({len(differ)} tensors)"
    report = json.loads((tmp_path / "reports/finetune_metrics.json").read_text())
    assert set(report["finetune"]) == {"accuracy", "mean_class_accuracy", "macro_f1", "n_test"}
    assert report["finetune"]["n_test"] == 4
    assert report["finetune_run"]["kept"] == info["kept"] == "logreg head (C=0.1, refit on all 12 train photos)"
    assert report["finetune_run"]["wall_seconds"] >= report["finetune_run"]["training_seconds"] > 0
    assert info["metrics"] == report["finetune"]  # the model folder records the same test metrics


def test_the_guards_head_is_the_logistic_regression_of_the_whole_train_split(small_project):
    """With nothing trained (epochs 0), the network's head equals scaler + logistic regression on every train photo."""
    tmp_path, cfg = small_project
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, epochs=0))
    _run(tmp_path, cfg)
    net, _ = load_finetuned(tmp_path / "models/finetune")
    train = read_prepared(tmp_path / "prepared").split("train")
    with h5py.File(tmp_path / "features/efficientnet_lite0.h5", "r") as h5:
        rows = np.isin(h5["paths"].asstr()[:], [r.path for r in train])
        X, y = h5["features"][:][rows], h5["labels"][:][rows]
    assert len(y) == 12
    reference = Pipeline([("scale", StandardScaler()),
                          ("clf", LogisticRegression(C=0.1, max_iter=2000, random_state=0))]).fit(X, y)
    expected = to_torch_linear(reference)
    torch.testing.assert_close(net.head.weight, expected.weight, atol=1e-4, rtol=1e-4)
