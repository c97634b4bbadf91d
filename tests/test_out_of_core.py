"""Out-of-core heads: SGD over HDF5 chunks matches the in-memory logistic regression."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from conftest import sample_folder
from pipeline.backbones import load_backbone
from pipeline.data.manifest import read_prepared
from pipeline.data.sources import prepare
from pipeline.errors import PipelineError
from pipeline.evaluate import head_metrics
from pipeline.extract.local import CHECKED_ATTRS, extract_features, read_features
from pipeline.heads.batch import load_head, make_head, scores, to_torch_linear
from pipeline.heads.streaming import fit_out_of_core, open_features, train_head_out_of_core

LOGREG_C = [0.01, 0.1, 1.0]  # the default grid of params.yaml
CHUNK = 16  # rows per read: 192 train rows -> a dozen chunks and more


@pytest.fixture(scope="module")
def catsdogs_features(tmp_path_factory):
    """Real efficientnet_lite0 features of the 240 catsdogs photos, extracted once."""
    folder = sample_folder("catsdogs")
    work = tmp_path_factory.mktemp("ooc")
    prepare(source="folder", folder=folder, out_dir=work / "prepared")
    p = read_prepared(work / "prepared")
    out = work / "features" / "efficientnet_lite0.h5"
    extract_features(load_backbone("efficientnet_lite0"), root=p.root, rows=p.rows, classes=p.classes, out_path=out)
    return out


@pytest.mark.sample_data
def test_out_of_core_logreg_matches_in_memory_and_reads_only_chunks(catsdogs_features, monkeypatch):
    fs = read_features(catsdogs_features)
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
    ooc = fit_out_of_core(catsdogs_features, name="logreg", C=LOGREG_C, chunk_rows=CHUNK, epochs=10)
    y_true, pred, s = open_features(catsdogs_features, chunk_rows=CHUNK).predict(ooc.best_estimator_, "test")
    monkeypatch.undo()

    feature_reads = [n for name, n in reads if name == "/features"]
    assert feature_reads and max(n for _, n in reads) <= CHUNK, max(reads, key=lambda r: r[1])
    assert sum(feature_reads) > 10 * len(y)  # several epochs, all streamed
    np.testing.assert_array_equal(y_true, yt)  # test rows in file order, as read_features gives them
    streamed = head_metrics(y_true, pred, s, len(fs.classes))
    assert streamed["n_test"] == in_memory["n_test"] == len(yt)
    assert streamed["accuracy"] >= in_memory["accuracy"] - 0.01, (streamed, in_memory)
    assert set(ooc.scores_) == set(LOGREG_C) and ooc.best_params_["clf__C"] in LOGREG_C


@pytest.mark.sample_data
def test_saved_out_of_core_head_loads_and_folds_into_torch(catsdogs_features, tmp_path):
    summary = train_head_out_of_core(
        name="logreg", features_file=catsdogs_features, models_dir=tmp_path / "models", C=LOGREG_C,
        epochs=5, chunk_rows=CHUNK, seed=0, report_path=tmp_path / "cv_logreg.json",
    )
    assert summary["n_train"] == 192 and summary["best_C"] in LOGREG_C
    fs = read_features(catsdogs_features)
    expected = {k: fs.attrs[k] for k in CHECKED_ATTRS}
    expected["classes"] = fs.classes
    bundle = load_head(tmp_path / "models" / "logreg.joblib", expected)
    est = bundle["estimator"]
    assert list(est.named_steps) == ["scale", "clf"]
    Xt, _ = fs.subset("test")
    layer = to_torch_linear(est)
    with torch.no_grad():
        logits = layer(torch.from_numpy(Xt)).double()
    np.testing.assert_array_equal(logits.argmax(1).numpy(), est.predict(Xt))
    np.testing.assert_allclose(logits.softmax(1).numpy(), est.predict_proba(Xt), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "cv_logreg.json").is_file()

    # The hinge head has no probabilities: scores are its margins, and it folds too.
    svm = fit_out_of_core(catsdogs_features, name="svm", C=0.001, chunk_rows=CHUNK, epochs=3)
    est = svm.best_estimator_
    assert not hasattr(est, "predict_proba")
    with torch.no_grad():
        margin = to_torch_linear(est)(torch.from_numpy(Xt)).double().numpy()
    np.testing.assert_allclose(margin[:, 1], est.decision_function(Xt), rtol=1e-4, atol=1e-4)


def _tiny_cache(path, splits):
    n = len(splits)
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as h5:
        h5["features"] = rng.normal(size=(n, 4)).astype("f4")
        h5["labels"] = np.arange(n) % 2
        h5.create_dataset("paths", data=np.array([f"{i}.jpg" for i in range(n)], dtype=object),
                          dtype=h5py.string_dtype())
        h5.create_dataset("splits", data=np.array(splits, dtype=object), dtype=h5py.string_dtype())
        h5.attrs.update(backbone="b", weights="w", weights_sha256="", transform="t", classes='["a", "b"]')
    return path


def test_bad_settings_and_files_are_one_line_errors(tmp_path):
    cache = _tiny_cache(tmp_path / "f.h5", ["test"] * 6)
    with pytest.raises(PipelineError, match="no train rows"):
        fit_out_of_core(cache, name="logreg", C=1.0, chunk_rows=4)
    cache = _tiny_cache(tmp_path / "g.h5", ["train"] * 6)
    with pytest.raises(PipelineError, match="chunk_rows"):
        fit_out_of_core(cache, name="logreg", C=1.0, chunk_rows=1)
    with pytest.raises(PipelineError, match="C must be"):
        fit_out_of_core(cache, name="logreg", C=[0], chunk_rows=4)
    with pytest.raises(PipelineError, match="epochs"):
        fit_out_of_core(cache, name="logreg", C=1.0, chunk_rows=4, epochs=0)
    with pytest.raises(PipelineError, match="stale"):
        open_features(cache, {"backbone": "other"})
    with pytest.raises(PipelineError, match="not found"):
        open_features(tmp_path / "missing.h5")
    with h5py.File(cache, "a") as h5:  # what a virtual cache with a missing shard reads as
        h5["features"][0] = np.nan
    with pytest.raises(PipelineError, match="shard"):
        fit_out_of_core(cache, name="logreg", C=1.0, chunk_rows=4)
