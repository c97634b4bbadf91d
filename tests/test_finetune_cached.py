"""finetune.cached_views: training over cached activations is full fine-tuning on the same views, cheaper."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers_images import make_class_folder, sha256
from helpers_models import BACKBONE
from torch import nn

from pipeline.backbones import load_backbone
from pipeline.config import Config, EvaluateConfig, FinetuneConfig
from pipeline.data.manifest import Row
from pipeline.data.transform import TransformSpec
from pipeline.errors import PipelineError
from pipeline.finetune.cached import Split, cached_views, check_split
from pipeline.finetune.network import FineTuneNet
from pipeline.finetune.resume import Checkpoints
from pipeline.finetune.stage import run_finetune
from pipeline.finetune.train import fit
from pipeline.runtime import cpu_has_native_bf16, place

SMALL = TransformSpec(72, 64, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _photos(tmp_path: Path):
    folder = make_class_folder(tmp_path / "photos", {"red": 8, "blue": 8})
    rows = [Row(f"{c}/{f.name}", label, "train", sha256(f))
            for label, c in enumerate(("blue", "red")) for f in sorted((folder / c).iterdir())]
    return folder, rows[:6] + rows[8:14], rows[6:8] + rows[14:]


def _small_resnet():
    torch.manual_seed(0)
    bb = dataclasses.replace(load_backbone("resnet18", "none"), transform_spec=SMALL)
    return bb, FineTuneNet(bb.features, nn.Linear(bb.feature_dim, 2))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_loss_trajectory_equals_full_finetuning_on_the_same_views(tmp_path, precision):
    """K views >= epochs: every epoch reads the very crops full fine-tuning decodes, so the runs agree."""
    if precision == "bf16" and not cpu_has_native_bf16():
        precision = "fp32"  # emulated bf16 is slow and changes nothing this test is about
    folder, train, val = _photos(tmp_path)
    cfg = FinetuneConfig(epochs=3, batch_size=4, device="cpu", precision=precision, lr_backbone=1e-3, lr_head=1e-3,
                         patience=5, cached_views=3, augment=dataclasses.replace(FinetuneConfig().augment,
                                                                                 erasing=0.5))
    runs = {}
    for cached in (False, True):
        bb, net = _small_resnet()
        views = cached_views(net, backbone=bb, root=folder, train_rows=train, val_rows=val, cfg=cfg,
                             placement=place("cpu", precision, section="finetune"), cache_dir=tmp_path / "cache",
                             log=lambda s: None) if cached else None
        said = []
        result = fit(net, backbone="resnet18", root=folder, train_rows=train, val_rows=val, transform_spec=SMALL,
                     cfg=cfg, views=views, log=said.append)
        runs[cached] = result.history, {k: v.clone() for k, v in net.state_dict().items()}
    assert "over the cached activations entering features.layer4 (3 views per photo)" in " ".join(said)
    (full, full_weights), (cached, cached_weights) = runs[False], runs[True]
    assert [h["epoch"] for h in cached] == [0, 1, 2, 3]
    tol = 1e-5 if precision == "fp32" else 2e-3
    for a, b in zip(full, cached):
        for key in ("train/loss", "val/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=tol), (a["epoch"], key)
    for k in full_weights:
        assert torch.allclose(cached_weights[k].float(), full_weights[k].float(), rtol=tol * 10, atol=tol), k


def test_head_only_training_mixes_the_cached_feature_vectors(tmp_path):
    """unfreeze none: the views are pooled features; MixUp mixes them, and soft targets still sum to one."""
    folder, train, val = _photos(tmp_path)
    cfg = FinetuneConfig(epochs=2, batch_size=4, unfreeze="none", device="cpu", precision="fp32", cached_views=2,
                         augment=dataclasses.replace(FinetuneConfig().augment, mixup=0.4))
    bb, net = _small_resnet()
    said = []
    # No validation slice: the last epoch is kept, so the weights show the training.
    views = cached_views(net, backbone=bb, root=folder, train_rows=train, val_rows=[], cfg=cfg,
                         placement=place("cpu", "fp32", section="finetune"), cache_dir=tmp_path / "cache",
                         log=said.append)
    assert views.cut == ("head",) and views.shape == (512,)
    before = net.head.weight.detach().clone()
    result = fit(net, backbone="resnet18", root=folder, train_rows=train, val_rows=[], transform_spec=SMALL, cfg=cfg,
                 views=views, log=said.append)
    assert result.epochs_run == 2 and not torch.equal(before, net.head.weight)


class _Killed(Exception):
    pass


def _die_in(epoch: int):
    def on_epoch(e, m):  # after the epoch's last step, before its end's checkpoint
        if e == epoch:
            raise _Killed
    return on_epoch


def test_a_killed_run_over_views_resumes_to_the_unbroken_weights_and_keeps_its_budget(tmp_path):
    folder, train, val = _photos(tmp_path)
    where = place("cpu", "fp32", section="finetune")
    cfg = FinetuneConfig(epochs=3, batch_size=4, device="cpu", precision="fp32", lr_backbone=1e-3, lr_head=1e-3,
                         patience=5, cached_views=2, checkpoint_every=1)

    def run(cfg, store=None, on_epoch=None, said=None):
        bb, net = _small_resnet()
        views = cached_views(net, backbone=bb, root=folder, train_rows=train, val_rows=val, cfg=cfg, placement=where,
                             cache_dir=tmp_path / "cache", log=lambda s: None)
        result = fit(net, backbone="resnet18", root=folder, train_rows=train, val_rows=val, transform_spec=SMALL,
                     cfg=cfg, views=views, checkpoints=store, on_epoch=on_epoch,
                     log=said.append if said is not None else lambda s: None)
        return result, net.state_dict()

    _, unbroken = run(cfg)
    with pytest.raises(_Killed):
        run(cfg, Checkpoints(tmp_path / "cache", "a" * 64), _die_in(2))
    result, resumed = run(cfg, Checkpoints(tmp_path / "cache", "a" * 64))
    assert result.resumed_from == "epoch 2, step 2"
    for k, v in unbroken.items():
        assert torch.equal(v, resumed[k]), k
    # epochs: budget is timed once: the resumed run keeps the number the killed one chose.
    budget = dataclasses.replace(cfg, epochs="budget", max_minutes=0.02)
    said = []
    with pytest.raises(_Killed):
        run(budget, Checkpoints(tmp_path / "cache", "b" * 64), _die_in(1), said)
    chosen = int(next(x for x in said if "finetune.epochs: budget: " in x).split(": ")[3].split()[0])
    said = []
    result, _ = run(budget, Checkpoints(tmp_path / "cache", "b" * 64), said=said)
    assert result.resumed_from == "epoch 1, step 2" and result.epochs_planned == chosen
    assert not any("finetune.epochs: budget: " in x for x in said), said


def test_the_views_file_is_found_again_rebuilt_when_torn_and_keyed_by_what_fixes_it(tmp_path):
    folder, train, val = _photos(tmp_path)
    cfg = FinetuneConfig(epochs=1, batch_size=4, device="cpu", precision="fp32", cached_views=2)
    where = place("cpu", "fp32", section="finetune")

    def views(cfg, said):
        bb, net = _small_resnet()
        return cached_views(net, backbone=bb, root=folder, train_rows=train, val_rows=val, cfg=cfg, placement=where,
                            cache_dir=tmp_path / "cache", log=said.append)

    said = []
    first = views(cfg, said)
    assert "caching the activations entering features.layer4: 2 augmented views of 12 train photos" in said[0]
    assert (first.k, first.shape, first.n_val) == (2, (256, 4, 4), 4)
    assert first.train(1).view == 0 and first.train(2).view == 1 and first.train(3).view == 0  # epoch 3 reuses view 0
    said = []
    # What only trains on the views (rates, epochs, the method) finds the same file ...
    again = views(dataclasses.replace(cfg, lr_head=0.1, epochs=5, method="bitfit"), said)
    assert again == first and said == [f"finetune: reusing the cached activations of 2 views of 12 train and 4 "
                                       f"validation photos ({first.path})"]
    # ... what changes the views does not.
    other = views(dataclasses.replace(cfg, seed=1), said)
    assert other.path != first.path
    # A torn file is ignored, said, and rebuilt under the same name; no temporary is left.
    Path(first.path).write_bytes(Path(first.path).read_bytes()[:1000])
    said = []
    rebuilt = views(cfg, said)
    assert rebuilt == first and "ignoring the unreadable cached views" in said[0] and "caching" in said[1]
    assert not list((tmp_path / "cache/views").glob(".*.tmp"))


class _Skip(nn.Module):
    """A stem and a stage whose output adds the photo's mean: a skip connection across the cut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stage = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return (self.stage(self.stem(x)) + x.mean()).mean((2, 3))


class _Chain(_Skip):
    def forward(self, x):
        return self.stage(self.stem(x)).mean((2, 3))


def test_a_network_that_is_not_one_chain_into_the_cut_is_refused():
    x = torch.randn(2, 3, 8, 8)
    check_split(Split(FineTuneNet(_Chain(), nn.Linear(4, 2)), ("features", "stage")), x, "chain")
    with pytest.raises(PipelineError, match=r"^finetune.cached_views: backbone 'skip' does not run the layers below "
                                            r"features.stage as one chain into it \(the network from there differs"):
        check_split(Split(FineTuneNet(_Skip(), nn.Linear(4, 2)), ("features", "stage")), x, "skip")


@pytest.mark.parametrize("settings, says", [
    ({"cached_views": -1}, "finetune.cached_views must be a whole number >= 0, found -1"),
    ({"cached_views": 2.5}, "finetune.cached_views must be a whole number >= 0, found 2.5"),
    ({"cached_views": 2, "unfreeze": "all"}, "finetune.cached_views needs finetune.unfreeze none or last, found 'all'"),
    ({"cached_views": 2, "unfreeze": "none", "augment": {"cutmix": 1.0}},
     "finetune.augment.cutmix cuts boxes out of images, and with finetune.unfreeze: none the cached views are pooled"),
])
def test_bad_cached_views_params_are_one_line_errors(settings, says):
    if "augment" in settings:
        settings = {**settings, "augment": dataclasses.replace(FinetuneConfig().augment, **settings["augment"])}
    with pytest.raises(PipelineError) as e:
        FinetuneConfig(**settings)
    assert str(e.value).startswith(says) and "\n" not in str(e.value)


@pytest.mark.sample_data
def test_the_stage_trains_on_cached_views_of_real_photos(trained, tmp_path, capsys):
    """efficientnet_lite0 on the shared photos: the stage caches, trains over the views, scores the whole network."""
    project, _ = trained
    ft = FinetuneConfig(epochs=2, batch_size=8, unfreeze="last", val_fraction=0.25, device="cpu", precision="fp32",
                        head_C=[0.1], cached_views=2)

    def run(ft):
        return run_finetune(Config(backbone=BACKBONE, finetune=ft, evaluate=EvaluateConfig()),
                            prepared_dir=project / "data/prepared", features_dir=project / "data/features",
                            out_dir=tmp_path / "models/finetune", live_dir=tmp_path / "dvclive",
                            reports_dir=tmp_path / "reports", cache_dir=tmp_path / "cache")

    result = run(ft)
    out = capsys.readouterr().out
    assert "caching the activations entering features.blocks.6: 2 augmented views of 14 train photos" in out
    assert "over the cached activations entering features.blocks.6 (2 views per photo)" in out
    assert result.epochs_run == 2 and (tmp_path / "models/finetune/model.safetensors").is_file()
    assert "test on 6 images" in out
    # Another learning rate trains on the same views: nothing is decoded through the frozen layers again.
    run(dataclasses.replace(ft, lr_backbone=3e-4))
    out = capsys.readouterr().out
    assert "reusing the cached activations of 2 views of 14 train and 4 validation photos" in out
    assert "caching" not in out
