"""The visualize stage: optvis parts, the networks on pixels, ideal images, PGD, the stage's outputs.

The sample-data tests share two small catsdogs projects built once per session
by the real stage scripts (prepare, extract, train_heads@logreg, evaluate@logreg,
which publishes the head's model folder models/logreg) on 40 cats + 40
dogs: one on efficientnet_lite0 (the attacked model) and one on
efficientnet_lite2 (the network the attack transfers to). Everything runs on
the CPU; the stage's numbers are checked against values computed here
independently (scikit-learn on backbone features, the judge's plain forward
pass on the saved PNGs), in fp32.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers_visualize import check_ideal, features_of, head_prob
from PIL import Image

from pipeline.backbones import load_backbone
from pipeline.config import PARAMETERISATIONS, VisualizeConfig, parse_config
from pipeline.data.images import decode_checked
from pipeline.data.manifest import Row, read_prepared
from pipeline.errors import PipelineError
from pipeline.extract.cache import open_cache
from pipeline.heads.batch import make_head
from pipeline.heads.model import load_head, save_head, to_torch_linear
from pipeline.runtime import Placement, Precision
from pipeline.serve.bundle import load_bundle
from pipeline.visualize import optvis
from pipeline.visualize.attack import pgd_attack
from pipeline.visualize.feature_maps import last_spatial_activation, round_robin
from pipeline.visualize.ideal import ideal_images
from pipeline.visualize.networks import (
    OnPixels,
    head_model,
    imagenet_categories,
    imagenet_model,
)
from pipeline.visualize.pictures import load_pixels
from pipeline.visualize.stage import run_visualize

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"
OTHER = "efficientnet_lite2"  # the transfer target: trained separately, another input size
BF16 = Placement(torch.device("cpu"), Precision("bf16", "test"))

# ------------------------------------------------------------------ fixtures

_CACHE: dict = {}


def _backbone(name: str):
    if name not in _CACHE:
        _CACHE[name] = load_backbone(name)
    return _CACHE[name]


@pytest.fixture
def lite0():
    return _backbone(BACKBONE)


def _build(root: Path, photos: Path, backbone: str) -> Path:
    """A project on ``photos`` through the real stage scripts, features and head in fp32."""
    root.mkdir(parents=True)
    params = {
        "data": {"source": "folder", "folder": str(photos), "test_fraction": 0.25, "seed": 0},
        "backbone": {"name": backbone, "weights": "DEFAULT"},
        "extract": {"batch_size": 16, "device": "cpu", "precision": "fp32", "store": ""},
        "heads": {"cv_folds": 2, "train": {"logreg": {"C": [0.1]}}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for stage in (["prepare"], ["extract"], ["extract", "--extra"], ["train_heads", "logreg"], ["evaluate", "logreg"]):
        subprocess.run([sys.executable, "-m", f"stages.{stage[0]}", *stage[1:]], cwd=root, env=env, check=True,
                       capture_output=True)
    return root


@pytest.fixture
def cd_project(catsdogs, tmp_path_factory):
    """Projects on 40 cats + 40 dogs: ``{"main": lite0 project, "other": lite2 project}`` (built once)."""
    if "projects" not in _CACHE:
        base = tmp_path_factory.mktemp("vis_projects")
        for cls in ("cat", "dog"):
            (base / "photos" / cls).mkdir(parents=True)
            for f in sorted((catsdogs / cls).iterdir())[:40]:
                shutil.copy2(f, base / "photos" / cls / f.name)
        _CACHE["projects"] = {"main": _build(base / "main", base / "photos", BACKBONE),
                              "other": _build(base / "other", base / "photos", OTHER)}
    return _CACHE["projects"]


def _config(visualize: dict, backbone: str = BACKBONE):
    visualize = dict({"device": "cpu", "precision": "fp32"}, **visualize)
    return parse_config({"backbone": {"name": backbone, "weights": "DEFAULT"}, "visualize": visualize})


def _run(root: Path, out: Path, **visualize) -> dict:
    """The stage with the project's logreg head (these projects have no fine-tuned network)."""
    visualize.setdefault("model", str(root / "models/logreg"))
    return run_visualize(_config(visualize), prepared_dir=root / "data/prepared", out_dir=out, progress=False)


class _Tiny(torch.nn.Module):
    """A small random conv net on pixels: fast enough for loop-level checks."""

    def __init__(self, k=5):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, k),
        )

    def forward(self, x):
        return self.net(x)


# --------------------------------------------------------------- optvis parts


def test_objectives_add_subtract_and_scale():
    image = torch.rand(2, 3, 8, 8)
    logits = torch.randn(2, 5)
    step = optvis.Step(image, logits)
    obj = optvis.class_logit(3) - 0.5 * optvis.total_variation() + 2 - optvis.l2()
    want = logits[:, 3] - 0.5 * optvis.total_variation_of(image) + 2 - (image - 0.5).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(obj(step), want)
    per_image = optvis.class_logit(torch.tensor([1, 4]))(step)
    torch.testing.assert_close(per_image, logits[[0, 1], [1, 4]])
    torch.testing.assert_close(
        optvis.class_log_prob(2)(step), torch.log_softmax(logits, 1)[:, 2]
    )
    assert sum([optvis.class_logit(0), optvis.class_logit(1)])(step).shape == (2,)
    assert optvis.total_variation_of(torch.full((1, 3, 5, 5), 0.3)).item() == 0


@pytest.mark.parametrize("name", ["pixel", "fourier"])
def test_parameterisations_give_images_in_unit_range_and_are_seeded(name):
    make = optvis.PARAMETERISATIONS[name]
    with optvis.seeded(3):
        params, image_fn = make((2, 3, 31, 32), sd=1.0)
    with optvis.seeded(3):
        params2, image_fn2 = make((2, 3, 31, 32), sd=1.0)
    x = image_fn()
    assert x.shape == (2, 3, 31, 32) and 0 <= x.min() and x.max() <= 1
    torch.testing.assert_close(x, image_fn2())
    x.sum().backward()
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0


def test_transforms_compose_and_keep_gradients():
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    with optvis.seeded(0):
        y = optvis.standard_transforms()(x)
    assert y.shape[:2] == (2, 3) and 40 <= y.shape[-1] <= 64  # padded by 12, jittered, scaled ±10%
    y.mean().backward()
    assert x.grad.abs().sum() > 0
    assert optvis.jitter(5)(x).shape[-2:] == (36, 36)
    assert optvis.pad(3)(x).shape[-2:] == (46, 46)


def test_render_is_deterministic_given_seed():
    model = _Tiny()

    def run(seed):
        with optvis.seeded(seed):
            return optvis.render(model, optvis.class_logit(2), optvis.fourier_image((1, 3, 32, 32)),
                                 transforms=optvis.standard_transforms(shift=4), optimizer=optvis.adam(0.05), steps=5)

    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("compute", [Placement(), BF16], ids=["fp32", "bf16"])
def test_pgd_stays_in_the_ball_and_in_unit_range(compute):
    model = _Tiny().eval()
    x = torch.rand(4, 3, 24, 24)
    x[0] = 0  # corners of [0, 1] must hold too
    x[1] = 1
    for eps in (1 / 255, 8 / 255):
        adv = pgd_attack(model, x, 3, eps=eps, steps=5, compute=compute)
        assert adv.dtype == torch.float32
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        torch.testing.assert_close(adv, pgd_attack(model, x, 3, eps=eps, steps=5, compute=compute), rtol=0, atol=0)


def test_last_spatial_activation_finds_the_map_before_pooling(lite0):
    name, act = last_spatial_activation(lite0.features, torch.rand(1, 3, 224, 224))
    assert name == "bn2" and act.shape == (1, 1280, 7, 7)
    resnet = load_backbone("resnet18", "none")
    name, act = last_spatial_activation(resnet.features, torch.rand(1, 3, 224, 224))
    assert name == "layer4" and act.shape == (1, 512, 7, 7)


def test_imagenet_images_need_an_imagenet_classifier():
    bb = load_backbone("squeezenet1_0", "none")  # these weights come with no ImageNet classifier
    with pytest.raises(PipelineError, match="visualize.imagenet_classes needs an ImageNet classifier"):
        imagenet_model(bb)
    with pytest.raises(PipelineError, match="visualize.judge needs"):
        imagenet_model(bb, "visualize.judge")


def test_round_robin_takes_classes_in_turn():
    rows = [Row(f"{c}{i}.jpg", label, "test", "") for c, label, n in (("b", 1, 3), ("a", 0, 1)) for i in range(n)]
    assert [r.path for r in round_robin(rows, 3)] == ["a0.jpg", "b0.jpg", "b1.jpg"]
    assert [r.path for r in round_robin(rows, 9)] == ["a0.jpg", "b0.jpg", "b1.jpg", "b2.jpg"]


def test_settings_are_checked():
    assert set(PARAMETERISATIONS) == set(optvis.PARAMETERISATIONS)  # config's names are optvis's
    assert VisualizeConfig.from_mapping({"attack": {"eps": [0.5, 0.1]}}, "visualize").attack.eps == (0.1, 0.5)
    bad = [
        ({"param": "wavelet"}, "visualize.param"),
        ({"stpes": 3}, "visualize.stpes"),
        # A model folder: the files of the layout before model folders (pickles) are refused, saying what to give.
        ({"model": "models/finetune.pt"}, r"visualize.model must be a model folder: models/finetune "
                                          r"\(the fine-tuned network\) or models/<head> \(a head of heads.train\), "
                                          r"found 'models/finetune.pt'"),
        ({"model": "models/finetune.json"}, r"visualize.model must be a model folder"),
        ({"model": "models/logreg.joblib"}, r"models/<head> \(a head of heads.train\), found 'models/logreg.joblib'"),
        ({"model": ""}, r"visualize.model must be a model folder"),
        ({"precision": "fp8"}, "visualize.precision"),
        ({"attack": {"eps": [0, 2]}}, "attack.eps"),
        ({"attack": {"random_start": "yes"}}, "attack.random_start"),
        ({"attack": {"transfer_to": "resnet18"}}, "transfer"),
        ({"imagenet_classes": [1000]}, "imagenet_classes"),
        ({"feature_maps": {"channels": 0}}, "feature_maps.channels"),
    ]
    for given, match in bad:
        with pytest.raises(PipelineError, match=match):
            VisualizeConfig.from_mapping(given, "visualize")


@pytest.mark.sample_data
def test_load_pixels_checks_the_content_hash(catsdogs, tmp_path, lite0, capsys):
    """A photo that changed since prepare listed it is skipped, not silently used."""
    cat, dog = sorted((catsdogs / "cat").iterdir())[0], sorted((catsdogs / "dog").iterdir())[0]
    shutil.copy2(cat, tmp_path / "a.jpg")
    shutil.copy2(cat, tmp_path / "b.jpg")
    rows = [Row(p, 0, "test", hashlib.sha256((tmp_path / p).read_bytes()).hexdigest()) for p in ("a.jpg", "b.jpg")]
    shutil.copy2(dog, tmp_path / "b.jpg")  # b.jpg is now another photo than the one listed
    kept, x = load_pixels(tmp_path, rows, lite0.transform_spec.pixels())
    assert [r.path for r in kept] == ["a.jpg"] and x.shape == (1, 3, 224, 224)
    assert "skipped b.jpg: file changed" in capsys.readouterr().out
    assert 0 <= x.min() and x.max() <= 1


# ------------------------------------------------- the networks on pixels


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", ["logreg", "svm"])
def test_centred_folded_head_matches_sklearn(name, n_classes):
    rng = np.random.default_rng(1)
    X = rng.normal(3, 5, (30 * n_classes, 6)) + np.repeat(np.arange(n_classes), 30)[:, None] * 2
    y = np.repeat(np.arange(n_classes), 30)
    est = make_head(name, C=[1.0], cv_folds=2).fit(X, y).best_estimator_
    # 6 features = a (3, 1, 2) "image", passed through the identity normalisation.
    net = torch.nn.Sequential(torch.nn.Flatten(), to_torch_linear(est))
    model = OnPixels(net, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), center_logits=n_classes == 2)
    with torch.no_grad():
        logits = model(torch.from_numpy(X).float().view(-1, 3, 1, 2)).double().numpy()
    np.testing.assert_array_equal(logits.argmax(1), est.predict(X))
    if name == "logreg":
        np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), est.predict_proba(X),
                                   atol=1e-5)
    if n_classes == 2:  # centred: the first class's logit moves with the margin
        np.testing.assert_allclose(logits[:, 0], -logits[:, 1], atol=1e-5)


@pytest.mark.sample_data
def test_head_model_on_pixels_matches_sklearn_on_cachedfeatures_of(cd_project, lite0):
    root = cd_project["main"]
    fs = open_cache(root / "data/features" / f"{BACKBONE}.h5")
    bundle = load_bundle(root / "models", "logreg")
    est = bundle.estimator
    prepared = read_prepared(root / "data/prepared")
    idx = np.r_[0:4, len(fs.paths) - 4 : len(fs.paths)]  # cats and dogs
    x = torch.stack([decode_checked(prepared.root, fs.rows()[i], lite0.transform_spec.pixels())[0] for i in idx])
    model = head_model(bundle)
    with torch.no_grad():
        # The folded head on the cached features: scikit-learn's numbers.
        logits = model.network.head(torch.from_numpy(fs.features))
        cached = (logits - logits.mean(1, keepdim=True)).softmax(1).numpy()
        # The whole torch model on pixels: the same up to float32 noise of the backbone.
        prob = model(x).softmax(1).numpy()
        with BF16.autocast():
            prob_bf16 = model(x).softmax(1).numpy()
    np.testing.assert_array_equal(cached.argmax(1), est.predict(fs.features))
    np.testing.assert_allclose(cached, est.predict_proba(fs.features), atol=1e-5)
    np.testing.assert_array_equal(prob.argmax(1), est.predict(fs.features[idx]))
    np.testing.assert_allclose(prob, est.predict_proba(fs.features[idx]), atol=2e-3)
    assert set(est.predict(fs.features[idx])) == {0, 1}
    # bf16 autocast: float32 logits out, the same predictions, probabilities to bf16's precision.
    assert prob_bf16.dtype == np.float32
    np.testing.assert_array_equal(prob_bf16.argmax(1), prob.argmax(1))
    np.testing.assert_allclose(prob_bf16, prob, atol=0.05)


# ------------------------------------------------------------- ideal images


def test_ideal_imagenet_cat_is_confident_and_tv_penalty_smooths_it(lite0):
    model = imagenet_model(lite0)
    kw = dict(size=224, param="fourier", steps=48, lr=0.05, seed=0, progress=False)
    rough = ideal_images(model, [285], tv_weight=0.0, **kw)
    smooth = ideal_images(model, [285], tv_weight=1000.0, **kw)
    with torch.no_grad():
        p_rough = model(rough).softmax(1)[0, 285].item()
        p_smooth = model(smooth).softmax(1)[0, 285].item()
    tv_rough = optvis.total_variation_of(rough).item()
    tv_smooth = optvis.total_variation_of(smooth).item()
    print(f"class 285: p={p_rough:.3f} TV={tv_rough:.4f} (tv_weight 0); p={p_smooth:.3f} TV={tv_smooth:.4f}")
    assert p_rough >= 0.9 and p_smooth >= 0.9
    assert tv_smooth < 0.8 * tv_rough
    assert imagenet_categories()[285] == "Egyptian cat"


# ---------------------------------------------------------------------- PGD


@pytest.mark.sample_data
def test_pgd_turns_dogs_into_cats(cd_project, catsdogs, lite0):
    model = head_model(load_bundle(cd_project["main"] / "models", "logreg"))
    pixels = lite0.transform_spec.pixels()
    held_out = sorted((catsdogs / "dog").iterdir())[60:70]  # not among the 40 the head saw
    x = torch.stack([decode_checked(catsdogs / "dog", Row(p.name, 1, "test", ""), pixels)[0] for p in held_out])
    with torch.no_grad():
        x = x[model(x).argmax(1) == 1]  # correctly classified dogs
    assert len(x) >= 8
    rates = []
    for eps in (0.25 / 255, 1 / 255, 8 / 255):  # the smallest does not always succeed
        adv = pgd_attack(model, x, 0, eps=eps, steps=10, seed=0)
        assert (adv - x).abs().max().item() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            rates.append((model(adv).argmax(1) == 0).float().mean().item())
    print("success rate at 0.25, 1, 8 /255:", rates)
    assert rates == sorted(rates)
    assert rates[-1] >= 0.9


# -------------------------------------------------------------------- stage


def _expected_attack(projects: dict, lite0, settings: dict) -> dict:
    """Per ε: (fooled, mean target probability, transfer fooled), with scikit-learn heads on plain features."""
    a = settings["attack"]
    root = projects["main"]
    prepared = read_prepared(root / "data/prepared")
    head, _ = load_head(root / "models/logreg")
    other, _ = load_head(projects["other"] / "models/logreg")
    source, target = prepared.classes.index(a["source"]), prepared.classes.index(a["target"])
    pixels = lite0.transform_spec.pixels()
    x = torch.stack([decode_checked(prepared.root, r, pixels)[0] for r in prepared.split("test") if r.label == source])
    x0 = x[head.predict(features_of(lite0, x).numpy()) == source][: a["max_images"]]
    model = head_model(load_bundle(root / "models", "logreg"))
    out = {}
    for eps in a["eps"]:
        adv = pgd_attack(model, x0, target, eps=eps, steps=a["steps"], seed=0)
        prob = head.predict_proba(features_of(lite0, adv).numpy())[:, target]
        fooled_other = other.predict(features_of(_backbone(OTHER), adv).numpy()) == target
        out[round(eps, 6)] = (int((prob > 0.5).sum()), float(prob.mean()), int(fooled_other.sum()))
    return out


@pytest.mark.sample_data
def test_stage_writes_images_and_reports(cd_project, tmp_path, lite0):
    out = tmp_path / "reports" / "visualize"
    root = cd_project["main"]
    settings = dict(
        imagenet_classes=[285, 340], steps=16,
        # The adversarial images are shown to a second network: lite2 with a head trained on its own features.
        attack=dict(source="dog", target="cat", eps=[2 / 255, 8 / 255], steps=5, max_images=4, save=2,
                    transfer_to=OTHER, transfer_head=str(cd_project["other"] / "models/logreg")),
        feature_maps=dict(images=2, channels=9),
    )
    res = _run(root, out, **settings)

    ideal = json.loads((out / "ideal.json").read_text())
    assert list(ideal) == ["cat", "dog", "in285_egyptian_cat", "in340_zebra"]
    head, config = load_head(root / "models/logreg")
    check_ideal(ideal, out / "ideal", lite0, config["classes"], head_prob(head, lite0))
    for key in ideal:
        with Image.open(out / "ideal" / f"{key}.png") as im:
            assert im.size == (224, 224) and im.mode == "RGB"
    with Image.open(out / "ideal_grid.png") as im:
        im.verify()

    attack = json.loads((out / "attack.json").read_text())
    assert attack["source"] == "dog" and attack["target"] == "cat" and attack["n_images"] == 4
    assert attack["transfer_to"] == OTHER
    expected = _expected_attack(cd_project, lite0, settings)
    print("expected (fooled, mean p, transfer fooled) per eps:", expected)
    for r in attack["eps"].values():
        fooled, mean_p, transfer_fooled = expected[r["eps"]]
        assert r["success_rate"] == fooled / 4 and r["mean_target_prob"] == pytest.approx(mean_p, abs=1e-4)
        assert r["transfer_fooled"] == transfer_fooled and r["transfer_success_rate"] == transfer_fooled / 4
    # The second network is not the attacked one: it is fooled less often.
    assert any(r["transfer_success_rate"] < r["success_rate"] for r in attack["eps"].values())
    with open(out / "attack.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [list(map(float, r.values())) for r in rows] == [
        [r["eps"], r["success_rate"], r["mean_target_prob"]] for r in attack["eps"].values()]
    names = sorted(p.name for p in (out / "attack").iterdir())
    assert names == [f"{k}_{w}.png" for k in (0, 1) for w in ("adversarial", "difference", "original")]
    with Image.open(out / "attack" / "0_original.png") as o, Image.open(out / "attack" / "0_adversarial.png") as a:
        assert o.size == a.size == (224, 224)
        diff = np.abs(np.asarray(o, dtype=int) - np.asarray(a, dtype=int)).max()
        assert diff <= round(8 / 255 * 255) + 1  # within ε, up to 8-bit rounding

    maps = sorted((out / "feature_maps").iterdir())
    assert [p.name for p in maps] == ["0_cat.png", "1_dog.png"]
    with Image.open(maps[0]) as im:
        assert im.size == (224 + 4 + 3 * (224 // 3), 224)
    assert res["attack"] == attack and res["ideal"] == ideal


@pytest.mark.sample_data
def test_stage_needs_no_feature_cache_and_refuses_bad_input(cd_project, tmp_path):
    root = tmp_path / "proj"
    shutil.copytree(cd_project["main"], root)
    fs = open_cache(root / "data/features" / f"{BACKBONE}.h5")
    shutil.rmtree(root / "data/features")  # visualize lists test photos from the manifest
    tiny = dict(steps=1, imagenet_classes=[], judge="", feature_maps=dict(images=1, channels=1),
                attack=dict(eps=[8 / 255], steps=1, max_images=1, save=0))
    res = _run(root, tmp_path / "ok", **tiny)
    assert res["attack"]["n_images"] == 1 and list(res["ideal"]) == ["cat", "dog"]

    # The registry checks the names, and says which key gave them.
    with pytest.raises(PipelineError, match=r"unknown backbone 'no_such_net' \(visualize.judge\)"):
        _run(root, tmp_path / "out", **dict(tiny, judge="no_such_net", imagenet_classes=[1]))
    with pytest.raises(PipelineError, match=r"unknown backbone 'no_such_net' \(visualize.attack.transfer_to\)"):
        _run(root, tmp_path / "out", **dict(tiny, attack=dict(tiny["attack"], transfer_to="no_such_net",
                                                               transfer_head="models/logreg")))
    with pytest.raises(PipelineError, match=r"model folder .*models/finetune not found; run dvc repro"):
        _run(root, tmp_path / "out", **dict(tiny, model=str(root / "models/finetune")))
    with pytest.raises(PipelineError, match="not a class of the logreg head"):
        _run(root, tmp_path / "out", **dict(tiny, classes=["horse"]))
    with pytest.raises(PipelineError, match="attack.target 'horse'"):
        _run(root, tmp_path / "out", **dict(tiny, attack=dict(tiny["attack"], target="horse")))
    X, y = fs.subset("train")
    _, saved = load_head(root / "models/logreg")
    search = make_head("logreg", C=[0.1], cv_folds=2).fit(X, y)
    save_head(root / "models/logreg", search, attrs=dict(fs.attrs, backbone="resnet50"), made_from=saved["made_from"],
              classes=fs.classes, kind="logreg", description="logistic regression")
    with pytest.raises(PipelineError, match="stale"):
        _run(root, tmp_path / "out", **tiny)
    assert not (tmp_path / "out").exists()
