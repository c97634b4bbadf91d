"""Heads on several backbones at once: cached features concatenated, rows checked."""

from __future__ import annotations

import joblib
import numpy as np
import pytest

from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.extract.cache import FeatureSet, concatenate, features_path, head_features_paths, open_cache


def _set(rows, dim, value, backbone):
    return FeatureSet(
        features=np.full((len(rows), dim), value, np.float32),
        labels=np.array([r.label for r in rows]), paths=np.array([r.path for r in rows]),
        splits=np.array([r.split for r in rows]), sha256=np.array([r.sha256 for r in rows]),
        classes=["a", "b"], attrs={"backbone": backbone, "weights": "w", "classes": '["a", "b"]', "feature_dim": dim},
    )


def test_concatenation_is_column_wise_and_rows_must_agree():
    rows = [Row(f"a/{i}.jpg", i % 2, "train", f"{i:064x}") for i in range(4)]
    both = concatenate([_set(rows, 3, 1.0, "x"), _set(rows, 2, 2.0, "y")], ["x.h5", "y.h5"])
    assert both.features.shape == (4, 5)
    np.testing.assert_array_equal(both.features[0], [1, 1, 1, 2, 2])
    assert both.attrs["backbone"] == "x + y" and both.attrs["feature_dim"] == 5
    swapped = [rows[1], rows[0], *rows[2:]]
    with pytest.raises(PipelineError, match=r"x.h5 and y.h5 disagree on paths at row 0"):
        concatenate([_set(rows, 3, 1.0, "x"), _set(swapped, 2, 2.0, "y")], ["x.h5", "y.h5"])
    changed = [rows[0]._replace(sha256="f" * 64), *rows[1:]]
    with pytest.raises(PipelineError, match="disagree on sha256 at row 0"):
        concatenate([_set(rows, 3, 1.0, "x"), _set(changed, 2, 2.0, "y")], ["x.h5", "y.h5"])


def test_cache_paths_follow_dvc_yaml():
    assert str(features_path("data/features", "resnet50")) == "data/features/resnet50.h5"
    # dvc.yaml names data/features/${backbone.name}.h5: a timm name gives a sub-folder.
    assert str(features_path("data/features", "timm/convnext_tiny.fb_in22k_ft_in1k")) == \
        "data/features/timm/convnext_tiny.fb_in22k_ft_in1k.h5"
    assert [str(p) for p in head_features_paths("d", "a", ["b"])] == ["d/a.h5", "d/extra/b.h5"]
    with pytest.raises(PipelineError, match="cannot name a cache file"):
        features_path("data/features", "../escape")


@pytest.mark.slow
@pytest.mark.sample_data
def test_repro_trains_heads_on_two_backbones(project, catsdogs):
    project.set_params(
        data={"source": "folder", "folder": str(catsdogs), "test_fraction": 0.2, "seed": 0},
        backbone={"name": "efficientnet_lite0", "weights": "DEFAULT"},
        extract={"precision": "fp32"},
        heads={"backbones": ["efficientnet_lite2"], "logreg": {"C": [0.1]}},
    )
    project.commit("two backbones")
    out = project.dvc("repro", "train_heads@logreg").stdout
    assert "Running stage 'extract_extra@efficientnet_lite2'" in out, out
    root = project.path
    head = joblib.load(root / "models/logreg.joblib")
    assert head["estimator"].named_steps["scale"].n_features_in_ == 1280 + 1280
    assert head["provenance"]["backbone"] == "efficientnet_lite0 + efficientnet_lite2"
    main = open_cache(root / "data/features/efficientnet_lite0.h5")
    extra = open_cache(root / "data/features/extra/efficientnet_lite2.h5")
    both = open_cache([root / "data/features/efficientnet_lite0.h5", root / "data/features/extra/efficientnet_lite2.h5"])
    np.testing.assert_array_equal(both.features, np.concatenate([main.features, extra.features], axis=1))
    assert list(extra.paths) == list(main.paths)
