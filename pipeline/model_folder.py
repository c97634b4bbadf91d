"""A trained model on disk: one folder, ``config.json`` + ``model.safetensors`` + ``README.md``.

After Hugging Face's ``save_pretrained`` folder: everything a scorer needs is
data, and nothing in the folder can run code when it is opened.

- ``config.json``: what the model is and what it was made from
  (:func:`pipeline.provenance.model_record`: classes, backbone, preprocessing,
  precision, provenance, versions) and the sha256 of each weights file;
- ``model.safetensors``: the weights (a head's scaler and linear layer, or the
  fine-tuned network's state dict), in a format that holds tensors only;
- ``README.md``: the model card (:func:`model_card`).

:func:`write_model` writes the folder next to its final place and renames it
there when complete; :func:`read_model` refuses a pickle, a folder without
``config.json``, weights that differ from their recorded sha256, and a format
newer than this code reads, each with one line that says what to do. Neither
imports torch: the heads' stages use them too.

Example:
    >>> config = read_model("models/logreg")                          # doctest: +SKIP
    >>> config["classes"], config["metrics"]["accuracy"]              # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Callable

from pipeline.errors import PipelineError
from pipeline.fileio import file_digest, read_json, write_json
from pipeline.provenance import check_record

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CARD = "README.md"

#: File names that hold pickles by convention (joblib, torch.save, ...): refused unread.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".bin")


def is_pickle(path: Path) -> bool:
    """True for a pickle, or a zip that holds one (``torch.save``'s format), whatever its name."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocols 2-5
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return any(n.endswith((".pkl", "/data.pkl")) for n in z.namelist())
    return False


def write_model(folder, config: dict, write_weights: Callable[[Path], None], card: str) -> Path:
    """Write the model folder ``folder`` whole, or leave the previous one as it was.

    Args:
        config: the record (:func:`pipeline.provenance.model_record`); the
            weights' sha256 is added under ``files``.
        write_weights: writes ``model.safetensors`` at the path it is given.
        card: the model card's Markdown (:func:`model_card`).

    Returns:
        the folder.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_weights(tmp / WEIGHTS)
        config = dict(config, files={WEIGHTS: file_digest(tmp / WEIGHTS)})
        write_json(tmp / CONFIG, config)
        (tmp / CARD).write_text(card, encoding="utf-8")
        if folder.exists():
            # A folder cannot be renamed over a non-empty one: move the old aside first,
            # so that the final name always holds one complete model.
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_model(folder, expected: dict | None = None) -> dict:
    """``config.json`` of the model folder ``folder``, after every check; its files are then safe to read.

    Args:
        expected: entries the model must match (:func:`pipeline.provenance.check_record`):
            ``classes`` and the backbone's ``name``, ``weights``, ``weights_sha256``, ``transform``.

    Raises:
        PipelineError: a pickle (given, or inside the folder), no ``config.json``,
            a weights file whose sha256 differs from the recorded one, a format
            newer than this code, or a model that differs from ``expected``.
    """
    folder = Path(folder)
    if folder.is_file():
        if is_pickle(folder):
            raise PipelineError(f"{folder} is a pickle, which can run code when opened; this project loads only "
                                "model folders (config.json + model.safetensors): run dvc repro to write them")
        raise PipelineError(f"{folder} is a file; a model is a folder holding {CONFIG}, {WEIGHTS} and {CARD} "
                            "(for example models/logreg)")
    if not folder.is_dir():
        raise PipelineError(f"model folder {folder} not found; run dvc repro to train it, or give the path of "
                            f"a folder holding {CONFIG} and {WEIGHTS}")
    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and is_pickle(p))
    if pickles:
        raise PipelineError(f"{folder} holds {', '.join(pickles)}: pickles can run code when opened and this "
                            f"project never writes them; remove them, or copy the model folder again from its source")
    if not (folder / CONFIG).is_file():
        raise PipelineError(f"{folder} has no {CONFIG}, so it is not a model folder of this project (or was copied "
                            "in part); copy the whole folder, or run dvc repro")
    config = read_json(folder / CONFIG, f"model config of {folder}")
    check_record(config, expected or {}, f"model {folder}")
    for name, want in config["files"].items():
        path = folder / name
        if not path.is_file():
            raise PipelineError(f"{path} is missing; copy the whole model folder again, or run dvc repro")
        have = file_digest(path)
        if have != want:
            raise PipelineError(f"{path} has sha256 {have[:12]}... but {folder / CONFIG} records {want[:12]}...: "
                                "the file was changed or damaged; copy the model folder again, or run dvc repro")
    return config


def weights_path(folder) -> Path:
    return Path(folder) / WEIGHTS


def model_folders(models_dir) -> list[str]:
    """The names of the model folders in ``models_dir`` (those holding a ``config.json``), sorted."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    return sorted(p.name for p in models_dir.iterdir() if (p / CONFIG).is_file())


def model_card(config: dict) -> str:
    """The model card: what the model is, what it was trained on, how well it does, how to use it, its limits."""
    name, classes, bb = config["name"], config["classes"], config["backbone"]
    data, metrics, pre = config.get("data", {}), config.get("metrics", {}), config["preprocessing"]
    what = ("the fine-tuned network (backbone and linear head trained together)" if config["kind"] == "finetune"
            else f"a {config['head']['description']} head on the frozen backbone's features")
    lines = [
        f"# {name}: {len(classes)}-class image classifier",
        "",
        f"{what.capitalize()}, on `{bb['name']}` (weights `{bb['weights']}`, sha256 `{bb['weights_sha256'][:16]}...`).",
        "",
        "## Trained on",
        "",
        f"- data: {data.get('source', 'unknown source')} `{data.get('root', '')}`",
        f"- split: {data.get('n_train', '?')} train / {data.get('n_test', '?')} test photos",
        "- classes and their train photos: " + ", ".join(
            f"{c} {n}" for c, n in zip(classes, data.get("train_per_class", [""] * len(classes)))),
        f"- preprocessing: resize shorter side to {pre['resize']} ({pre['interpolation']}), centre crop "
        f"{pre['crop']}, mean {tuple(pre['mean'])}, std {tuple(pre['std'])}; decoder {pre['decoder']}; "
        f"{config['precision']} features",
        "",
        "## Test accuracy",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines.append("not measured")
    lines += [
        "",
        "## Use",
        "",
        "```",
        f"python -m pipeline predict --model path/to/{name} photo.jpg",
        f"python -m pipeline export path/to/{name} --format onnx",
        "```",
        "",
        "The folder is self-contained: `config.json` says everything the scorer needs, `model.safetensors` holds "
        "only tensors, and loading checks the weights' sha256. The backbone's ImageNet weights come from the "
        "registry (`python -m pipeline backbones`).",
        "",
        "## Limits",
        "",
        f"- It knows only these {len(classes)} classes; any photo gets one of them, whatever it shows.",
        "- Accuracy was measured on one held-out split of the data above; photos unlike them (other cameras, "
        "framing, breeds) may score lower.",
        "- Scores are " + config["scores"] + ".",
        "",
        f"Made by transfer-pipeline {config['versions'].get('transfer-pipeline', '?')} from git commit "
        f"`{config['made_from'].get('git_commit') or 'unknown'}`.",
        "",
    ]
    return "\n".join(lines)
