"""Streaming heads: SGD over HDF5 chunks matches the in-memory logistic regression."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pipeline.backbones import load_backbone
from pipeline.data.manifest import Row, read_prepared, stratified_holdout
from pipeline.data.sources import prepare
from pipeline.errors import PipelineError
from pipeline.metrics import head_metrics
from pipeline.extract.cache import CHECKED_ATTRS, CacheWriter, cache_attrs, open_cache
from pipeline.extract.local import extract_features
from pipeline.heads.batch import make_head
from pipeline.heads.model import load_head, scores, to_torch_linear
from pipeline.heads.streaming import StreamingHead
from pipeline.heads.train import train_head
from pipeline.provenance import BACKBONE_KEYS, check_made_from

LOGREG_C = [0.01, 0.1, 1.0]  # the default grid of params.yaml
CHUNK = 16  # rows per read: 192 train rows -> a dozen chunks and more


@pytest.fixture(scope="module")
def catsdogs_features(tmp_path_factory, catsdogs):
    """Real efficientnet_lite0 features of the 240 catsdogs photos, extracted once."""
    folder = catsdogs
    work = tmp_path_factory.mktemp("ooc")
    prepare(source="folder", folder=folder, out_dir=work / "prepared")
    p = read_prepared(work / "prepared")
    out = work / "features" / "efficientnet_lite0.h5"
    extract_features(load_backbone("efficientnet_lite0"), root=p.root, rows=p.rows, classes=p.classes, out_path=out)
    return out


def _exact_holdout_accuracy(features_file, grid, fraction=0.2, seed=0) -> list[float]:
    """Held-out accuracy per C of the exact logistic regression, computed here independently:
    the stratified hold-out of the train rows, scaler and LogisticRegression fitted on the rest."""
    fs = open_cache(features_file)
    rows = np.flatnonzero(fs.splits == "train")
    held = stratified_holdout(rows.tolist(), fs.labels[rows].tolist(), fraction, seed)
    fit, val = rows[~held], rows[held]
    scaler = StandardScaler().fit(fs.features[fit])
    out = []
    for c in grid:
        clf = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(fs.features[fit]), fs.labels[fit])
        out.append(float(np.mean(clf.predict(scaler.transform(fs.features[val])) == fs.labels[val])))
    return out


@pytest.mark.sample_data
def test_streamed_logreg_matches_in_memory_and_reads_only_chunks(catsdogs_features, monkeypatch):
    fs = open_cache(catsdogs_features)
    X, y = fs.subset("train")
    Xt, yt = fs.subset("test")
    assert len(y) > 10 * CHUNK  # the chunk is much smaller than the data
    search = make_head("logreg", C=LOGREG_C, y=y).fit(X, y)
    in_memory = head_metrics(yt, search.predict(Xt), scores(search, Xt), len(fs.classes))

    # Every read of the cache (features, labels, splits) brings at most CHUNK rows.
    reads: list[tuple[str, int]] = []
    getitem = h5py.Dataset.__getitem__

    def spy(self, args, *rest, **kw):
        out = getitem(self, args, *rest, **kw)
        if self.name.lstrip("/") in ("features", "labels", "splits", "paths", "sha256"):
            reads.append((self.name, int(np.shape(out)[0]) if np.ndim(out) else 1))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    streamed_fs = open_cache(catsdogs_features, stream=True, chunk_rows=CHUNK)
    head = StreamingHead("logreg", C=LOGREG_C, epochs=10).fit(streamed_fs)
    y_true, pred, s = streamed_fs.predict(head.best_estimator_, "test", scores)
    monkeypatch.undo()

    feature_reads = [n for name, n in reads if name == "/features"]
    assert feature_reads and max(n for _, n in reads) <= CHUNK, max(reads, key=lambda r: r[1])
    assert sum(feature_reads) > 10 * len(y)  # several epochs, all streamed
    np.testing.assert_array_equal(y_true, yt)  # test rows in file order, as the in-memory cache gives them
    streamed = head_metrics(y_true, pred, s, len(fs.classes))
    assert streamed["n_test"] == in_memory["n_test"] == len(yt)
    assert streamed["accuracy"] >= in_memory["accuracy"] - 0.01, (streamed, in_memory)

    # C is chosen on the stratified hold-out (19 of each class's 96 train rows),
    # where each candidate scores as the exact solution does, within one image.
    assert head.n_train_ == 192 and head.n_validation_ == 38
    exact = _exact_holdout_accuracy(catsdogs_features, LOGREG_C)
    assert list(head.scores_) == LOGREG_C
    np.testing.assert_allclose(list(head.scores_.values()), exact, atol=1 / 38 + 1e-9)
    best = LOGREG_C[int(np.argmax(list(head.scores_.values())))]  # the first of equals
    assert head.best_params_ == {"clf__C": best} and head.best_score_ == head.scores_[best]


@pytest.mark.sample_data
def test_train_head_streams_saves_and_folds_into_torch(catsdogs_features, tmp_path):
    summary = train_head(
        name="logreg", features_file=catsdogs_features, heads_dir=tmp_path / "heads", C=LOGREG_C,
        out_of_core=True, epochs=5, chunk_rows=CHUNK, seed=0, report_path=tmp_path / "cv_logreg.json",
    )
    exact = _exact_holdout_accuracy(catsdogs_features, LOGREG_C)
    assert summary["n_train"] == 192
    assert summary["best_C"] == LOGREG_C[int(np.argmax(exact))]
    assert summary["cv_accuracy"] == pytest.approx(max(exact), abs=1 / 38 + 1e-9)
    report = json.loads((tmp_path / "cv_logreg.json").read_text())
    assert report.keys() == {"logreg", "made_from"} and report["logreg"] == summary

    fs = open_cache(catsdogs_features)
    expected = {k: fs.attrs[k] for k in BACKBONE_KEYS if k in fs.attrs}
    expected["classes"] = fs.classes
    est, config = load_head(tmp_path / "heads" / "logreg", expected)
    assert config["head"]["best_C"] == summary["best_C"]
    # It records the features it was fitted on: every checked attribute of the cache, and the preprocessing.
    recorded = {k: v for k, v in config["made_from"].items() if k != "git_commit"}
    assert recorded == {**{k: fs.attrs[k] for k in CHECKED_ATTRS if k in fs.attrs}, "heads_backbones": []}
    assert config["preprocessing"] == {**json.loads(fs.attrs["preprocessing"]), "decoder": fs.attrs["decoder"]}
    assert list(est.named_steps) == ["scale", "clf"]
    Xt, _ = fs.subset("test")
    layer = to_torch_linear(est)
    with torch.no_grad():
        logits = layer(torch.from_numpy(Xt)).double()
    np.testing.assert_array_equal(logits.argmax(1).numpy(), est.predict(Xt))
    np.testing.assert_allclose(logits.softmax(1).numpy(), est.predict_proba(Xt), rtol=1e-4, atol=1e-5)
    with pytest.raises(PipelineError, match="stale"):
        load_head(tmp_path / "heads" / "logreg", dict(expected, weights_sha256="0" * 64))
    # Features decoded otherwise are refused where the head is scored on them (evaluate's check).
    check_made_from(config["made_from"], fs.attrs, (), "head", "cache")
    with pytest.raises(PipelineError, match="head was made from decoder=.*the head is stale"):
        check_made_from(config["made_from"], dict(fs.attrs, decoder="another"), (), "head", "cache")

    # The hinge head has no probabilities: scores are its margins, and it folds too.
    svm = StreamingHead("svm", C=0.001, epochs=3).fit(open_cache(catsdogs_features, stream=True, chunk_rows=CHUNK))
    assert svm.n_validation_ == 0 and np.isnan(svm.best_score_)  # one candidate: nothing held out
    est = svm.best_estimator_
    assert not hasattr(est, "predict_proba") and not hasattr(svm, "predict_proba")
    with torch.no_grad():
        margin = to_torch_linear(est)(torch.from_numpy(Xt)).double().numpy()
    np.testing.assert_allclose(margin[:, 1], est.decision_function(Xt), rtol=1e-4, atol=1e-4)


@pytest.mark.sample_data
def test_train_head_in_memory_is_make_head_on_the_cache(catsdogs_features, tmp_path):
    """The in-memory path of train_head fits exactly make_head's GridSearchCV (same folds, same seed)."""
    summary = train_head(name="svm", features_file=catsdogs_features, heads_dir=tmp_path, C=[1e-4, 1e-3],
                         max_iter=10000, cv_folds=5, seed=0, report_path=tmp_path / "cv_svm.json")
    fs = open_cache(catsdogs_features)
    X, y = fs.subset("train")
    search = make_head("svm", C=[1e-4, 1e-3], max_iter=10000, cv_folds=5, seed=0, y=y).fit(X, y)
    assert summary == {"best_C": search.best_params_["clf__C"], "cv_accuracy": round(search.best_score_, 6),
                       "n_train": 192}
    saved, _ = load_head(tmp_path / "svm")
    np.testing.assert_array_equal(saved.decision_function(X), search.best_estimator_.decision_function(X))


def _tiny_cache(path, splits, labels=None, dim=4, shift=0.0):
    """A cache written by the one writer; class 1 sits ``shift`` away from class 0 on the first axis."""
    n = len(splits)
    labels = np.arange(n) % 2 if labels is None else np.asarray(labels)
    X = np.random.default_rng(0).normal(size=(n, dim)).astype("f4")
    X[:, 0] += np.where(labels == 1, shift, -shift)
    rows = [Row(f"{c}/{i}.jpg", int(c), s, "0" * 64) for i, (c, s) in enumerate(zip(labels, splits))]
    prov = {"backbone": "b", "weights": "w", "weights_sha256": "", "transform": "t"}
    with CacheWriter(path, dim, cache_attrs(prov, ["a", "b"], "pillow", "fp32", dim)) as w:
        w.append(X, rows)
    return path


@pytest.mark.parametrize("name", ["logreg", "svm"])
def test_streamed_C_is_the_best_on_the_holdout_and_the_first_of_equals(tmp_path, name):
    # 160 rows of class 0, 40 of class 1, well apart: a tiny C shrinks w to
    # nothing and predicts the majority (32 of the 40 held-out rows), C=1 all of them.
    cache = _tiny_cache(tmp_path / "f.h5", ["train"] * 200, labels=[0] * 160 + [1] * 40, shift=4.0)

    def fit(grid):
        return StreamingHead(name, C=grid, epochs=5).fit(open_cache(cache, stream=True, chunk_rows=32))

    for grid in ([1e-6, 1.0], [1.0, 1e-6]):
        head = fit(grid)
        assert head.n_validation_ == 40  # round(0.2 * 160) + round(0.2 * 40)
        assert head.scores_ == {1e-6: 0.8, 1.0: 1.0}
        assert head.best_params_ == {"clf__C": 1.0} and head.best_score_ == 1.0
    assert fit([1.0, 2.0]).best_params_ == {"clf__C": 1.0}
    assert fit([2.0, 1.0]).best_params_ == {"clf__C": 2.0}


def test_streaming_head_is_a_scikit_learn_estimator(tmp_path):
    head = StreamingHead("svm", C=[0.1, 1.0], epochs=2, seed=3)
    assert head.get_params() == {"name": "svm", "C": [0.1, 1.0], "epochs": 2, "seed": 3,
                                 "val_fraction": 0.2, "pieces": 8}
    assert not [k for k in vars(head) if k.endswith("_")]  # __init__ stores parameters only
    with pytest.raises(NotFittedError):
        head.predict(np.zeros((1, 4)))
    cache = _tiny_cache(tmp_path / "f.h5", ["train"] * 40, shift=3.0)
    fitted = clone(head).fit(open_cache(cache, stream=True, chunk_rows=8))
    assert isinstance(fitted, StreamingHead) and list(fitted.classes_) == [0, 1]
    X = np.random.default_rng(1).normal(size=(5, 4))
    np.testing.assert_array_equal(fitted.predict(X), fitted.best_estimator_.predict(X))
    assert hasattr(clone(head).set_params(name="logreg").fit(open_cache(cache, stream=True, chunk_rows=8)),
                   "predict_proba")


def test_bad_settings_and_files_are_one_line_errors(tmp_path):
    cache = _tiny_cache(tmp_path / "f.h5", ["test"] * 6)
    with pytest.raises(PipelineError, match="no train rows"):
        StreamingHead("logreg").fit(open_cache(cache, stream=True, chunk_rows=4))
    cache = _tiny_cache(tmp_path / "g.h5", ["train"] * 6, labels=[0] * 6)
    with pytest.raises(PipelineError, match=r"classes without training images in .*g.h5: \['b'\]"):
        StreamingHead("logreg").fit(open_cache(cache, stream=True, chunk_rows=4))
    cache = _tiny_cache(tmp_path / "h.h5", ["train"] * 6)
    with pytest.raises(PipelineError, match="chunk_rows"):
        open_cache(cache, stream=True, chunk_rows=1)
    streamed = open_cache(cache, stream=True, chunk_rows=4)
    with pytest.raises(PipelineError, match=r"heads\.train\.logreg\.C must be"):
        StreamingHead("logreg", C=[0]).fit(streamed)
    with pytest.raises(PipelineError, match="heads.epochs"):
        StreamingHead("logreg", epochs=0).fit(streamed)
    with pytest.raises(PipelineError, match="unknown head kind 'forest'; accepted: logreg, svm"):
        StreamingHead("forest").fit(streamed)
    with pytest.raises(PipelineError, match="stale"):
        open_cache(cache, {"backbone": "other"}, stream=True)
    with pytest.raises(PipelineError, match="not found"):
        open_cache(tmp_path / "missing.h5", stream=True)
    with pytest.raises(PipelineError, match=r"heads\.train\.svm\.C must be"):  # checked before the cache is read
        train_head(name="svm", features_file=tmp_path / "missing.h5", heads_dir=tmp_path, C="big")
