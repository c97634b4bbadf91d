"""A project as ``dvc repro`` leaves it, made once per test session: three model folders, photos to classify.

Shared by the tests of predict, of the model folders and of export
(``tests/conftest.py`` imports the fixtures).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import sample_folder
from helpers_images import truncated_jpeg, write

from pipeline.backbones import load_backbone
from pipeline.config import BackboneConfig, Config, EvaluateConfig, ExtractConfig, FinetuneConfig, HeadsConfig
from pipeline.data.images import load_rgb
from pipeline.data.sources import prepare
from pipeline.evaluate import run_evaluate
from pipeline.extract.cache import features_path, write_extra_index
from pipeline.extract.stage import run_extract
from pipeline.finetune.stage import run_finetune
from pipeline.heads.train import train_head

#: The fine-tuning run of the fixture: one epoch that cannot beat its warm-start head (lr 10 on the
#: head alone), so the network kept is the head it started from (epoch 0), as the stage keeps it.
FINETUNE = FinetuneConfig(epochs=1, batch_size=8, unfreeze="none", lr_head=10.0, val_fraction=0.25, patience=1,
                          device="cpu", precision="fp32")
BACKBONE = BackboneConfig(name="efficientnet_lite0", weights="DEFAULT")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A project folder as ``dvc repro`` leaves it: three model folders with their metrics.

    Twelve photos per class go through the stages' own library calls:
    prepare, extract, ``train_head`` and ``run_evaluate`` for each head, and
    ``run_finetune``, which fits its own warm-start head on the cache and
    writes ``models/finetune/`` as the finetune stage does.
    """
    folder = sample_folder("catsdogs")
    base = tmp_path_factory.mktemp("predict")
    project = base / "project"
    (project / "reports").mkdir(parents=True)
    subset = base / "subset"  # the first 12 photos of each class, copied outside the repository
    for c in ("cat", "dog"):
        (subset / c).mkdir(parents=True)
        for f in sorted((folder / c).iterdir())[:12]:
            shutil.copy2(f, subset / c / f.name)
    prepare(source="folder", out_dir=project / "data/prepared", folder=str(subset), test_fraction=0.25, seed=0)
    run_extract(backbone=BACKBONE, extract=ExtractConfig(store="", precision="fp32", compile=False),
                prepared_dir=project / "data/prepared", out_dir=project / "data/features")
    features = features_path(project / "data/features", BACKBONE.name)
    write_extra_index(project / "data/features/extra", [])  # heads.backbones: [], as extract_extra writes it
    cfg = Config(backbone=BACKBONE, finetune=FINETUNE, evaluate=EvaluateConfig(), heads=HeadsConfig())
    for name, C in (("logreg", [0.1]), ("svm", [0.001])):
        train_head(name=name, features_file=features, heads_dir=project / "data/heads", C=C, cv_folds=2)
        run_evaluate(cfg, name, features_dir=project / "data/features", heads_dir=project / "data/heads",
                     prepared_dir=project / "data/prepared", models_dir=project / "models",
                     reports_dir=project / "reports")
    run_finetune(cfg, prepared_dir=project / "data/prepared", features_dir=project / "data/features",
                 out_dir=project / "models/finetune", live_dir=base / "dvclive", reports_dir=base / "reports",
                 cache_dir=project / "data/cache/finetune")

    photos = base / "photos"
    (photos / "nested" / "dog").mkdir(parents=True)
    for f in sorted((folder / "cat").iterdir())[100:102]:
        shutil.copy(f, photos / f"cat-{f.name}")
    for f in sorted((folder / "dog").iterdir())[100:102]:
        shutil.copy(f, photos / "nested" / "dog" / f.name)
    write(photos / "broken.jpg", truncated_jpeg())
    write(photos / "notes.txt", b"not a photo; ignored inside folders")
    return project, photos


@pytest.fixture(scope="session")
def pretrained(trained) -> tuple[np.ndarray, torch.Tensor]:
    """The good photos' features (float64) through a freshly loaded pretrained backbone, and its input batch."""
    bb = load_backbone(BACKBONE.name, BACKBONE.weights)
    x = torch.stack([bb.transform(load_rgb(p)) for p in good_photos(trained[1])])
    with torch.inference_mode():
        return bb.features(x).double().numpy(), x


def good_photos(photos):
    """The readable photos of the fixture's folder to classify."""
    return sorted(p for p in photos.rglob("*.jpg") if p.name != "broken.jpg")
