"""What a head was made from is recorded, and evaluate refuses a head made from other features."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from pipeline.config import parse_config
from pipeline.data.manifest import Row, rows_sha256
from pipeline.errors import PipelineError
from pipeline.evaluate import run_evaluate
from pipeline.extract.cache import CacheWriter, cache_attrs, open_cache, write_extra_index
from pipeline.heads.model import load_head
from pipeline.heads.train import train_head

CLASSES = ["a", "b"]
ROWS = [Row(f"{c}/{i}.jpg", k, "test" if i < 3 else "train", f"{k}{i:063x}")
        for k, c in enumerate(CLASSES) for i in range(12)]


SPEC = {"resize": 36, "crop": 32, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}


def _cache(path, backbone="bb", precision="fp32", shift=0.0, rows=ROWS):
    rng = np.random.default_rng(0)
    X = (rng.normal(0, 1, (len(rows), 8)) + np.array([r.label for r in rows])[:, None] * 2 + shift).astype("f4")
    attrs = cache_attrs({"backbone": backbone, "weights": "w", "weights_sha256": "0" * 64, "transform": "t"},
                        CLASSES, "pillow-exact", precision, 8, rows, preprocessing=SPEC)
    path.parent.mkdir(parents=True, exist_ok=True)
    with CacheWriter(path, 8, attrs) as w:
        w.append(X, rows)
    return path


def _cfg(backbone="bb"):
    return parse_config({"backbone": {"name": backbone}, "heads": {"cv_folds": 2}})


def _train(tmp_path, features):
    return train_head(name="logreg", features_file=[features], heads_dir=tmp_path / "heads", C=[1.0],
                      cv_folds=2, report_path=tmp_path / "reports/cv_logreg.json")


def _evaluate(tmp_path, backbone="bb"):
    """The evaluate stage on the head of :func:`_train`; ``prepared/dataset.json`` is the prepare stage's."""
    prepared = tmp_path / "prepared"
    if not (prepared / "dataset.json").is_file():
        prepared.mkdir(parents=True, exist_ok=True)
        (prepared / "dataset.json").write_text(json.dumps({"source": "folder", "root": "photos"}))
    return run_evaluate(_cfg(backbone), "logreg", features_dir=tmp_path / "features", heads_dir=tmp_path / "heads",
                        prepared_dir=prepared, models_dir=tmp_path / "models", reports_dir=tmp_path / "reports")


def test_the_cache_records_its_manifest_and_content(tmp_path):
    a = open_cache(_cache(tmp_path / "a.h5")).attrs
    assert a["manifest_sha256"] == rows_sha256(CLASSES, ROWS)
    # The content hash follows the features: one value moved by 1e-6 changes it.
    assert open_cache(_cache(tmp_path / "b.h5")).attrs["content_sha256"] == a["content_sha256"]
    assert open_cache(_cache(tmp_path / "c.h5", shift=1e-6)).attrs["content_sha256"] != a["content_sha256"]
    with h5py.File(tmp_path / "a.h5") as h5:
        assert h5.attrs["content_sha256"] == a["content_sha256"]


def test_a_head_and_its_reports_record_what_they_were_made_from(tmp_path):
    features = _cache(tmp_path / "features/bb.h5")
    write_extra_index(tmp_path / "features/extra", [])
    _train(tmp_path, features)
    attrs = open_cache(features).attrs
    _, config = load_head(tmp_path / "heads/logreg")
    made = config["made_from"]
    for key in ("backbone", "weights", "weights_sha256", "transform", "decoder", "precision", "manifest_sha256",
                "content_sha256"):
        assert made[key] == attrs[key], key
    assert made["heads_backbones"] == [] and "git_commit" in made
    assert json.loads((tmp_path / "reports/cv_logreg.json").read_text())["made_from"] == made
    assert not (tmp_path / "models/logreg").exists()  # published by evaluate, once scored
    _evaluate(tmp_path)
    report = json.loads((tmp_path / "reports/metrics_logreg.json").read_text())
    assert report["made_from"]["content_sha256"] == attrs["content_sha256"]
    assert report["logreg"]["n_test"] == 6
    # The published model folder: the same head and record, with its test metrics and data.
    _, published = load_head(tmp_path / "models/logreg")
    assert published["made_from"] == made and published["metrics"] == report["logreg"]
    assert published["data"] == {"source": "folder", "root": "photos", "n_train": 18, "n_test": 6,
                                 "train_per_class": [9, 9]}
    assert (tmp_path / "models/logreg/model.safetensors").read_bytes() == \
        (tmp_path / "heads/logreg/model.safetensors").read_bytes()


@pytest.mark.parametrize("change, key, old, new", [
    ({"precision": "bf16"}, "precision", "'fp32'", "'bf16'"),
    ({"shift": 0.5}, "content_sha256", "", ""),
    ({"rows": [r._replace(sha256="f" * 64) if r.path == "a/5.jpg" else r for r in ROWS]}, "manifest_sha256", "", ""),
])
def test_evaluate_refuses_a_head_made_from_other_features(tmp_path, change, key, old, new):
    made_with = _cache(tmp_path / "features/bb.h5")
    write_extra_index(tmp_path / "features/extra", [])
    _train(tmp_path, made_with)
    _cache(tmp_path / "features/bb.h5", **change)  # the cache changed under the head (a stale graph)
    with pytest.raises(PipelineError) as e:
        _evaluate(tmp_path)
    msg = str(e.value)
    assert f"head {tmp_path / 'heads/logreg'} was made from {key}={old}" in msg
    assert f"but {tmp_path / 'features/bb.h5'} has {key}={new}" in msg and "run dvc repro" in msg
    assert "\n" not in msg
    assert not (tmp_path / "reports/metrics_logreg.json").exists()
    assert not (tmp_path / "models/logreg").exists()  # nothing published


def test_evaluate_refuses_a_head_of_another_backbone(tmp_path):
    """The issue's trap: heads trained on B's features, the cache now A's."""
    write_extra_index(tmp_path / "features/extra", [])
    _train(tmp_path, _cache(tmp_path / "features/bb.h5", backbone="lite2"))
    _cache(tmp_path / "features/bb.h5", backbone="lite0")
    with pytest.raises(PipelineError, match="was made from backbone='lite2' but .* has backbone='lite0'"):
        _evaluate(tmp_path)


def test_predict_refuses_a_head_whose_features_saw_other_decoding(tmp_path):
    """predict decodes every photo exactly; a head fitted on reduced-scale decoded features is refused."""
    from pipeline.serve.bundle import load_bundle

    write_extra_index(tmp_path / "features/extra", [])
    features = _cache(tmp_path / "features/bb.h5")
    with h5py.File(features, "a") as h5:
        h5.attrs["decoder"] = "pillow"
    _train(tmp_path, features)
    bundle = load_bundle(tmp_path / "heads/logreg")
    assert bundle.config["preprocessing"]["decoder"] == "pillow"
    with pytest.raises(PipelineError, match=r"made with decoder='pillow' .* scoring decodes with 'pillow-exact'"):
        bundle.backbone  # what predict and visualize score through (bundle.scores, bundle.network)
