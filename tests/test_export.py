"""``python -m pipeline export --format onnx``: one graph from normalised images to the model's scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import import_or_skip, sample_folder
from helpers_models import good_photos

import pipeline.serve.export as export
from pipeline.__main__ import main
from pipeline.data.images import load_rgb
from pipeline.errors import PipelineError
from pipeline.serve.bundle import load_bundle

pytestmark = pytest.mark.sample_data

onnx = import_or_skip("onnx", "the onnx extra is not installed: pip install -e '.[onnx]'")
ort = import_or_skip("onnxruntime", "the onnx extra is not installed: pip install -e '.[onnx]'")


def _photos():
    """Both shared samples' photos, a few per class: cats, dogs and ten dog breeds."""
    out = []
    for name in ("catsdogs", "dogbreeds10"):
        for c in sorted(sample_folder(name).iterdir()):
            out += sorted(c.iterdir())[:3]
    return out


@pytest.mark.parametrize("name", ["logreg", "svm", "finetune"])
def test_the_graph_scores_as_the_model_on_the_shared_samples(trained, tmp_path, capsys, name):
    project, photos = trained
    out = tmp_path / f"{name}.onnx"
    main(["export", str(project / "models" / name), "--format", "onnx", "--out", str(out), "--check", str(photos)])
    assert "onnxruntime matches on 4 random + 4 photos" in capsys.readouterr().out

    # Checked again here, independently of the exporter's own check, at two batch sizes.
    bundle = load_bundle(project / "models" / name)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.stack([bundle.transform(load_rgb(p)) for p in _photos()])
    for batch in (x[:1], x):
        got = session.run(["probabilities"], {"images": batch.numpy()})[0]
        want = bundle.scores(batch)
        assert got.shape == (len(batch), 2)
        assert np.abs(got - want).max() <= 1e-4
        assert (got.argmax(1) == want.argmax(1)).all()
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["classes"]) == ["cat", "dog"]
    assert json.loads(meta["preprocessing"])["crop"] == 224


def test_a_graph_that_does_not_match_is_not_written(trained, tmp_path, monkeypatch):
    project, _ = trained
    out = tmp_path / "logreg.onnx"
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no graph can match: the check must say so
    with pytest.raises(PipelineError, match=r"the ONNX graph of .*logreg does not match the model: max \|dp\| "
                                            r".* top-1 differs on 0 of 4 images; .*logreg.onnx not written"):
        export.export_onnx(project / "models/logreg", out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unknown_format_is_refused(trained):
    project, _ = trained
    with pytest.raises(PipelineError, match=r"--format 'tflite' is not supported; accepted: onnx"):
        export.run_export(model=project / "models/logreg", fmt="tflite")


def test_the_check_reads_every_good_photo_given(trained):
    """The photos given to --check are all read (here the fixture's folder, its broken file skipped)."""
    project, photos = trained
    x, n = export.check_images(load_bundle(project / "models/logreg"), [photos])
    assert n == len(good_photos(photos)) and len(x) == n + 4
