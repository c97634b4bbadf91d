"""The Ray engine: same features as the local engine, sharded HDF5 under a virtual master."""

from __future__ import annotations

import os
import shutil
import time

import h5py
import numpy as np
import pytest

pytest.importorskip(
    "ray.data", reason="Ray is not installed: pip install -e '.[ray]' (CI installs it, so these tests run there)"
)

from conftest import sample_folder  # noqa: E402
from pipeline.backbones import load_backbone  # noqa: E402
from pipeline.data.manifest import read_prepared
from pipeline.data.sources import prepare  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.evaluate import head_metrics  # noqa: E402
from pipeline.extract.local import extract_features, read_features  # noqa: E402
from pipeline.heads.batch import make_head, scores  # noqa: E402
from pipeline.heads.streaming import open_features  # noqa: E402
from pipeline.extract.ray_executor import DATASETS, extract_with_ray, shards_dir  # noqa: E402

BACKBONE = "efficientnet_lite0"

# Ray Data warns about its own deprecated settings when it starts.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """All 240 catsdogs photos through both engines (Ray: a local instance with 2 CPUs, 2 actors).

    One extra manifest row names a real photo with a wrong content hash: both
    engines must skip it, with the same reason, and keep the rest in order.
    """
    folder = sample_folder("catsdogs")
    work = tmp_path_factory.mktemp("ray")
    prepare(source="folder", folder=folder, out_dir=work / "prepared")
    p = read_prepared(work / "prepared")
    stale = (p.rows[0][0], p.rows[0][1], p.rows[0][2], "0" * 64)
    rows = p.rows[:100] + [stale] + p.rows[100:]

    t = time.perf_counter()
    local = extract_features(
        load_backbone(BACKBONE), root=p.root, rows=rows, classes=p.classes, out_path=work / "local" / f"{BACKBONE}.h5"
    )
    local_s = time.perf_counter() - t
    t = time.perf_counter()
    ray = extract_with_ray(
        backbone_name=BACKBONE, weights="DEFAULT", root=p.root, rows=rows, classes=p.classes,
        out_path=work / "ray" / f"{BACKBONE}.h5", address="", num_cpus=2, concurrency=2,
        store_dir=work / "store",
    )
    ray_s = time.perf_counter() - t
    print(f"\ncatsdogs, {BACKBONE}, 241 rows: local engine {local_s:.1f} s, ray engine {ray_s:.1f} s "
          f"(Ray start + actors included)")
    return dict(work=work, prepared=p, rows=rows, local=local, ray=ray,
                local_file=work / "local" / f"{BACKBONE}.h5", ray_file=work / "ray" / f"{BACKBONE}.h5")


@pytest.mark.sample_data
def test_ray_master_equals_local_engine_and_is_virtual(both):
    assert both["ray"].n_images == both["local"].n_images == 240
    assert both["ray"].skipped == both["local"].skipped
    assert "changed since" in both["ray"].skipped[0]["reason"]
    with h5py.File(both["local_file"]) as a, h5py.File(both["ray_file"]) as b:
        np.testing.assert_allclose(b["features"][:], a["features"][:], rtol=1e-4, atol=1e-5)
        for name in ("labels", "paths", "splits", "sha256"):
            np.testing.assert_array_equal(b[name][:], a[name][:], err_msg=name)
        assert dict(b.attrs) == dict(a.attrs)
        for name in DATASETS:
            assert b[name].is_virtual, name
            assert b[name].dtype == a[name].dtype and b[name].shape == a[name].shape
            for src in b[name].virtual_sources():
                # Relative to the master's folder, so the folder can move.
                assert not os.path.isabs(src.file_name) and src.file_name.startswith(f"{BACKBONE}.shards/")
    shards = sorted(shards_dir(both["ray_file"]).iterdir())
    assert 1 <= len(shards) <= 2  # one per actor that got work
    for shard in shards:
        with h5py.File(shard) as h5, h5py.File(both["local_file"]) as a:
            assert set(h5) == set(DATASETS) and dict(h5.attrs) == dict(a.attrs)
            assert not h5["features"].is_virtual
    assert sorted(p.name for p in both["ray_file"].parent.iterdir()) == [f"{BACKBONE}.h5", f"{BACKBONE}.shards"]


@pytest.mark.sample_data
def test_heads_on_either_cache_give_the_same_metrics(both):
    results = []
    for path in (both["local_file"], both["ray_file"]):
        fs = read_features(path)
        X, y = fs.subset("train")
        Xt, yt = fs.subset("test")
        row = {}
        for name, C in (("logreg", [0.01, 0.1, 1.0]), ("svm", [0.0001, 0.001])):
            search = make_head(name, C=C, y=y).fit(X, y)
            row[name] = head_metrics(yt, search.predict(Xt), scores(search, Xt), len(fs.classes))
            row[name]["C"] = search.best_params_["clf__C"]
        results.append(row)
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        assert results[1][name] == pytest.approx(results[0][name], abs=1e-6), name


@pytest.mark.sample_data
def test_moved_cache_reads_and_a_missing_shard_is_refused(both, tmp_path):
    moved = tmp_path / "elsewhere" / "features"
    shutil.copytree(both["ray_file"].parent, moved)
    master = moved / f"{BACKBONE}.h5"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # neither the old folder nor the project: paths resolve against the master
    try:
        fs = read_features(master)
    finally:
        os.chdir(cwd)
    ref = read_features(both["ray_file"])
    np.testing.assert_array_equal(fs.features, ref.features)
    np.testing.assert_array_equal(fs.paths, ref.paths)

    for shard in shards_dir(master).iterdir():
        shard.unlink()
    with h5py.File(master) as h5:  # read raw, the shards' rows are fill values, never plausible rows
        assert np.isnan(h5["features"][:]).all() and (h5["labels"][:] == -1).all()
    with pytest.raises(PipelineError, match="missing its shard"):
        read_features(master)
    with pytest.raises(PipelineError, match="missing its shard"):
        open_features(master, chunk_rows=64)


@pytest.mark.sample_data
def test_rerun_reuses_the_store_without_starting_ray(both, monkeypatch):
    import ray

    def no_ray(*a, **kw):
        raise AssertionError("nothing to compute: Ray must not start")

    monkeypatch.setattr(ray, "init", no_ray)
    p = both["prepared"]
    out = both["work"] / "again" / f"{BACKBONE}.h5"
    res = extract_with_ray(
        backbone_name=BACKBONE, weights="DEFAULT", root=p.root, rows=p.rows, classes=p.classes,
        out_path=out, store_dir=both["work"] / "store",
    )
    assert res.n_computed == 0 and res.n_reused == res.n_images == 240
    with h5py.File(out) as h5:
        assert h5["features"].is_virtual
        assert [s.file_name for s in h5["features"].virtual_sources()] == [f"{BACKBONE}.shards/shard-store.h5"]
    np.testing.assert_allclose(read_features(out).features, read_features(both["local_file"]).features,
                               rtol=1e-4, atol=1e-5)


def test_bad_settings_are_one_line_errors(tmp_path):
    common = dict(backbone_name="resnet18", weights="none", root=tmp_path, rows=[], classes=["a"],
                  out_path=tmp_path / "f.h5")
    with pytest.raises(PipelineError, match="concurrency"):
        extract_with_ray(**common, concurrency=0)
    with pytest.raises(PipelineError, match="num_gpus_per_worker"):
        extract_with_ray(**common, num_gpus_per_worker=-1)
    with pytest.raises(PipelineError, match="address"):
        extract_with_ray(**common, address=None)
    with pytest.raises(PipelineError, match="unknown backbone|accepted"):
        extract_with_ray(**{**common, "backbone_name": "nope"})


def test_more_actors_than_a_local_instance_holds_is_refused_not_a_hang(tmp_path):
    rows = [("a/x.jpg", 0, "train", "0" * 64)]
    with pytest.raises(PipelineError, match="local Ray instance is too small"):
        extract_with_ray(backbone_name="resnet18", weights="none", root=tmp_path, rows=rows, classes=["a"],
                         out_path=tmp_path / "f.h5", num_cpus=1, concurrency=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written
