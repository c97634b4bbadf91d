"""The finetune stage: freezing rules, the start at the head's accuracy, the real ``dvc repro``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from helpers_images import make_class_folder, sha256
from torch import nn

from pipeline.backbones import load_backbone
from pipeline.config import FinetuneConfig
from pipeline.config.sections import AugmentConfig
from pipeline.data.images import load_rgb
from pipeline.data.manifest import Row, read_prepared
from pipeline.data.sources import prepare
from pipeline.data.transform import TransformSpec
from pipeline.errors import PipelineError
from pipeline.extract.cache import manifest_rows
from pipeline.extract.cache import FeatureSet
from pipeline.finetune.checkpoint import load_finetuned, save_finetuned
from pipeline.finetune.data import loader, split_validation
from pipeline.finetune.network import (
    LOWER_GROUPS,
    FineTuneNet,
    build_network,
    unfreeze_modules,
)
from pipeline.finetune.train import _optimizer, batch_mixer, fit, predict_logits
from pipeline.heads.batch import make_head
from pipeline.heads.model import save_head
from pipeline.serve.predict import best_model

# --------------------------------------------------------------- small helpers


def _rows(folder, per_class=None, start=0, hashed=False):
    """Train :class:`Row` records of a ``<class>/<image>`` folder, sorted, ``per_class`` each."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    rows = []
    for label, c in enumerate(classes):
        files = sorted((folder / c).iterdir())[start:]
        rows += [Row(f"{c}/{f.name}", label, "train", sha256(f) if hashed else "") for f in files[:per_class]]
    return classes, rows


def _features(bb, root, rows):
    with torch.inference_mode():
        x = torch.stack([bb.transform(load_rgb(root / r.path)) for r in rows])
        return bb.features(x).numpy()


@pytest.fixture
def tiny(tmp_path):
    """resnet18 with random weights and 12 small generated images: plumbing only."""
    # On tensors this small, a second thread costs more in synchronisation than
    # it gains, and far more when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = make_class_folder(tmp_path / "photos", {"red": 6, "blue": 6})
    classes, rows = _rows(folder, hashed=True)
    bb = load_backbone("resnet18", "none")
    net = FineTuneNet(bb.features, nn.Linear(bb.feature_dim, len(classes)))
    yield bb, net, folder, rows
    torch.set_num_threads(threads)


#: 64-pixel inputs: the plumbing is the same as at 224 pixels, ten times faster.
SMALL = TransformSpec(72, 64, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
FAST = FinetuneConfig(epochs=1, batch_size=4, val_fraction=0.0, device="cpu", precision="fp32")


def _fit(net, folder, rows, val_rows=(), log=lambda s: None, on_epoch=None, **changes):
    return fit(net, backbone="resnet18", root=folder, train_rows=rows, val_rows=list(val_rows),
               transform_spec=SMALL, cfg=dataclasses.replace(FAST, **changes), on_epoch=on_epoch, log=log)


# ------------------------------------------------------------------- freezing


def test_every_backbone_has_a_last_stage_rule_that_trains_a_part():
    # The rule lives in pipeline/backbones/stages.py (every family: tests/test_catalogue.py);
    # here the project's first ten names go through unfreeze_modules.
    for name in ("vgg16", "vgg19", "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large",
                 "efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        bb = load_backbone(name, "none")
        net = FineTuneNet(bb.features, nn.Linear(bb.feature_dim, 3))
        counts = {}
        for mode in ("none", "last", "all"):
            unfreeze_modules(net, name, mode)
            counts[mode] = sum(p.numel() for p in net.parameters() if p.requires_grad)
        head = bb.feature_dim * 3 + 3
        assert counts["none"] == head, name
        assert head < counts["last"] < counts["all"], (name, counts)


def test_progressive_unfreezing_opens_one_depth_group_per_epoch_at_decayed_rates():
    bb = load_backbone("resnet18", "none")
    net = FineTuneNet(bb.features, nn.Linear(bb.feature_dim, 3))

    def trainable():
        return {n for n, p in net.named_parameters() if p.requires_grad}

    unfreeze_modules(net, "resnet18", "last")
    last = trainable()
    unfreeze_modules(net, "resnet18", "all")
    every = trainable()
    opened = []
    for epoch in range(1, 7):
        groups = unfreeze_modules(net, "resnet18", "progressive", epoch)
        opened.append(trainable())
    # The head, the last stage, then LOWER_GROUPS slices below it; each parameter in one group.
    assert len(groups) == 2 + LOWER_GROUPS
    ids = [id(p) for g in groups for m in g for p in m.parameters()]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    assert opened[0] == last and all(a < b for a, b in zip(opened, opened[1:LOWER_GROUPS + 1]))
    assert opened[LOWER_GROUPS] == opened[-1] == every == {n for n, _ in net.named_parameters()}
    assert {n.split(".")[1] for n in last if n.startswith("features.")} == {"layer4"}
    assert any(n.startswith("features.conv1") for n in opened[LOWER_GROUPS] - opened[LOWER_GROUPS - 1])

    # Layer-wise decay: the head at lr_head, depth group k at lr_backbone * lr_decay**k.
    opt = _optimizer(groups, dataclasses.replace(FAST, lr_head=3e-4, lr_backbone=1e-4, lr_decay=0.5))
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rate[id(net.head.weight)] == 3e-4
    for k, group in enumerate(groups[1:]):
        assert {rate[id(p)] for m in group for p in m.parameters()} == {1e-4 * 0.5**k}, k


def test_progressive_fit_trains_the_last_stage_first_then_more(tiny):
    _, net, folder, rows = tiny
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    logged = []
    _fit(net, folder, rows, unfreeze="progressive", lr_backbone=1e-2, log=logged.append)
    changed = {n.split(".")[1] for n, p in net.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {"layer4", "weight", "bias"}, changed  # layer4 and the head after epoch 1
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    _fit(net, folder, rows, unfreeze="progressive", lr_backbone=1e-2, epochs=2, log=logged.append)
    changed = {n.split(".")[1] for n, p in net.named_parameters() if not torch.equal(before[n], p)}
    assert "layer4" in changed and "layer3" in changed and "conv1" not in changed, changed
    assert any("epoch 2 trains the last 2 of 4 depth groups" in line for line in logged), logged


def test_unknown_unfreeze_and_architecture_are_one_line_errors(tiny):
    _, net, _, _ = tiny
    with pytest.raises(PipelineError, match="finetune.unfreeze 'some'"):
        unfreeze_modules(net, "resnet18", "some")
    with pytest.raises(PipelineError, match="no rule for backbone 'mystery'.*use none or all"):
        unfreeze_modules(net, "mystery", "last")
    unfreeze_modules(net, "mystery", "all")  # needs no rule


def test_bad_params_name_the_key():
    for bad, fragment in [
        ({"epochs": -1}, "finetune.epochs must be a whole number >= 0, or budget \\(as many as finetune.max_minutes "
                         "allows\\), found -1"),
        ({"epochs": "lots"}, "finetune.epochs must be a whole number >= 0, or budget .*, found 'lots'"),
        ({"lr_backbone": 0}, "finetune.lr_backbone must be a number in \\(0, inf\\)"),
        ({"val_fraction": 0.9}, "finetune.val_fraction must be a number in \\[0, 0.5\\)"),
        ({"device": "tpu"}, "unknown finetune.device 'tpu'"),
        ({"precision": "fp16"}, "unknown finetune.precision 'fp16'; accepted: auto, fp32, bf16"),
        ({"epoch": 3}, "unknown params key 'finetune.epoch' in params.yaml; accepted here: augment, batch_size"),
        ({"ema": 1.0}, "finetune.ema must be a number in \\[0, 1\\), found 1.0"),
        ({"tta_flip": "yes"}, "finetune.tta_flip must be true or false, found 'yes'"),
        ({"head_C": 0}, "finetune.head_C must be a positive number or a list of them, found 0"),
        ({"head_C": [0.1, -1]}, "finetune.head_C must be a positive number or a list of them, found \\[0.1, -1\\]"),
        ({"head_C": []}, "finetune.head_C must be a positive number or a list of them, found \\[\\]"),
        ({"augment": {"policy": "autoaugment"}},
         "unknown finetune.augment.policy 'autoaugment'; accepted: none, trivialaugment, randaugment"),
        ({"augment": {"crop_scale": [0.5, 0.2]}},
         "finetune.augment.crop_scale must be \\[low, high\\] with 0 < low <= high <= 1, found \\[0.5, 0.2\\]"),
        ({"augment": {"mixup": -1}}, "finetune.augment.mixup must be a number in \\[0, inf\\), found -1"),
        ({"augment": {"erasing": 1.5}}, "finetune.augment.erasing must be a number in \\[0, 1\\], found 1.5"),
        ({"augment": {"mixpu": 0.2}}, "unknown params key 'finetune.augment.mixpu'"),
        ({"lr_decay": 1.5}, "finetune.lr_decay must be a number in \\(0, 1\\], found 1.5"),
        ({"unfreeze": "gradual"}, "unknown finetune.unfreeze 'gradual'; accepted: none, last, all, progressive"),
    ]:
        with pytest.raises(PipelineError, match=fragment):
            FinetuneConfig.from_mapping(bad, "finetune")


def _bn_buffers(module):
    return {n: b.clone() for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var"))}


def test_batch_norm_statistics_stay_frozen(tiny):
    bb, net, folder, rows = tiny
    before = _bn_buffers(net)
    weights_before = {n: p.detach().clone() for n, p in net.named_parameters()}
    _fit(net, folder, rows, unfreeze="last")
    # Statistics: frozen everywhere, in the unfrozen layer4 too.
    after = _bn_buffers(net)
    assert any(n.startswith("features.layer4.") for n in before)
    for n in before:
        assert torch.equal(before[n], after[n]), n
    # Parameters: only layer4 (its batch-norm scale and shift included) and the head train.
    for n, p in net.named_parameters():
        changed = not torch.equal(weights_before[n], p)
        assert changed == n.startswith(("features.layer4.", "head.")), n


def test_unfreeze_none_trains_the_head_only(tiny):
    bb, net, folder, rows = tiny
    before = {n: t.clone() for n, t in net.state_dict().items()}
    _fit(net, folder, rows, unfreeze="none")
    changed = {n for n, t in net.state_dict().items() if not torch.equal(before[n], t)}
    assert changed == {"head.weight", "head.bias"}


def test_ema_keeps_the_averaged_weights(tiny):
    """With ema the validated and kept weights are the average, not the last step's."""
    _, net, folder, rows = tiny
    start = net.head.weight.detach().clone()
    # No validation slice: the last epoch is kept. A decay this close to 1 keeps
    # the average at the start for any few steps.
    _fit(net, folder, rows, unfreeze="none", lr_head=0.1, ema=0.999999)
    torch.testing.assert_close(net.head.weight, start, atol=1e-4, rtol=0)
    _fit(net, folder, rows, unfreeze="none", lr_head=0.1)
    assert (net.head.weight - start).abs().max() > 1e-3  # without it, the steps show


def test_the_average_of_the_weights_is_a_candidate_beside_the_trained_ones(tiny):
    """With a validation slice, each epoch's EMA is validated too, and kept only when it scores better."""
    bb, _, folder, rows = tiny
    tr, va = split_validation(rows, 0.34, 0)
    torch.manual_seed(3)  # a start from which epoch 1's average scores 3 of 4, every trained epoch 2 of 4
    net = FineTuneNet(load_backbone("resnet18", "none").features, nn.Linear(bb.feature_dim, 2))
    said = []
    res = _fit(net, folder, tr, va, log=said.append, unfreeze="none", lr_head=3e-3, epochs=4, patience=4,
               val_fraction=0.34, seed=3, beat_head_by=1, ema=0.7)
    assert [h["val/accuracy"] for h in res.history] == [0.5] * 5, res.history
    assert [h.get("val_ema/accuracy") for h in res.history] == [None, 0.75, 0.5, 0.5, 0.5], res.history
    assert (res.best_epoch, res.kept_weights) == (1, "ema")
    assert any(line.startswith("finetune: epoch 1: ") and line.endswith("* (EMA)") for line in said), said
    # The network holds the average that scored 3 of 4, which no trained epoch's weights did.
    logits, y = predict_logits(net, loader(folder, va, SMALL.build(), 4), torch.device("cpu"))
    assert (logits.argmax(1) == y).mean() == 0.75
    # One epoch counts once toward patience: an epoch whose average wins is an improvement.
    from pipeline.finetune.train import _Best

    best = _Best(4, 1)
    best.offer(0, {"val/accuracy": 0.5, "val/loss": 1.0}, nn.Linear(1, 1))
    assert not best.offer(1, {"val/accuracy": 0.5, "val/loss": 0.9}, nn.Linear(1, 1))
    assert best.offer(1, {"val/accuracy": 0.75, "val/loss": 0.9}, nn.Linear(1, 1), weights="ema", count=False)
    assert (best.epoch, best.weights, best.since) == (1, "ema", 0)
    best.offer(2, {"val/accuracy": 0.5, "val/loss": 0.9}, nn.Linear(1, 1))
    best.offer(2, {"val/accuracy": 0.5, "val/loss": 0.9}, nn.Linear(1, 1), weights="ema", count=False)
    assert best.since == 1


def test_a_budget_sizes_the_epochs_and_trains_as_that_many_epochs_given(tiny):
    """epochs: budget times a few batches, picks the epochs that fit, and then trains exactly as epochs: N would."""
    bb, _, folder, rows = tiny
    tr, va = split_validation(rows, 0.34, 0)
    runs = {}
    for epochs in ("budget", None):
        torch.manual_seed(0)
        net = FineTuneNet(load_backbone("resnet18", "none").features, nn.Linear(bb.feature_dim, 2))
        said = []
        # A budget of a few seconds: some epochs of these 8 photos, far from the cap of 100.
        res = _fit(net, folder, tr, va, log=said.append, lr_head=1e-3, patience=100, val_fraction=0.34,
                   epochs=epochs or runs["budget"][0].epochs_run, max_minutes=0.05 if epochs else 10)
        runs[epochs] = res, {k: v.clone() for k, v in net.state_dict().items()}, said
    (budget, _, said), (given, _, _) = runs["budget"], runs[None]
    line = next(x for x in said if x.startswith("finetune: finetune.epochs: budget: "))
    chosen = int(line.split(": ")[3].split()[0])
    assert 1 <= chosen < 100 and given.epochs_run == chosen, line
    # Every epoch the budget run completed (a loaded machine may stop it early, on the clock) is the given run's:
    # the timing batches changed no weight, and the schedule is that of epochs: N.
    done = [h for h in budget.history[1:] if h["epoch"] < budget.epochs_run or budget.stopped == "epochs"]
    assert done, (budget.stopped, line)
    for h in done:
        g = given.history[h["epoch"]]
        assert (h["train/loss"], h["val/loss"]) == (g["train/loss"], g["val/loss"]), h["epoch"]


def test_flip_tta_scores_a_photo_and_its_mirror_image_alike(tiny):
    _, net, _, _ = tiny
    x = torch.rand(3, 3, 64, 64)
    batches = [(x, torch.zeros(3, dtype=torch.long), [])]
    mirrored = [(x.flip(3), torch.zeros(3, dtype=torch.long), [])]
    cpu = torch.device("cpu")
    plain = predict_logits(net, batches, cpu)[0], predict_logits(net, mirrored, cpu)[0]
    assert not np.allclose(*plain, atol=1e-4)  # the network alone tells them apart
    flipped = predict_logits(net, batches, cpu, flip=True)[0], predict_logits(net, mirrored, cpu, flip=True)[0]
    np.testing.assert_allclose(*flipped, atol=1e-5)


def _training_dtypes(net):
    """Record the dtype of the first convolution's and the head's outputs in every training forward pass.

    Training steps run with gradients on; validation and scoring run in
    inference mode, so they are not recorded.
    """
    seen = {"conv1": [], "head": []}

    def hook(name):
        def record(module, inputs, output):
            if torch.is_grad_enabled():
                seen[name].append(output.dtype)
        return record

    handles = [net.features.conv1.register_forward_hook(hook("conv1")), net.head.register_forward_hook(hook("head"))]
    return seen, handles


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_bf16_autocast_trains_and_says_so(tiny, precision, dtype):
    """Each training step runs under the precision asked for; the weights and their steps stay fp32."""
    bb, net, folder, rows = tiny
    before = net.head.weight.detach().clone()
    lines = []
    seen, handles = _training_dtypes(net)
    try:
        res = _fit(net, folder, rows, unfreeze="none", precision=precision, log=lines.append)
    finally:
        for h in handles:
            h.remove()
    assert f"on cpu, {precision} (finetune.precision: {precision})" in lines[0], lines[0]
    assert res.epochs_run == 1 and np.isfinite(res.history[0]["train/loss"])
    # 12 photos in batches of 4: three training steps, each computed in ``dtype``.
    assert seen == {"conv1": [dtype] * 3, "head": [dtype] * 3}, seen
    assert not torch.equal(before, net.head.weight) and net.head.weight.dtype == torch.float32


def test_a_photo_changed_since_prepare_stops_training(tiny):
    bb, net, folder, rows = tiny
    (folder / rows[0].path).write_bytes((folder / rows[1].path).read_bytes())
    with pytest.raises(PipelineError, match=f"cannot use {rows[0].path}: file changed since the prepare stage"):
        _fit(net, folder, rows)


def test_mixup_and_cutmix_labels_are_distributions():
    assert batch_mixer(0.0, 0.0, 3) is None
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 32, 32), torch.tensor([0, 1, 2, 0] * 4)
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.4, 1.0)):
        mixed_x, soft = batch_mixer(mixup, cutmix, 3)(x, y)
        assert soft.shape == (16, 3) and mixed_x.shape == x.shape
        torch.testing.assert_close(soft.sum(1), torch.ones(16))
        assert (soft >= 0).all() and not torch.equal(soft, nn.functional.one_hot(y, 3).float())  # really mixed
    # Feature vectors (cached views with unfreeze: none) are mixed as well, and keep their shape.
    v = torch.rand(16, 8)
    mixed_v, soft = batch_mixer(0.4, 0.0, 3)(v, y)
    assert mixed_v.shape == v.shape and not torch.equal(mixed_v, v)
    torch.testing.assert_close(soft.sum(1), torch.ones(16))


@pytest.mark.parametrize("augment", [
    {"policy": "trivialaugment"}, {"policy": "randaugment", "erasing": 0.5, "crop_scale": (0.5, 1.0)},
    {"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.4, "cutmix": 1.0},
])
def test_each_augmentation_trains_on_a_few_photos(tiny, augment):
    _, net, folder, rows = tiny
    res = _fit(net, folder, rows[:8], augment=AugmentConfig(**augment))
    assert res.epochs_run == 1 and 0 <= res.history[-1]["train/accuracy"] <= 1
    assert np.isfinite(res.history[-1]["train/loss"])


def _kept(history) -> int:
    """The epoch the selection rule keeps, worked out from the validation scores alone."""
    start = history[0]["val/accuracy"]
    better = [h for h in history[1:] if h["val/accuracy"] > start]
    return max(better, key=lambda h: (h["val/accuracy"], -h["val/loss"], -h["epoch"]))["epoch"] if better else 0


def test_the_start_is_replaced_only_by_more_photos_right():
    """A lower loss at equal validation accuracy does not replace the warm start; among trained epochs it decides."""
    assert _kept([{"epoch": 0, "val/accuracy": 0.75, "val/loss": 0.5},
                  {"epoch": 1, "val/accuracy": 0.75, "val/loss": 0.1}]) == 0
    from pipeline.finetune.train import _Best

    def kept(scores):
        best = _Best()
        for epoch, (acc, loss) in enumerate(scores):
            best.offer(epoch, {"val/accuracy": acc, "val/loss": loss}, nn.Linear(1, 1))
        return best.epoch

    assert kept([(0.75, 0.5), (0.75, 0.1), (0.5, 0.05)]) == 0  # the same photos right, a lower loss: the start
    assert kept([(0.75, 0.5), (1.0, 0.3), (1.0, 0.2), (1.0, 0.25)]) == 2  # among trained epochs, the loss decides

    def kept_of_20(right, margin):  # 20 validation photos: the head gets 15 right, then each epoch `right`
        best = _Best(n_val=20, margin=margin)
        for epoch, r in enumerate([15, *right]):
            best.offer(epoch, {"val/accuracy": r / 20, "val/loss": 1.0 - epoch / 10}, nn.Linear(1, 1))
        return best.epoch

    assert kept_of_20([16, 16], margin=2) == 0  # one photo more is noise: the head stays
    assert kept_of_20([16, 17], margin=2) == 2  # two more replace it
    assert kept_of_20([16], margin=1) == 1


def test_max_minutes_stops_cleanly_and_keeps_the_best(tiny):
    bb, net, folder, rows = tiny
    tr, va = split_validation(rows, 0.34, 0)
    lines = []
    res = _fit(net, folder, tr, va, epochs=50, val_fraction=0.34, max_minutes=1e-6, log=lines.append)
    assert res.stopped == "max_minutes" and res.epochs_run == 1
    assert any("max_minutes" in line for line in lines), lines
    assert any("s per epoch" in line for line in lines), lines  # the estimate, after the first batches
    # Epoch 0 (the start) is scored and is a candidate; a trained epoch replaces it only
    # with a strictly higher validation accuracy, and among those the best by accuracy,
    # then loss, the earlier on a tie.
    assert [h["epoch"] for h in res.history] == [0, 1] and set(res.history[1]) >= {"train/loss", "val/accuracy"}
    assert res.best_epoch == _kept(res.history)


@pytest.mark.parametrize("init_seed, lr_head, kept", [
    (1, 1e-4, "a middle epoch"),  # epoch 2 scores 0.75 on validation, the start and epoch 1 0.5
    (0, 3e-3, "the start"),       # the start scores 0.75, every trained epoch less
])
def test_the_kept_weights_are_the_best_epochs_not_the_last(tiny, init_seed, lr_head, kept):
    """After fit the network holds exactly the weights that scored best on validation, not the last epoch's."""
    bb, _, folder, rows = tiny
    torch.manual_seed(init_seed)  # the random head's start, which the validation scores depend on
    net = FineTuneNet(load_backbone("resnet18", "none").features, nn.Linear(bb.feature_dim, 2))
    tr, va = split_validation(rows, 0.34, 0)
    validated = {}

    def snapshot(epoch, m):  # called with the weights just validated (the average, with ema)
        validated[epoch] = {k: v.detach().clone() for k, v in net.state_dict().items()}

    # 4 validation photos: one more right must count here (beat_head_by 1), or no epoch could beat the start.
    res = _fit(net, folder, tr, va, on_epoch=snapshot, unfreeze="none", lr_head=lr_head, epochs=5, patience=2,
               val_fraction=0.34, seed=init_seed, beat_head_by=1)
    assert res.best_epoch == _kept(res.history), res.history
    # The case asked for, so that keeping the last epoch (or the start) would show.
    assert res.stopped == "early stopping" and res.best_epoch < res.epochs_run, res.history
    assert (res.best_epoch == 0) == (kept == "the start"), res.history
    last = validated[res.epochs_run]
    assert not torch.equal(last["head.weight"], validated[res.best_epoch]["head.weight"])
    differ = [k for k, v in net.state_dict().items() if not torch.equal(v, validated[res.best_epoch][k])]
    assert not differ, f"kept weights are not epoch {res.best_epoch}'s (of {res.epochs_run}): {differ}"


def test_validation_slice_is_stratified_and_leaves_training_images():
    labels = [0] * 10 + [1] * 5 + [2] * 1
    rows = [Row(f"{label}/{i:02d}.jpg", label, "train", "") for i, label in enumerate(labels)]
    tr, va = split_validation(rows, 0.2, seed=0)
    assert sorted(tr + va) == sorted(rows)
    assert np.bincount([r.label for r in va], minlength=3).tolist() == [2, 1, 0]
    assert len(split_validation(rows, 0.0, 0)[1]) == 0
    # The slice depends on the paths, not on the order the rows arrive in.
    assert sorted(split_validation(rows[::-1], 0.2, seed=0)[1]) == sorted(va)
    assert sorted(split_validation(rows, 0.2, seed=1)[1]) != sorted(va)


def test_saved_network_round_trips_and_refuses_stale(tmp_path, tiny):
    bb, net, folder, rows = tiny
    path = tmp_path / "models" / "finetune"
    made = {"backbone": "resnet18", "git_commit": None}
    save_finetuned(path, net, bb, ["blue", "red"], precision="fp32", made_from=made, training={"best_epoch": 0})
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    info = json.loads((path / "config.json").read_text())
    assert info["kind"] == "finetune" and info["backbone"]["name"] == "resnet18"
    assert info["classes"] == ["blue", "red"] and info["training"] == {"best_epoch": 0}
    assert info["made_from"] == made and info["precision"] == "fp32"
    assert TransformSpec.from_dict(info["preprocessing"]) == bb.transform_spec
    state = load_file(path / "model.safetensors")
    assert set(state) == set(net.state_dict()) and all(isinstance(v, torch.Tensor) for v in state.values())
    loaded, config = load_finetuned(path, {**bb.provenance(), "classes": ["blue", "red"]})
    assert config == info
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x))
    with pytest.raises(PipelineError, match="classes=.*stale"):
        load_finetuned(path, {"classes": ["cat", "dog"]})
    with pytest.raises(PipelineError, match=r"model folder .*nothing not found"):
        load_finetuned(tmp_path / "nothing")


def test_evaluate_scores_the_cache_test_rows_as_the_manifest_lists_them(tmp_path):
    """The fine-tuned network sees the cache's test images, each checked against the manifest's hash."""
    folder = make_class_folder(tmp_path / "photos", {"red": 5, "blue": 5})
    prepare(source="folder", out_dir=tmp_path / "prepared", folder=str(folder), test_fraction=0.4, seed=0)
    rows = read_prepared(tmp_path / "prepared").rows

    def cache(rows):
        # What extract writes: the manifest's rows in order, one feature row each.
        return FeatureSet(np.zeros((len(rows), 4), np.float32), np.array([r.label for r in rows]),
                          np.array([r.path for r in rows]), np.array([r.split for r in rows]),
                          np.array([r.sha256 for r in rows]), ["blue", "red"], {})

    test = [r for r in rows if r.split == "test"]
    root, found = manifest_rows(cache(rows[::-1]), "features.h5", tmp_path / "prepared")
    assert root == folder and found == test[::-1] and len(found) == 4  # cache order, manifest records
    changed = [r._replace(sha256="0" * 64) if r == test[0] else r for r in rows]
    with pytest.raises(PipelineError, match=f"test image {test[0].path} but .*records another content hash"):
        manifest_rows(cache(changed), "features.h5", tmp_path / "prepared")
    unknown = [*rows, Row("red/new.jpg", 1, "test", "1" * 64)]
    with pytest.raises(PipelineError, match="test image red/new.jpg but .*does not list it; the cache is stale"):
        manifest_rows(cache(unknown), "features.h5", tmp_path / "prepared")


# ------------------------------------------------------------- real photos


@pytest.mark.sample_data
def test_network_starts_at_the_logreg_heads_accuracy(catsdogs):
    """Before any optimiser step the network predicts what the head predicts."""
    bb = load_backbone("efficientnet_lite0")
    classes, train = _rows(catsdogs, per_class=16)
    _, test = _rows(catsdogs, per_class=20, start=100)
    X, y = _features(bb, catsdogs, train), np.array([r.label for r in train])
    head = make_head("logreg", C=[0.1], cv_folds=2, y=y).fit(X, y).best_estimator_
    Xt, yt = _features(bb, catsdogs, test), np.array([r.label for r in test])
    head_acc = float((head.predict(Xt) == yt).mean())

    net = build_network(bb.features, head)
    logits, labels = predict_logits(net, loader(catsdogs, test, bb.transform, 32), torch.device("cpu"))
    net_acc = float((logits.argmax(1) == labels).mean())
    assert head_acc >= 0.9, head_acc  # real features: the comparison means something
    assert abs(net_acc - head_acc) <= 0.01, (net_acc, head_acc)
    probs = torch.from_numpy(logits).softmax(1).numpy()
    np.testing.assert_allclose(probs, head.predict_proba(Xt), atol=1e-4)


@pytest.mark.slow
@pytest.mark.sample_data
def test_catsdogs_repro_through_finetune_and_a_new_C_reruns_only_that_head(project, catsdogs):
    project.set_params(
        data={"source": "folder", "folder": str(catsdogs), "test_fraction": 0.2, "seed": 0},
        backbone={"name": "efficientnet_lite0", "weights": "DEFAULT"},
        finetune={"epochs": 2},
    )
    project.commit("catsdogs with the finetune stage")
    out = project.dvc("repro", "finetune", "evaluate").stdout
    root = project.path
    assert project.ran(out) == {"prepare", "extract", "extract_extra", "train_heads@logreg", "train_heads@svm",
                                "finetune", "evaluate@logreg", "evaluate@svm"}
    # The estimate comes before the first epoch's result, within the first batches.
    assert out.index("s per epoch") < out.index("finetune: epoch 1"), out

    metrics = {h: json.loads((root / f"reports/metrics_{h}.json").read_text())[h] for h in ("logreg", "svm")}
    report = json.loads((root / "reports/finetune_metrics.json").read_text())
    assert set(report) == {"finetune", "finetune_run"}
    assert set(report["finetune"]) == set(metrics["logreg"])  # side by side in dvc metrics show
    assert report["finetune"]["n_test"] == metrics["logreg"]["n_test"] == 48
    run = report["finetune_run"]
    assert 0 < run["training_seconds"] <= run["wall_seconds"]
    # Kept: the warm-start head (epoch 0) or a fine-tuned epoch that beat it on validation.
    info = json.loads((root / "models/finetune/config.json").read_text())
    assert info["classes"] == ["cat", "dog"] and info["backbone"]["name"] == "efficientnet_lite0"
    # The model folders record the test metrics of their reports (predict ranks them by these).
    assert info["metrics"] == report["finetune"]
    for h in ("logreg", "svm"):
        assert json.loads((root / f"models/{h}/config.json").read_text())["metrics"] == metrics[h], h
    assert run["best_epoch"] == info["training"]["best_epoch"] in (0, 1, 2)
    kept_head = "keeping the head's weights" in out
    # Epoch 0 kept: the model is the guard's head, the logreg refit on all 192 train photos.
    guard = run["kept"].startswith("logreg head (C=") and run["kept"].endswith("refit on all 192 train photos)")
    assert kept_head == (run["best_epoch"] == 0) == guard == (run["kept"] != "fine-tuned"), out
    assert run["kept"] == info["kept"] and run["train_images_per_second"] > 0
    if guard:  # the user's logreg on the same features: the same test accuracy within a photo
        assert abs(report["finetune"]["accuracy"] - metrics["logreg"]["accuracy"]) <= 1 / 48 + 1e-9, (report, metrics)
    # Its own head, fitted without the validation slice: 192 train photos, 20 % held out per class.
    assert info["training"]["n_val"] == 38 and info["warm_start"]["n_train"] == 154
    assert report["finetune"]["accuracy"] >= 0.9, report
    confusion = (root / "reports/confusion_finetune.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 49

    live = json.loads((root / "dvclive/metrics.json").read_text())
    assert {"train", "val", "best_epoch"} <= set(live), live
    assert (root / "dvclive/plots/metrics/val/accuracy.tsv").is_file()
    state = load_file(root / "models/finetune/model.safetensors")
    assert any(k.startswith("head.") for k in state) and any(k.startswith("features.") for k in state)
    shown = json.loads(project.dvc("metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    assert files["reports/finetune_metrics.json"]["data"]["finetune"]["accuracy"] == report["finetune"]["accuracy"]
    assert files["reports/metrics_logreg.json"]["data"]["logreg"]["accuracy"] == metrics["logreg"]["accuracy"]

    # A new C re-runs that head and the heads' evaluation, nothing else.
    project.commit("first run")
    project.set_params(heads={"train": {"logreg": {"C": [0.5]}}})
    out = project.dvc("repro", "finetune", "evaluate").stdout
    # prepare always re-scans the photo folder (always_changed); its manifest is unchanged.
    assert project.ran(out) - {"prepare"} == {"train_heads@logreg", "evaluate@logreg"}, out
    assert json.loads((root / "reports/finetune_metrics.json").read_text()) == report
    # Nothing downstream of a head but the heads' evaluation (visualize included).
    for stage in ("finetune", "visualize"):
        assert "train_heads" not in project.dvc("dag", "--dot", stage).stdout, stage


def _head_folder(models_dir, name, accuracy, kind="logreg"):
    """A real head's model folder (save_head on small features), recording ``accuracy`` as its test accuracy."""
    rng = np.random.default_rng(0)
    X, y = np.concatenate([rng.normal(0, 1, (10, 4)), rng.normal(2, 1, (10, 4))]), np.repeat([0, 1], 10)
    search = make_head(kind, C=[1.0], cv_folds=2, y=y).fit(X, y)
    attrs = {"backbone": "resnet18", "weights": "none", "weights_sha256": "", "transform": "t", "feature_dim": 4,
             "preprocessing": json.dumps(SMALL.to_dict()), "decoder": "pillow-exact", "precision": "fp32"}
    save_head(models_dir / name, search, attrs=attrs, made_from={"git_commit": None}, classes=["blue", "red"],
              kind=kind, description=kind, metrics=None if accuracy is None else {"accuracy": accuracy})


def test_predict_ranks_the_model_folders_by_their_recorded_test_accuracy(tmp_path, tiny):
    """predict's default model: the heads' and the fine-tuned network's folders, by the accuracy each config.json records."""
    bb, net, _, _ = tiny
    models = tmp_path / "models"
    _head_folder(models, "logreg", 0.95)
    _head_folder(models, "svm", 0.9, kind="svm")
    _head_folder(models, "unscored", None)  # trained, not evaluated: no test accuracy, not ranked
    (models / "notes").mkdir()  # not a model folder: ignored
    assert best_model(models) == "logreg"

    def finetune(accuracy):
        save_finetuned(models / "finetune", net, bb, ["blue", "red"], precision="fp32", made_from={},
                       metrics={"accuracy": accuracy})

    finetune(0.97)
    assert best_model(models) == "finetune"
    finetune(0.95)  # a tie: the head first (cheaper, and logreg gives probabilities)
    assert best_model(models) == "logreg"
    finetune(0.96)
    assert best_model(models) == "finetune"
    _head_folder(models, "svm", 0.99, kind="svm")
    assert best_model(models) == "svm"

    empty = tmp_path / "empty"
    _head_folder(empty, "unscored", None)
    with pytest.raises(PipelineError, match=r"no model in .*empty records a test accuracy \(unscored\)"):
        best_model(empty)
