"""The real ``dvc repro`` on the real sample photos, with the offline backbone."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from helpers_visualize import check_ideal, finetuned_prob

from pipeline.backbones import load_backbone
from pipeline.model_folder import is_pickle

pytestmark = [pytest.mark.slow, pytest.mark.sample_data]


def _repro_folder(project, folder, target="evaluate", **extra):
    """``dvc repro`` on a sample folder; up to ``evaluate`` unless told otherwise."""
    project.set_params(
        data={"source": "folder", "folder": str(folder), "test_fraction": 0.2, "seed": 0},
        backbone={"name": "efficientnet_lite0", "weights": "DEFAULT"},
        **extra,
    )
    project.commit("use the sample folder")
    return project.dvc("repro", *([target] if target else []))


def _contents(root, paths) -> dict:
    """The bytes of each file of ``paths`` (relative to ``root``), a model folder's files one by one."""
    out = {}
    for name in paths:
        path = root / name
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            out[str(f.relative_to(root))] = f.read_bytes()
    return out


def _check_schema(h5_path, n_expected, classes):
    with h5py.File(h5_path, "r") as h5:
        assert h5["features"].shape == (n_expected, 1280)
        assert h5["features"].dtype == np.float32
        assert h5["labels"].shape == (n_expected,)
        assert np.issubdtype(h5["labels"].dtype, np.integer)
        paths = h5["paths"].asstr()[:]
        splits = h5["splits"].asstr()[:]
        assert len(set(paths)) == n_expected
        assert set(splits) == {"train", "test"}
        assert set(h5["labels"][:]) == set(range(len(classes)))
        for key in ("backbone", "weights", "weights_sha256", "transform", "torch_version"):
            assert h5.attrs[key], key
        assert h5.attrs["backbone"] == "efficientnet_lite0"
        assert "center crop 224" in h5.attrs["transform"]
        assert len(h5.attrs["weights_sha256"]) == 64
        assert np.isfinite(h5["features"][:]).all()
        return paths, splits


# The visualize stage, kept small: the real dvc repro runs every stage. In fp32,
# so its numbers can be checked against an independent fp32 computation.
SMALL_VISUALIZE = {
    "imagenet_classes": [285],
    "steps": 24,
    "precision": "fp32",
    "attack": {"source": "dog", "target": "cat", "steps": 5, "max_images": 6, "save": 1},
    "feature_maps": {"images": 2, "channels": 4},
}


def test_catsdogs_repro_metrics_schema_and_granular_rerun(project, catsdogs):
    _repro_folder(project, catsdogs, target=None, visualize=SMALL_VISUALIZE)
    root = project.path

    manifest = (root / "data/prepared/manifest.csv").read_text().splitlines()
    assert manifest[0].startswith("path,label,split")
    assert len(manifest) - 1 == 240
    classes = json.loads((root / "data/prepared/classes.json").read_text())
    assert classes == ["cat", "dog"]

    h5_path = root / "data/features/efficientnet_lite0.h5"
    paths, splits = _check_schema(h5_path, 240, classes)
    assert (splits == "test").sum() == 48  # 20 % of each class

    metrics = {h: json.loads((root / f"reports/metrics_{h}.json").read_text())[h] for h in ("logreg", "svm")}
    # evaluate@<head> scores the heads; finetune scores itself
    assert not (root / "reports/metrics.json").exists()
    finetune = json.loads((root / "reports/finetune_metrics.json").read_text())
    assert set(finetune) == {"finetune", "finetune_run"}
    metrics["finetune"] = finetune["finetune"]
    # Fine-tuning starts at its own warm-start head and keeps its best epoch (the head's included).
    assert metrics["finetune"]["accuracy"] >= metrics["logreg"]["accuracy"] - 0.01, metrics
    assert metrics["logreg"]["accuracy"] >= 0.93, metrics
    assert metrics["logreg"]["n_test"] == 48
    for head in metrics.values():
        assert {"accuracy", "mean_class_accuracy", "macro_f1", "n_test"} <= set(head)
        assert "top3_accuracy" not in head  # only two classes
    confusion = (root / "reports/confusion_logreg.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 49
    # models/ holds model folders only (and DVC's .gitignore), and nothing in them is or holds a pickle.
    assert {p.name for p in (root / "models").iterdir()} == {".gitignore", "finetune", "logreg", "svm"}
    for folder in ("finetune", "logreg", "svm"):
        files = sorted((root / "models" / folder).iterdir())
        assert [f.name for f in files] == ["README.md", "config.json", "model.safetensors"], folder
        assert not any(is_pickle(f) for f in files), folder
    per_class = (root / "reports/per_class_logreg.csv").read_text().splitlines()
    assert per_class[0] == "head,class,support,accuracy,precision,f1" and len(per_class) == 3

    # The visualize stage ran, with the judge's verdict on the ImageNet class: every
    # number recomputed from the PNGs it wrote.
    ideal = json.loads((root / "reports/visualize/ideal.json").read_text())
    assert set(ideal) == {"cat", "dog", "in285_egyptian_cat"}
    # Drawn with the fine-tuned network (visualize.model's default), not a head.
    check_ideal(ideal, root / "reports/visualize/ideal", load_backbone("efficientnet_lite0"), classes,
                finetuned_prob(root / "models/finetune"))
    attack = json.loads((root / "reports/visualize/attack.json").read_text())
    assert (attack["source"], attack["target"]) == ("dog", "cat")
    rates = [e["success_rate"] for e in attack["eps"].values()]
    assert len(rates) == 4 and rates == sorted(rates)
    assert (root / "reports/visualize/attack.csv").read_text().startswith("eps,success_rate")

    # DVC's own views of the results work.
    shown = project.dvc("metrics", "show", "--json").stdout
    assert "logreg" in shown and "accuracy" in shown
    project.dvc("plots", "show", "-o", str(project.path / "plots_html"))
    assert (project.path / "plots_html" / "index.html").is_file()

    # Changing only a head's C, then a plain `dvc repro`: that head and the heads'
    # evaluation run; extraction, the other head, fine-tuning and visualize do not.
    project.commit("first run")
    first_c = json.loads((root / "reports/cv_logreg.json").read_text())["logreg"]["best_C"]
    before = h5_path.stat().st_mtime_ns
    unchanged = _contents(root, ("models/finetune", "reports/finetune_metrics.json", "reports/visualize/ideal.json",
                                 "models/svm"))
    assert "models/finetune/model.safetensors" in unchanged and "models/svm/config.json" in unchanged
    logreg = _contents(root, ["models/logreg"])
    project.set_params(heads={"train": {"logreg": {"C": [0.5]}}})
    out = project.dvc("repro").stdout
    # prepare always re-scans the photo folder (always_changed); its manifest is unchanged.
    assert project.ran(out) - {"prepare"} == {"train_heads@logreg", "evaluate@logreg"}, out
    for stage in ("extract", "extract_extra", "train_heads@svm", "evaluate@svm", "finetune", "visualize"):
        assert f"Stage '{stage}' didn't change, skipping" in out, (stage, out)
    assert h5_path.stat().st_mtime_ns == before
    assert _contents(root, ("models/finetune", "reports/finetune_metrics.json", "reports/visualize/ideal.json",
                            "models/svm")) == unchanged
    cv = json.loads((root / "reports/cv_logreg.json").read_text())
    assert cv["logreg"]["best_C"] == 0.5
    # evaluate@logreg published the new head, with the new C and its new test metrics.
    assert _contents(root, ["models/logreg"]) != logreg
    config = json.loads((root / "models/logreg/config.json").read_text())
    assert config["head"]["best_C"] == 0.5
    assert config["metrics"] == json.loads((root / "reports/metrics_logreg.json").read_text())["logreg"]

    # metrics diff compares the workspace with the committed run.
    diff = json.loads(project.dvc("metrics", "diff", "HEAD", "--json").stdout)
    assert first_c in (0.01, 0.1, 1.0)  # the default grid, which does not hold 0.5
    assert diff["reports/cv_logreg.json"]["logreg.best_C"] == {"old": first_c, "new": 0.5, "diff": 0.5 - first_c}


def test_dogbreeds10_reports_topk(project, dogbreeds10):
    _repro_folder(project, dogbreeds10, heads={"cv_folds": 3})
    root = project.path
    classes = json.loads((root / "data/prepared/classes.json").read_text())
    assert len(classes) == 10
    metrics = {h: json.loads((root / f"reports/metrics_{h}.json").read_text())[h] for h in ("logreg", "svm")}
    for head, m in metrics.items():
        assert m["top3_accuracy"] >= m["accuracy"], (head, m)
        assert m["top5_accuracy"] >= m["top3_accuracy"], (head, m)
    # Real ImageNet features separate dog breeds far better than chance (0.1).
    assert metrics["logreg"]["accuracy"] >= 0.6, metrics
