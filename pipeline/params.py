"""Reading and validating ``params.yaml``.

The accepted keys and their defaults live in :data:`DEFAULTS`; a typo in
params.yaml (``heads.logreg.c``) is an error that names the key and lists what is
accepted, instead of a setting that silently does nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from pipeline.errors import PipelineError

DEFAULTS: dict = {
    "data": {
        "source": "oxford-iiit-pet",
        "folder": "data/images",
        "download_dir": "data/raw",
        "test_fraction": 0.2,
        "seed": 0,
        "archive_sha256": "",
    },
    "backbone": {"name": "resnet50", "weights": "DEFAULT"},
    "extract": {
        "batch_size": 32,
        "device": "auto",
        "decoder": "auto",
        "decode_threads": 1,
        "compile": "auto",
        "store": "data/cache/features",
        "flush_every": 256,
        "engine": "local",
        "ray": {"address": "", "num_gpus_per_worker": 0, "concurrency": 2},
    },
    "heads": {
        "cv_folds": 5,
        "seed": 0,
        "out_of_core": False,
        "chunk_rows": 65536,
        "epochs": 10,
        "logreg": {"C": [0.01, 0.1, 1.0], "max_iter": 2000},
        "svm": {"C": [0.00001, 0.0001, 0.001, 0.01], "max_iter": 10000},
    },
    "finetune": {
        "unfreeze": "last",
        "epochs": 3,
        "batch_size": 16,
        "lr_head": 3e-4,
        "lr_backbone": 1e-4,
        "weight_decay": 0.01,
        "warmup_fraction": 0.1,
        "label_smoothing": 0.1,
        "val_fraction": 0.2,
        "patience": 2,
        "max_minutes": 10,
        "seed": 0,
        "device": "auto",
        "decode_workers": "auto",
    },
    "visualize": {
        "classes": [],  # head class names to draw; [] = every class of the head
        "imagenet_classes": [285, 340],  # ImageNet ids, drawn with the backbone's own classifier
        "model": "logreg",  # the head (models/<model>.joblib)
        "param": "fourier",  # fourier | pixel
        "steps": 256,
        "lr": 0.05,
        "tv_weight": 250.0,
        "l2_weight": 20.0,
        "seed": 0,
        "judge": "efficientnet_lite2",  # a second backbone that scores ImageNet-class images; "" = none
        "attack": {
            "source": "",  # a head class; "" = the first class
            "target": "",  # a head class; "" = the class after the source
            "eps": [1 / 255, 2 / 255, 4 / 255, 8 / 255],
            "steps": 10,
            "max_images": 16,
            "random_start": True,
            "save": 3,
            "transfer_to": "",  # a second backbone ...
            "transfer_head": "",  # ... and a head trained on its features; "" = no transfer test
        },
        "feature_maps": {"images": 4, "channels": 16},
    },
    "evaluate": {"top_k": [3, 5]},
}


def _merge(defaults: dict, given: dict, where: str, source: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in defaults:
            accepted = ", ".join(sorted(defaults))
            raise PipelineError(f"unknown params key '{name}' in {source}; accepted here: {accepted}")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise PipelineError(f"params key '{name}' in {source} must be a mapping, found {value!r}")
            out[key] = _merge(defaults[key], value, name, source)
        else:
            out[key] = value
    return out


def load_params(path: str | Path = "params.yaml") -> dict:
    """Return params.yaml merged over :data:`DEFAULTS`, after checking every key.

    Raises:
        PipelineError: the file is unreadable or names an unknown key.

    Example:
        >>> load_params("params.yaml")["backbone"]["name"]  # doctest: +SKIP
        'resnet50'
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found; run from the project root, where params.yaml lives")
    try:
        given = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(given, dict):
        raise PipelineError(f"{path} must hold a mapping of sections, found {type(given).__name__}")
    return _merge(DEFAULTS, given, "", str(path))
