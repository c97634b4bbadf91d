"""The visualize stage: optvis parts, the folded torch head, ideal images, PGD, the stage's outputs.

The sample-data tests share one small catsdogs project (40 cats + 40 dogs through
prepare, extract with efficientnet_lite0 and a logreg head), built once per
session; everything runs on the CPU in about a minute.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.visualize.stage import optvis
from pipeline.backbones import load_backbone
from pipeline.errors import PipelineError
from pipeline.data.images import load_rgb
from pipeline.visualize.stage import (
    DEFAULTS,
    _settings,
    head_model,
    ideal_images,
    imagenet_categories,
    imagenet_model,
    pgd_attack,
    pixel_transform,
    run_visualize,
)

BACKBONE = "efficientnet_lite0"


# ------------------------------------------------------------------ fixtures

_CACHE: dict = {}


@pytest.fixture
def lite0():
    if "lite0" not in _CACHE:
        _CACHE["lite0"] = load_backbone(BACKBONE)
    return _CACHE["lite0"]


@pytest.fixture
def cd_project(catsdogs, tmp_path_factory, lite0):
    """A prepared, extracted, trained project on 40 cats + 40 dogs (built once)."""
    if "project" in _CACHE:
        return _CACHE["project"]
    from pipeline.data.sources import prepare
    from pipeline.extract.local import extract_features
    from pipeline.data.manifest import read_prepared
    from pipeline.heads.batch import train_head

    root = tmp_path_factory.mktemp("vis_project")
    for cls in ("cat", "dog"):
        (root / "photos" / cls).mkdir(parents=True)
        for f in sorted((catsdogs / cls).iterdir())[:40]:
            shutil.copy2(f, root / "photos" / cls / f.name)
    prepare(source="folder", folder=root / "photos", out_dir=root / "data/prepared", test_fraction=0.25, seed=0)
    prepared = read_prepared(root / "data/prepared")
    features = root / "data/features" / f"{BACKBONE}.h5"
    extract_features(lite0, root=prepared.root, rows=prepared.rows, classes=prepared.classes,
                     out_path=features, batch_size=16, device="cpu")
    train_head(name="logreg", features_file=features, models_dir=root / "models", C=[0.1],
               max_iter=2000, cv_folds=2, seed=0)
    _CACHE["project"] = root
    return root


def _stage_kwargs(root: Path, out: Path) -> dict:
    return dict(prepared_dir=root / "data/prepared", features_file=root / "data/features" / f"{BACKBONE}.h5",
                models_dir=root / "models", backbone=BACKBONE, weights="DEFAULT", out_dir=out,
                device="cpu", progress=False)


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


def test_pgd_stays_in_the_ball_and_in_unit_range():
    model = _Tiny().eval()
    x = torch.rand(4, 3, 24, 24)
    x[0] = 0  # corners of [0, 1] must hold too
    x[1] = 1
    for eps in (1 / 255, 8 / 255):
        adv = pgd_attack(model, x, 3, eps=eps, steps=5)
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        torch.testing.assert_close(adv, pgd_attack(model, x, 3, eps=eps, steps=5), rtol=0, atol=0)


def test_last_spatial_activation_finds_the_map_before_pooling(lite0):
    name, act = optvis.last_spatial_activation(lite0.features, torch.rand(1, 3, 224, 224))
    assert name == "bn2" and act.shape == (1, 1280, 7, 7)
    resnet = load_backbone("resnet18", "none")
    name, act = optvis.last_spatial_activation(resnet.features, torch.rand(1, 3, 224, 224))
    assert name == "layer4" and act.shape == (1, 512, 7, 7)


def test_settings_are_checked():
    assert _settings({})["attack"]["eps"] == sorted(DEFAULTS["attack"]["eps"])
    with pytest.raises(PipelineError, match="visualize.param"):
        _settings({"param": "wavelet"})
    with pytest.raises(PipelineError, match="visualize.stpes"):
        _settings({"stpes": 3})
    with pytest.raises(PipelineError, match="attack.eps"):
        _settings({"attack": {"eps": [0, 2]}})
    with pytest.raises(PipelineError, match="visualize.judge"):
        _settings({"judge": "alexnet"})
    with pytest.raises(PipelineError, match="transfer"):
        _settings({"attack": {"transfer_to": "resnet18"}})


# ------------------------------------------------- folded head == scikit-learn


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", ["logreg", "svm"])
def test_head_model_logits_match_sklearn(name, n_classes):
    from pipeline.heads.batch import make_head

    rng = np.random.default_rng(1)
    X = rng.normal(3, 5, (30 * n_classes, 6)) + np.repeat(np.arange(n_classes), 30)[:, None] * 2
    y = np.repeat(np.arange(n_classes), 30)
    est = make_head(name, C=[1.0], cv_folds=2).fit(X, y).best_estimator_

    class FakeBackbone:  # head_model only needs the features module and the transform spec
        features = torch.nn.Flatten()
        transform_spec = type("S", (), {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})()

    model = head_model(FakeBackbone(), est)
    # 6 features = a (3, 1, 2) "image", passed through the identity normalisation.
    with torch.no_grad():
        logits = model(torch.from_numpy(X).float().view(-1, 3, 1, 2)).double().numpy()
    np.testing.assert_array_equal(logits.argmax(1), est.predict(X))
    if name == "logreg":
        np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), est.predict_proba(X),
                                   atol=1e-5)
    if n_classes == 2:  # centred: the first class's logit moves with the margin
        np.testing.assert_allclose(logits[:, 0], -logits[:, 1], atol=1e-5)


@pytest.mark.sample_data
def test_head_model_on_pixels_matches_sklearn_on_cached_features(cd_project, lite0):
    from pipeline.data.manifest import read_prepared
    from pipeline.extract.local import read_features
    from pipeline.heads.batch import load_head

    fs = read_features(cd_project / "data/features" / f"{BACKBONE}.h5")
    est = load_head(cd_project / "models/logreg.joblib")["estimator"]
    root = read_prepared(cd_project / "data/prepared").root
    idx = np.r_[0:4, len(fs.paths) - 4 : len(fs.paths)]  # cats and dogs
    x = torch.stack([pixel_transform(lite0.transform_spec)(load_rgb(root / fs.paths[i])) for i in idx])
    model = head_model(lite0, est)
    with torch.no_grad():
        # The folded head on the cached features: scikit-learn's numbers.
        logits = model.head(torch.from_numpy(fs.features))
        cached = (logits - logits.mean(1, keepdim=True)).softmax(1).numpy()
        # The whole torch model on pixels: the same up to float32 noise of the backbone.
        prob = model(x).softmax(1).numpy()
    np.testing.assert_array_equal(cached.argmax(1), est.predict(fs.features))
    np.testing.assert_allclose(cached, est.predict_proba(fs.features), atol=1e-5)
    np.testing.assert_array_equal(prob.argmax(1), est.predict(fs.features[idx]))
    np.testing.assert_allclose(prob, est.predict_proba(fs.features[idx]), atol=2e-3)
    assert set(est.predict(fs.features[idx])) == {0, 1}


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
    from pipeline.heads.batch import load_head

    est = load_head(cd_project / "models/logreg.joblib")["estimator"]
    model = head_model(lite0, est)
    t = pixel_transform(lite0.transform_spec)
    held_out = sorted((catsdogs / "dog").iterdir())[60:70]  # not among the 40 the head saw
    x = torch.stack([t(load_rgb(p)) for p in held_out])
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


@pytest.mark.sample_data
def test_stage_writes_images_and_reports(cd_project, tmp_path):
    out = tmp_path / "reports" / "visualize"
    settings = dict(
        imagenet_classes=[285, 340], steps=16,
        # transfer to the same backbone and head: plumbing only, it must agree with the attacked model
        attack=dict(source="dog", target="cat", eps=[2 / 255, 8 / 255], steps=5, max_images=4, save=2,
                    transfer_to=BACKBONE, transfer_head=str(cd_project / "models/logreg.joblib")),
        feature_maps=dict(images=2, channels=9),
    )
    res = run_visualize(**_stage_kwargs(cd_project, out), **settings)

    ideal = json.loads((out / "ideal.json").read_text())
    assert set(ideal) == {"cat", "dog", "in285_egyptian_cat", "in340_zebra"}
    for key in ("in285_egyptian_cat", "in340_zebra"):
        row = ideal[key]
        assert 0 <= row["judge_prob"] <= 1 and 1 <= row["judge_rank"] <= 1000 and row["judge_top1"]
        assert 0 < row["target_prob"] <= 1 and row["total_variation"] > 0
    assert ideal["cat"]["judge_prob"] is None and ideal["cat"]["judge_note"]
    for key in ideal:
        with Image.open(out / "ideal" / f"{key}.png") as im:
            assert im.size == (224, 224) and im.mode == "RGB"
    with Image.open(out / "ideal_grid.png") as im:
        im.verify()

    attack = json.loads((out / "attack.json").read_text())
    assert attack["source"] == "dog" and attack["target"] == "cat" and attack["n_images"] == 4
    assert [r["eps"] for r in attack["eps"].values()] == [round(2 / 255, 6), round(8 / 255, 6)]
    with open(out / "attack.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["eps", "success_rate", "mean_target_prob"] and len(rows) == 2
    assert float(rows[1]["success_rate"]) >= float(rows[0]["success_rate"])
    for r in attack["eps"].values():
        assert r["transfer_success_rate"] == r["success_rate"]
        assert r["transfer_fooled"] == round(r["success_rate"] * 4)
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
def test_stage_refuses_a_head_of_another_backbone(cd_project, tmp_path):
    from pipeline.extract.local import read_features
    from pipeline.heads.batch import make_head, save_head

    root = tmp_path / "proj"
    shutil.copytree(cd_project, root)
    fs = read_features(root / "data/features" / f"{BACKBONE}.h5")
    X, y = fs.subset("train")
    search = make_head("logreg", C=[0.1], cv_folds=2).fit(X, y)
    prov = {k: fs.attrs[k] for k in ("backbone", "weights", "weights_sha256", "transform")}
    save_head(root / "models/logreg.joblib", search, dict(prov, backbone="resnet50"), fs.classes)
    with pytest.raises(PipelineError, match="stale"):
        run_visualize(**_stage_kwargs(root, tmp_path / "out"), steps=1)
    with pytest.raises(PipelineError, match="not a class of the logreg head"):
        shutil.copy2(cd_project / "models/logreg.joblib", root / "models/logreg.joblib")
        run_visualize(**_stage_kwargs(root, tmp_path / "out"), steps=1, classes=["horse"])
    assert not (tmp_path / "out").exists()
