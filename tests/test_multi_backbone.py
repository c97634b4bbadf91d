"""Heads on several backbones at once: cached features concatenated, rows checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.extract.cache import (
    FeatureSet, concatenate, features_path, head_features_paths, open_cache, write_extra_index,
)
from pipeline.heads.model import load_head


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


def test_cache_paths_are_the_ones_dvc_yaml_names(tmp_path):
    """The files the code reads and writes are those DVC resolves dvc.yaml's deps and outs to."""
    import shutil
    import subprocess

    import yaml
    from test_graph import ROOT, resolved_stages

    for name in ("dvc.yaml", "params.yaml", ".dvc"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, tmp_path / name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    timm_name = "timm/convnext_tiny.fb_in22k_ft_in1k"
    params["backbone"]["name"], params["heads"]["backbones"] = timm_name, ["efficientnet_lite2", "resnet18"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stages = resolved_stages(tmp_path)

    main = features_path("data/features", timm_name)
    assert str(main) == "data/features/timm/convnext_tiny.fb_in22k_ft_in1k.h5"  # a timm name gives a sub-folder
    with open_dvc_outs(tmp_path) as outs:
        assert str(main) in outs["extract"]
        assert "data/features/extra" in outs["extract_extra"]
    extra_dir = tmp_path / "data/features/extra"
    extra_dir.mkdir(parents=True)
    write_extra_index(extra_dir, ["efficientnet_lite2", "resnet18"])
    read = head_features_paths(tmp_path / "data/features", timm_name, ["efficientnet_lite2", "resnet18"])
    # Every cache a head reads lies in what its stages list: the main file, or inside the extra folder.
    for stage in ("train_heads@logreg", "evaluate@svm"):
        data = {str(d) for d in stages[stage]["data"]}
        assert str(main) in data and "data/features/extra" in data, data
        for path in read:
            rel = path.relative_to(tmp_path)
            assert str(rel) in data or any(Path(d) in rel.parents for d in data), (stage, rel)
    with pytest.raises(PipelineError, match="cannot name a cache file"):
        features_path("data/features", "../escape")


def test_heads_refuse_an_extra_folder_made_for_other_backbones(tmp_path):
    with pytest.raises(PipelineError, match="index.json not found.*extract_extra"):
        head_features_paths(tmp_path, "a", [])
    write_extra_index(tmp_path / "extra", ["b"])
    with pytest.raises(PipelineError, match=r"holds the caches of \['b'\] but heads.backbones is \[\]"):
        head_features_paths(tmp_path, "a", [])
    assert head_features_paths(tmp_path, "a", ["b"]) == [tmp_path / "a.h5", tmp_path / "extra/b.h5"]


class open_dvc_outs:
    """``{stage: {out paths}}`` as DVC resolves dvc.yaml in a folder."""

    def __init__(self, root):
        from dvc.repo import Repo

        self.repo = Repo(str(root))

    def __enter__(self):
        return {s.name: {o.def_path for o in s.outs} for s in self.repo.index.stages}

    def __exit__(self, *exc):
        self.repo.close()


@pytest.mark.slow
@pytest.mark.sample_data
def test_repro_trains_heads_on_two_backbones(project, catsdogs):
    project.set_params(
        data={"source": "folder", "folder": str(catsdogs), "test_fraction": 0.2, "seed": 0},
        backbone={"name": "efficientnet_lite0", "weights": "DEFAULT"},
        extract={"precision": "fp32"},
        heads={"backbones": ["efficientnet_lite2"], "train": {"logreg": {"C": [0.1]}}},
    )
    project.commit("two backbones")
    out = project.dvc("repro", "train_heads@logreg").stdout
    assert "Running stage 'extract_extra'" in out, out
    root = project.path
    estimator, config = load_head(root / "data/heads/logreg")  # train_heads' folder; evaluate publishes it
    assert estimator.named_steps["scale"].n_features_in_ == 1280 + 1280
    assert config["backbone"]["feature_dim"] == 1280 + 1280
    assert config["made_from"]["backbone"] == "efficientnet_lite0 + efficientnet_lite2"
    assert config["made_from"]["heads_backbones"] == ["efficientnet_lite2"]
    main = open_cache(root / "data/features/efficientnet_lite0.h5")
    extra = open_cache(root / "data/features/extra/efficientnet_lite2.h5")
    both = open_cache([root / "data/features/efficientnet_lite0.h5", root / "data/features/extra/efficientnet_lite2.h5"])
    np.testing.assert_array_equal(both.features, np.concatenate([main.features, extra.features], axis=1))
    assert list(extra.paths) == list(main.paths)
