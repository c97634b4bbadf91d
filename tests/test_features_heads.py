"""The HDF5 cache and the heads: schema, atomic writes, stale-cache refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from pipeline.backbones import load_backbone
from pipeline.config import load_config
from pipeline.data.images import load_rgb
from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.extract.cache import open_cache
from pipeline.extract.local import extract_features
from pipeline.heads.batch import make_head
from pipeline.heads.model import load_head, save_head, scores, to_torch_linear
from pipeline.heads.registry import KINDS


@pytest.fixture
def tiny_images(tmp_path):
    """12 small generated images in two colour classes, plus one corrupt file."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    rows = []
    for label, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(6):
            a = np.clip(rng.normal(colour, 40, size=(40, 56, 3)), 0, 255).astype(np.uint8)
            path = root / f"c{label}" / f"{i}.jpg"
            Image.fromarray(a).save(path)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            rows.append(Row(f"c{label}/{i}.jpg", label, "test" if i < 2 else "train", sha))
    bad = root / "c0" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    rows.append(Row("c0/bad.jpg", 0, "train", hashlib.sha256(bad.read_bytes()).hexdigest()))
    return root, rows


def test_extract_writes_schema_skips_corrupt_and_matches_direct_forward(tmp_path, tiny_images):
    root, rows = tiny_images
    bb = load_backbone("resnet18", "none")
    out = tmp_path / "feat" / "resnet18.h5"
    res = extract_features(bb, root=root, rows=rows, classes=["c0", "c1"], out_path=out, batch_size=5)
    assert res.n_images == 12 and res.n_skipped == 1
    assert res.skipped[0]["path"] == "c0/bad.jpg" and "image" in res.skipped[0]["reason"]
    with h5py.File(out) as h5:
        assert h5["features"].shape == (12, 512)
        assert list(h5["paths"].asstr()[:]) == [r.path for r in rows[:12]]
        assert list(h5["labels"][:]) == [r.label for r in rows[:12]]
        assert json.loads(h5.attrs["classes"]) == ["c0", "c1"]
        assert h5.attrs["weights"] == "none"
        first = h5["features"][0]
    # The cached row equals a direct forward pass of the same image.
    with torch.no_grad():
        direct = bb.features(bb.transform(load_rgb(root / rows[0].path))[None])[0].numpy()
    np.testing.assert_allclose(first, direct, rtol=1e-4, atol=1e-5)
    assert [p.name for p in out.parent.iterdir()] == ["resnet18.h5"]  # no temporary left


def test_failed_extract_leaves_no_file(tmp_path, tiny_images):
    root, rows = tiny_images
    bb = load_backbone("resnet18", "none")

    class Boom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("model crashed")

    bb.features = Boom()
    out = tmp_path / "feat" / "resnet18.h5"
    with pytest.raises(RuntimeError):
        extract_features(bb, root=root, rows=rows, classes=["c0", "c1"], out_path=out)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_changed_image_is_skipped_not_mixed_in(tmp_path, tiny_images):
    root, rows = tiny_images
    rows = rows[:12]
    rows[3] = rows[3]._replace(sha256="0" * 64)  # manifest hash no longer matches
    res = extract_features(
        load_backbone("resnet18", "none"), root=root, rows=rows, classes=["c0", "c1"], out_path=tmp_path / "f.h5"
    )
    assert res.n_images == 11 and "changed since" in res.skipped[0]["reason"]


def test_open_cache_refuses_stale_cache(tmp_path, tiny_images):
    root, rows = tiny_images
    out = tmp_path / "f.h5"
    extract_features(load_backbone("resnet18", "none"), root=root, rows=rows, classes=["c0", "c1"], out_path=out)
    fs = open_cache(out, {"backbone": "resnet18", "classes": ["c0", "c1"]})
    assert fs.subset("train")[0].shape == (8, 512)
    with pytest.raises(PipelineError, match="backbone='resnet18'.*'resnet50'.*dvc repro"):
        open_cache(out, {"backbone": "resnet50"})
    with pytest.raises(PipelineError, match="classes"):
        open_cache(out, {"classes": ["c0", "c1", "c2"]})
    with pytest.raises(PipelineError, match="not found"):
        open_cache(tmp_path / "missing.h5")


#: The estimators as scikit-learn builds them, written here independently of the registry.
REFERENCE = {"logreg": LogisticRegression(max_iter=2000, random_state=0), "svm": LinearSVC(max_iter=2000, random_state=0)}


def _three_blobs():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (30, 8)), rng.normal(2, 1, (30, 8)), rng.normal(-2, 1, (30, 8))])
    return X, np.repeat([0, 1, 2], 30)


@pytest.mark.parametrize("name", ["logreg", "svm"])
def test_head_picks_the_C_with_the_best_cv_score_and_saves_it(tmp_path, name):
    X, y = _three_blobs()
    grid = [0.01, 1.0, 0.1]  # on these blobs the middle candidate is the best for both heads
    # The mean accuracy of each C over the same folds, by scikit-learn directly.
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    expected = [
        cross_val_score(make_pipeline(StandardScaler(), clone(REFERENCE[name]).set_params(C=c)), X, y, cv=folds).mean()
        for c in grid
    ]
    assert len(set(expected)) == len(grid) and int(np.argmax(expected)) == 1  # the choice is not a default

    search = make_head(name, C=grid, cv_folds=3, y=y).fit(X, y)
    assert search.best_params_ == {"clf__C": grid[int(np.argmax(expected))]}
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], expected, rtol=1e-12)
    assert search.best_estimator_.named_steps["scale"].__class__.__name__ == "StandardScaler"
    assert (search.predict(X) == y).mean() > 0.85
    assert scores(search.best_estimator_, X).shape == (90, 3)

    # A feature cache's attributes, as open_cache gives them (what save_head records of the features).
    spec = {"resize": 256, "crop": 224, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225]}
    attrs = {"backbone": "resnet18", "weights": "none", "weights_sha256": "", "transform": "t", "feature_dim": 8,
             "preprocessing": json.dumps(spec), "decoder": "pillow-exact", "precision": "fp32"}
    made = {"backbone": "resnet18", "weights": "none", "git_commit": None}
    path = tmp_path / name
    save_head(path, search, attrs=attrs, made_from=made, classes=["a", "b", "c"], kind=name,
              description=KINDS[name].description)
    assert path.is_dir() and not list(path.glob("*.joblib"))
    estimator, config = load_head(path, {"backbone": "resnet18", "weights": "none", "weights_sha256": "",
                                         "transform": "t", "classes": ["a", "b", "c"]})
    assert config["head"]["best_C"] == grid[int(np.argmax(expected))]
    assert config["head"]["cv_accuracy"] == pytest.approx(max(expected), rel=1e-12)
    assert config["classes"] == ["a", "b", "c"] and config["made_from"] == made
    assert config["preprocessing"] == {**spec, "decoder": "pillow-exact"} and config["precision"] == "fp32"
    np.testing.assert_array_equal(estimator.predict(X), search.predict(X))
    np.testing.assert_array_equal(scores(estimator, X), scores(search.best_estimator_, X))  # bit for bit
    with pytest.raises(PipelineError, match="stale"):
        load_head(path, {"backbone": "vgg16"})
    with pytest.raises(PipelineError, match="stale"):
        load_head(path, {"classes": ["a", "b"]})
    with pytest.raises(PipelineError, match=r"model folder .*missing not found"):
        load_head(tmp_path / "missing")


def test_head_parameter_errors():
    with pytest.raises(PipelineError, match="unknown head kind 'forest'; accepted: logreg, svm"):
        make_head("forest", C=1.0)
    with pytest.raises(PipelineError, match=r"heads.train.logreg.C"):
        make_head("logreg", C=[-1])
    with pytest.raises(PipelineError, match=r"heads.train.svm.C"):
        make_head("svm", C=[])
    with pytest.raises(PipelineError, match="at least 2 training images per class"):
        make_head("logreg", C=1.0, y=np.array([0, 0, 1]))


def test_unknown_params_key_is_named(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("heads:\n  train:\n    logreg:\n      c: [1.0]\n")
    with pytest.raises(PipelineError, match=r"unknown params key 'heads.train.logreg.c'.*here: C, kind, max_iter"):
        load_config(p)
    p.write_text("heads:\n  logreg:\n    C: [1.0]\n")  # the layout before heads.train
    with pytest.raises(PipelineError, match=r"unknown params key 'heads.logreg'.*declared under heads.train"):
        load_config(p)
    p.write_text("heads:\n  train:\n    wide: {C: [1.0]}\n")
    with pytest.raises(PipelineError, match=r"heads.train.wide.kind must be one of logreg, svm, found 'wide'"):
        load_config(p)


def test_heads_are_declared_as_data_with_each_kinds_defaults(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("heads:\n  train:\n    svm: {C: [0.5, 2]}\n    wide: {kind: logreg}\n")
    heads = load_config(p).heads
    assert list(heads.train) == ["svm", "wide"]
    assert heads.head("svm").C == (0.5, 2.0) and heads.head("svm").max_iter == 10000
    assert (heads.head("wide").kind, heads.head("wide").C) == ("logreg", (0.01, 0.1, 1.0))
    with pytest.raises(PipelineError, match="no head 'logreg' under heads.train.*declared: svm, wide"):
        heads.head("logreg")


def test_the_kinds_params_accept_are_the_kinds_the_registry_builds():
    from pipeline.config import HEAD_KINDS

    assert list(HEAD_KINDS) == list(KINDS)


def test_each_declared_head_has_its_stages_outputs_and_plot():
    """dvc.yaml's foreach over heads.train, as DVC resolves it: a train and an evaluate stage per head."""
    from dvc.repo import Repo
    from test_graph import STAGES

    heads = list(load_config(Path(__file__).parents[1] / "params.yaml").heads.train)
    assert sorted(n for n in STAGES if n.startswith("train_heads@")) == sorted(f"train_heads@{h}" for h in heads)
    assert sorted(n for n in STAGES if n.startswith("evaluate@")) == sorted(f"evaluate@{h}" for h in heads)
    with Repo(str(Path(__file__).parents[1])) as repo:
        stages = {s.name: s for s in repo.index.stages}
        for h in heads:
            evaluate = stages[f"evaluate@{h}"]
            assert f"data/heads/{h}" in {d.def_path for d in evaluate.deps}
            assert "data/prepared/dataset.json" in {d.def_path for d in evaluate.deps}
            assert f"models/{h}" in {o.def_path for o in evaluate.outs}  # the published model folder
            plots = {o.def_path: o for o in evaluate.outs if o.plot}
            assert f"reports/confusion_{h}.csv" in plots and f"reports/metrics_{h}.json" in {
                o.def_path for o in evaluate.outs if o.metric}
            outs = {o.def_path for o in stages[f"train_heads@{h}"].outs}
            assert outs >= {f"data/heads/{h}", f"reports/cv_{h}.json"}


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", ["logreg", "svm"])
def test_head_folds_into_one_torch_linear(name, n_classes):
    rng = np.random.default_rng(1)
    X = rng.normal(3, 5, (40 * n_classes, 6)) + np.repeat(np.arange(n_classes), 40)[:, None] * 2
    y = np.repeat(np.arange(n_classes), 40)
    est = make_head(name, C=[1.0], cv_folds=2).fit(X, y).best_estimator_
    with torch.no_grad():
        logits = to_torch_linear(est)(torch.from_numpy(X).float()).double().numpy()
    np.testing.assert_array_equal(logits.argmax(1), est.predict(X))
    if name == "logreg":
        prob = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(prob / prob.sum(1, keepdims=True), est.predict_proba(X), atol=1e-5)
