"""The fine-tuned network on disk: the model folder ``models/finetune/``.

``model.safetensors`` holds the whole network's state dict (``features.*``,
``head.*``), tensors only; ``config.json`` says what it is (backbone,
weights, classes, preprocessing, precision, provenance, the training summary
and test metrics), and ``README.md`` is its model card
(:mod:`pipeline.model_folder`). Scorers load it through
:func:`pipeline.serve.bundle.load_bundle`.

Example:
    >>> net, config = load_finetuned("models/finetune")                     # doctest: +SKIP
    >>> TransformSpec.from_dict(config["preprocessing"]).build()(image)     # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.backbones import Backbone, load_backbone
from pipeline.errors import PipelineError
from pipeline.finetune.network import FineTuneNet
from pipeline.model_folder import model_card, read_model, weights_path, write_model
from pipeline.provenance import model_record


def save_finetuned(folder, net: FineTuneNet, backbone: Backbone, classes: list[str], *, precision: str,
                   made_from: dict, **extra) -> dict:
    """Write the model folder ``folder`` whole (:func:`~pipeline.model_folder.write_model`).

    Args:
        backbone: the backbone the network was built from: its name, weights,
            preprocessing and provenance are recorded.
        precision: the training precision.
        made_from: :func:`pipeline.provenance.made_from`'s record of the cache its warm start was fitted on.
        **extra: more config entries (``training``, ``metrics``, ``data``, ``params``).

    Returns:
        the config written.
    """
    provenance = backbone.provenance()
    config = model_record(
        name=Path(folder).name, kind="finetune", classes=classes,
        backbone={"name": backbone.name, "weights": backbone.weights, "weights_sha256": provenance["weights_sha256"],
                  "transform": provenance["transform"], "input_size": int(backbone.input_size or 0),
                  "feature_dim": int(backbone.feature_dim)},
        # Training and scoring decode every photo exactly (Pillow), whatever extract.decoder says.
        preprocessing={**backbone.transform_spec.to_dict(), "decoder": "pillow-exact"},
        precision=precision, made_from=made_from, scores="probabilities", **extra,
    )
    # contiguous copies on the CPU: safetensors stores each tensor on its own, never shared views.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    write_model(folder, config, lambda path: save_file(state, str(path)), model_card(config))
    return config


def load_finetuned(folder, expected: dict | None = None) -> tuple[FineTuneNet, dict]:
    """Rebuild the fine-tuned network on the CPU, in eval mode and frozen, refusing a stale one.

    Returns:
        the network and its config (:func:`~pipeline.model_folder.read_model`).
    """
    config = read_model(folder, expected)
    return finetuned_network(folder, config), config


def finetuned_network(folder, config: dict) -> FineTuneNet:
    """The network of a folder whose ``config.json`` :func:`~pipeline.model_folder.read_model` has checked:
    on the CPU, in eval mode and frozen."""
    if config["kind"] != "finetune":
        raise PipelineError(f"{folder} is a {config['kind']} model, not the fine-tuned network")
    bb_record = config["backbone"]
    # The architecture those weights imply (a ViT's input size, say), nothing read:
    # every weight comes from the state dict.
    bb = load_backbone(bb_record["name"], bb_record["weights"], int(bb_record.get("input_size") or 0),
                       pretrained=False)
    net = FineTuneNet(bb.features, nn.Linear(bb.feature_dim, len(config["classes"])))
    state = load_file(str(weights_path(folder)))
    rows = state.get("head.weight", torch.empty(0)).shape[0]
    if rows != len(config["classes"]):
        raise PipelineError(f"model {folder}: config.json lists {len(config['classes'])} classes but its weights "
                            f"score {rows}; copy the model folder again, or run dvc repro")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise PipelineError(f"cannot load {weights_path(folder)}: {str(e).splitlines()[0][:200]}; copy the model "
                            "folder again, or run dvc repro") from None
    net.requires_grad_(False)
    return net.eval()
