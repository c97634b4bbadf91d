"""The Ray engine: the same feature file as the local engine, through the same store and writer."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest
from conftest import import_or_skip

import_or_skip("ray.data", "Ray is not installed: pip install -e '.[ray]' (CI installs it, so these tests run there)")

from pipeline.backbones import load_backbone  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.data.manifest import Row, read_prepared  # noqa: E402
from pipeline.data.sources import prepare  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.metrics import head_metrics  # noqa: E402
from pipeline.extract.cache import SCHEMA, open_cache  # noqa: E402
from pipeline.extract.local import extract_features  # noqa: E402
from pipeline.extract.ray_executor import extract_with_ray  # noqa: E402
from pipeline.heads.batch import make_head  # noqa: E402
from pipeline.heads.model import scores  # noqa: E402

BACKBONE = "efficientnet_lite0"

# Ray Data warns about its own deprecated settings when it starts.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def both(tmp_path_factory, catsdogs):
    """All 240 catsdogs photos through both engines (Ray: a local instance with 2 CPUs, 2 actors).

    One extra manifest row names a real photo with a wrong content hash: both
    engines must skip it, with the same reason, and keep the rest in order.
    The local engine compiles its package; the actors (compile: auto) load it.
    """
    folder = catsdogs
    work = tmp_path_factory.mktemp("ray")
    prepare(source="folder", folder=folder, out_dir=work / "prepared")
    p = read_prepared(work / "prepared")
    stale = p.rows[0]._replace(sha256="0" * 64)
    rows = p.rows[:100] + [stale] + p.rows[100:]

    t = time.perf_counter()
    local = extract_features(
        load_backbone(BACKBONE), root=p.root, rows=rows, classes=p.classes, out_path=work / "local" / f"{BACKBONE}.h5",
        compile=True, compiled_dir=work / "compiled",
    )
    local_s = time.perf_counter() - t
    t = time.perf_counter()
    ray = extract_with_ray(
        backbone_name=BACKBONE, weights="DEFAULT", root=p.root, rows=rows, classes=p.classes,
        out_path=work / "ray" / f"{BACKBONE}.h5", address="", num_cpus=2, concurrency=2,
        store_dir=work / "store", compiled_dir=work / "compiled",
    )
    ray_s = time.perf_counter() - t
    print(f"\ncatsdogs, {BACKBONE}, 241 rows: local engine {local_s:.1f} s, ray engine {ray_s:.1f} s "
          f"(Ray start + actors included)")
    return dict(work=work, prepared=p, rows=rows, local=local, ray=ray,
                local_file=work / "local" / f"{BACKBONE}.h5", ray_file=work / "ray" / f"{BACKBONE}.h5")


@pytest.mark.sample_data
def test_ray_file_equals_local_engine(both):
    assert both["ray"].n_images == both["local"].n_images == 240
    assert both["ray"].n_computed == 240 and both["ray"].n_reused == 0
    assert both["ray"].skipped == both["local"].skipped
    assert "changed since" in both["ray"].skipped[0]["reason"]
    # One package, built by the local engine, loaded by every actor.
    assert both["local"].mode == "packaged" and len(both["local"].packages) == 1
    assert both["ray"].packages == both["local"].packages
    with h5py.File(both["local_file"]) as a, h5py.File(both["ray_file"]) as b:
        np.testing.assert_allclose(b["features"][:], a["features"][:], rtol=1e-4, atol=1e-5)
        for name in SCHEMA:
            assert not b[name].is_virtual, name  # one plain layout for both engines
            assert b[name].dtype == a[name].dtype and b[name].shape == a[name].shape
        for name in ("labels", "paths", "splits", "sha256"):
            np.testing.assert_array_equal(b[name][:], a[name][:], err_msg=name)
        assert dict(b.attrs) == dict(a.attrs)
    # Nothing but the cache file is written beside it (no shard folder to declare in dvc.yaml).
    assert sorted(p.name for p in both["ray_file"].parent.iterdir()) == [f"{BACKBONE}.h5"]


@pytest.mark.sample_data
def test_heads_on_either_cache_give_the_same_metrics(both):
    results = []
    for path in (both["local_file"], both["ray_file"]):
        fs = open_cache(path)
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
    np.testing.assert_array_equal(open_cache(out).features, open_cache(both["ray_file"]).features)


def test_bad_settings_are_one_line_errors(tmp_path):
    for ray, fragment in (({"concurrency": 0}, "extract.ray.concurrency"),
                          ({"num_gpus_per_worker": -1}, "extract.ray.num_gpus_per_worker"),
                          ({"address": None}, "extract.ray.address")):
        with pytest.raises(PipelineError, match=fragment) as e:
            parse_config({"extract": {"engine": "ray", "ray": ray}})
        assert "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="unknown backbone 'nope'"):
        extract_with_ray(backbone_name="nope", weights="none", root=tmp_path, rows=[], classes=["a"],
                         out_path=tmp_path / "f.h5", store_dir=tmp_path / "store")


def test_more_actors_than_a_local_instance_holds_is_refused_not_a_hang(tmp_path):
    rows = [Row("a/x.jpg", 0, "train", "0" * 64)]
    with pytest.raises(PipelineError, match="local Ray instance is too small"):
        extract_with_ray(backbone_name="resnet18", weights="none", root=tmp_path, rows=rows, classes=["a"],
                         out_path=tmp_path / "out" / "f.h5", store_dir=tmp_path / "store", num_cpus=1,
                         concurrency=2)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written
    assert [p.name for p in (tmp_path / "store").rglob("shard-*")] == []
