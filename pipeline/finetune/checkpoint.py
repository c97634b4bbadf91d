"""The fine-tuned network on disk: ``models/finetune.pt`` and ``models/finetune.json``.

``finetune.pt`` is a plain state dict of the whole network (``features.*``,
``head.*``); ``finetune.json`` beside it says what it is: backbone, weights,
classes, transform (a :class:`~pipeline.data.transform.TransformSpec` dict),
provenance and the training summary. Scorers load it through
:func:`pipeline.serve.bundle.load_bundle`.

Example:
    >>> net, info = load_finetuned("models/finetune.pt")              # doctest: +SKIP
    >>> TransformSpec.from_dict(info["transform"]).build()(image)      # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.backbones import Backbone, load_backbone
from pipeline.errors import PipelineError
from pipeline.extract.cache import check_provenance
from pipeline.fileio import atomic_path, read_json, write_json
from pipeline.finetune.network import FineTuneNet

FORMAT = "transfer-pipeline finetune v1"


def save_finetuned(path, net: FineTuneNet, backbone: Backbone, classes: list[str], **extra) -> dict:
    """Write ``path`` (a plain state dict) and its ``.json`` description, each atomically.

    Args:
        backbone: the backbone the network was built from: its name, weights,
            transform and provenance are recorded.
        **extra: more JSON entries (training summary, params).

    Returns:
        the description written.
    """
    path = Path(path)
    info = {
        "format": FORMAT,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "input_size": backbone.input_size,
        "classes": list(classes),
        "transform": backbone.transform_spec.to_dict(),
        "provenance": backbone.provenance(),
        "torch_version": str(torch.__version__),
        **extra,
    }
    state = {k: v.detach().to("cpu") for k, v in net.state_dict().items()}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    write_json(path.with_suffix(".json"), info)
    return info


def read_description(path, expected: dict | None = None) -> dict:
    """``finetune.json`` beside ``path``, checked: a fine-tuned model of this project, not stale.

    Args:
        expected: provenance keys (backbone, weights, weights_sha256, transform)
            and ``classes`` it must match.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"fine-tuned model {path} not found; run the finetune stage first (dvc repro)")
    info = read_json(path.with_suffix(".json"), f"description of {path}")
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise PipelineError(f"{path.with_suffix('.json')} is not a fine-tuned model description of this "
                            "project; run the finetune stage again (dvc repro)")
    check_provenance(dict(info["provenance"], classes=info["classes"]), expected or {}, f"fine-tuned model {path}")
    return info


def load_finetuned(path, expected: dict | None = None) -> tuple[FineTuneNet, dict]:
    """Rebuild the fine-tuned network on the CPU, in eval mode and frozen, refusing a stale one.

    Returns:
        the network and its JSON description (:func:`read_description`).
    """
    path = Path(path)
    info = read_description(path, expected)
    # The architecture those weights imply (a ViT's input size, say), nothing read:
    # every weight comes from the state dict.
    bb = load_backbone(info["backbone"], info["weights"], info.get("input_size", 0), pretrained=False)
    net = FineTuneNet(bb.features, nn.Linear(bb.feature_dim, len(info["classes"])))
    try:
        # weights_only: a checkpoint is data; never let it run code on load.
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any failure means the same to the user
        raise PipelineError(
            f"cannot load {path}: {str(e).splitlines()[0][:200]}; run the finetune stage again (dvc repro)"
        ) from None
    net.requires_grad_(False)
    return net.eval(), info
