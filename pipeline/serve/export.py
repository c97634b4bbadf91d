"""``python -m pipeline export``: a model folder as one ONNX graph, checked against the model before it is kept.

The graph goes from a batch of normalised images (``images``: N x 3 x crop x
crop, float32, the model's preprocessing applied; N is dynamic) to the scores
the model gives (``probabilities``: N x classes): the backbone and the head
(its scaler folded into the linear layer), or the fine-tuned network. Its
metadata carries the classes and the preprocessing as JSON, so a runtime
elsewhere needs nothing else.

Before the file is kept, onnxruntime runs it on a seeded random batch and on
any photos given (``--check``), and its scores must match the model's own
(:meth:`~pipeline.serve.bundle.Bundle.scores`, the path predict takes) within
``TOLERANCE`` with the same top-1 on every image; otherwise nothing is written
and the error says by how much they differ.

Example:
    $ python -m pipeline export models/logreg --format onnx --check photos/
    export: models/logreg -> logreg.onnx (15.9 MB): onnxruntime matches on 4 random + 20 photos, max |dp| 3.2e-07
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.data.images import decode_checked
from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_path
from pipeline.serve.bundle import Bundle, load_bundle
from pipeline.serve.predict import collect

#: The largest difference of any score between the graph and the model (fp32).
TOLERANCE = 1e-4
FORMATS = ("onnx",)
CHECK_BATCH = 32


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError as e:
        raise PipelineError(f"export --format onnx needs the onnx extra ({e.name} is not installed): "
                            "pip install 'transfer-pipeline[onnx]'") from None
    return onnx, onnxruntime


def check_images(bundle: Bundle, paths, seed: int = 0) -> tuple[torch.Tensor, int]:
    """The batch parity is checked on: 4 seeded random images, then every readable photo of ``paths``."""
    crop = bundle.transform_spec.crop
    g = torch.Generator().manual_seed(seed)
    batch = [torch.randn(4, 3, crop, crop, generator=g)]
    files, _ = collect(paths)
    transform = bundle.transform
    photos = 0
    for f in files:
        # A user's photo has no recorded hash: read unchecked, through the one image reader.
        x, _ = decode_checked("", Row(str(f), -1, "", ""), transform)
        if x is not None:  # an unreadable photo is predict's business, not the graph's
            batch.append(x.unsqueeze(0))
            photos += 1
    return torch.cat(batch), photos


def export_onnx(model, out=None, *, check=()) -> dict:
    """Write model folder ``model`` as an ONNX graph at ``out`` (default ``<name>.onnx``), parity checked.

    Args:
        model: a model folder (``models/logreg``, ``models/finetune``, or a copy anywhere).
        out: the file to write.
        check: photos (files or folders) the parity check also runs on.

    Returns:
        ``{"path", "bytes", "max_abs_diff", "n_random", "n_photos"}``.

    Raises:
        PipelineError: the onnx extra is missing, or the graph's scores differ
            from the model's by more than :data:`TOLERANCE` or in a top-1 class
            (the file is then not written).
    """
    onnx, ort = _onnx_modules()
    bundle = load_bundle(model)
    out = Path(out) if out else Path(f"{bundle.name}.onnx")
    net = bundle.scoring_network().float()
    crop = bundle.transform_spec.crop
    example = torch.zeros(2, 3, crop, crop)
    batch = torch.export.Dim("batch", min=1)
    x, n_photos = check_images(bundle, list(check))
    # Renamed into place only once the graph matches; removed otherwise.
    with atomic_path(out, suffix=".onnx") as tmp:
        with torch.no_grad():
            torch.onnx.export(net, (example,), tmp, input_names=["images"], output_names=["probabilities"],
                              dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
        graph = onnx.load(tmp)
        meta = {"classes": json.dumps(bundle.classes), "preprocessing": json.dumps(bundle.config["preprocessing"]),
                "scores": bundle.config["scores"], "backbone": json.dumps(bundle.config["backbone"]),
                "made_from": json.dumps(bundle.config["made_from"])}
        for key, value in meta.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(graph, tmp)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        # In batches: a few hundred photos at once would hold gigabytes of activations.
        got = np.concatenate([session.run(None, {"images": x[i:i + CHECK_BATCH].numpy()})[0]
                              for i in range(0, len(x), CHECK_BATCH)])
        want = np.concatenate([bundle.scores(x[i:i + CHECK_BATCH]) for i in range(0, len(x), CHECK_BATCH)])
        diff = float(np.abs(got - want).max())
        flipped = int((got.argmax(1) != want.argmax(1)).sum())
        if diff > TOLERANCE or flipped:
            raise PipelineError(f"the ONNX graph of {model} does not match the model: max |dp| {diff:.2e} "
                                f"(tolerance {TOLERANCE:g}), top-1 differs on {flipped} of {len(x)} images; "
                                f"{out} not written")
    result = {"path": str(out), "bytes": out.stat().st_size, "max_abs_diff": diff, "n_random": len(x) - n_photos,
              "n_photos": n_photos}
    print(f"export: {model} -> {out} ({result['bytes'] / 1e6:.1f} MB): onnxruntime matches on "
          f"{result['n_random']} random + {n_photos} photos, max |dp| {diff:.1e}", flush=True)
    return result


def run_export(*, model, fmt: str = "onnx", out=None, check=()) -> dict:
    """The ``export`` command."""
    if fmt not in FORMATS:
        raise PipelineError(f"--format {fmt!r} is not supported; accepted: {', '.join(FORMATS)}")
    return export_onnx(model, out, check=check)
