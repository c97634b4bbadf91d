"""Fine-tuning the backbone, starting from the trained logistic-regression head.

The network is ``head(features(x))``: the registry backbone's feature extractor
and one ``nn.Linear`` initialised from ``models/logreg.joblib`` with its scaler
folded in (:func:`pipeline.heads.to_torch_linear`). Before the first optimiser
step it therefore predicts what the head predicts, so no head-only warm-up pass
is needed and early large errors cannot wreck the pretrained filters.

Only the head and the parts ``unfreeze`` names train; everything else stays in
eval mode, so it computes exactly what feature extraction computed, and batch
norm keeps its statistics everywhere. The best epoch on a validation slice of
the train split is kept.

Outputs: ``models/finetune.pt``, a plain state dict of the whole network
(``features.*``, ``head.*``), and ``models/finetune.json`` beside it (backbone,
weights, classes, transform, provenance, training summary).

Example:
    >>> net, info = load_finetuned("models/finetune.pt")      # doctest: +SKIP
    >>> net(transform_of(info).build()(image)[None]).softmax(1)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.backbones import TransformSpec, get_spec
from pipeline.errors import BadImage, PipelineError
from pipeline.extract.local import check_provenance, read_checked, resolve_device
from pipeline.fileio import atomic_path, read_json, write_json
from pipeline.data.images import load_rgb
from pipeline.params import DEFAULTS

#: The ``finetune`` section of params.yaml and its defaults.
FINETUNE_DEFAULTS: dict = DEFAULTS["finetune"]

UNFREEZE = ("none", "last", "all")

#: RandomResizedCrop's area range. torchvision's default (0.08, 1) suits
#: training from scratch; a few epochs from a good start need milder crops.
CROP_SCALE = (0.25, 1.0)

FORMAT = "transfer-pipeline finetune v1"


# ------------------------------------------------------------------ the network


class FineTuneNet(nn.Module):
    """``head(features(x))``; its state dict is what ``models/finetune.pt`` holds."""

    def __init__(self, features: nn.Module, head: nn.Linear):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_network(features: nn.Module, head_estimator) -> FineTuneNet:
    """Backbone features + a linear layer equal to the fitted scaler + logreg head."""
    from pipeline.heads.batch import to_torch_linear

    return FineTuneNet(features, to_torch_linear(head_estimator))


def _vgg_last(m: nn.Module) -> list[nn.Module]:
    # The last conv block starts after the second-to-last max-pool; fc6 and fc7
    # sit above it inside the features, so they train too.
    pools = [i for i, layer in enumerate(m.features) if isinstance(layer, nn.MaxPool2d)]
    return [m.features[pools[-2] + 1 :], m.classifier]


#: ``unfreeze: last``: the last stage of each architecture and every layer with
#: parameters above it (the last inverted-residual stage and the 1x1 head conv
#: for the mobile nets, as for timm's ``blocks[-1]`` + ``conv_head`` + ``bn2``).
LAST_STAGE: dict[str, Callable[[nn.Module], list[nn.Module]]] = {
    "vgg16": _vgg_last,
    "vgg19": _vgg_last,
    "resnet18": lambda m: [m.layer4],
    "resnet50": lambda m: [m.layer4],
    "mobilenet_v2": lambda m: [m.features[-2:]],
    "mobilenet_v3_large": lambda m: [m.features[-2:], m.classifier],
    "efficientnet_b0": lambda m: [m.features[-2:]],
    **{
        f"efficientnet_lite{v}": (lambda m: [m.blocks[-1], m.conv_head, m.bn2])
        for v in (0, 1, 2)
    },
}


def unfreeze_modules(net: FineTuneNet, backbone: str, unfreeze: str) -> list[nn.Module]:
    """Set ``requires_grad`` for ``unfreeze`` and return the modules that train.

    Args:
        backbone: the registry name, which picks the ``last`` rule.
        unfreeze: ``none`` (head only), ``last`` (the last stage) or ``all``.

    Returns:
        the trainable modules, the head first.
    """
    if unfreeze not in UNFREEZE:
        raise PipelineError(f"unknown finetune.unfreeze '{unfreeze}'; accepted: {', '.join(UNFREEZE)}")
    if unfreeze == "none":
        parts = []
    elif unfreeze == "all":
        parts = [net.features]
    elif backbone in LAST_STAGE:
        parts = LAST_STAGE[backbone](net.features)
    else:
        raise PipelineError(
            f"finetune.unfreeze: last has no rule for backbone '{backbone}' (LAST_STAGE in "
            "pipeline/finetune.py); use none or all, or add a rule"
        )
    net.requires_grad_(False)
    trainable = [net.head, *parts]
    for m in trainable:
        m.requires_grad_(True)
    return trainable


def set_train_mode(net: nn.Module, trainable: list[nn.Module]) -> None:
    """Train mode for ``trainable`` only, and batch norm in eval mode everywhere.

    Frozen parts then compute exactly what feature extraction computed. Batch
    norm keeps its ImageNet statistics even where its scale and shift train:
    statistics of batches of 16 from a few hundred photos are noisy, and on the
    dog-breed sample updating them left the training loss after an epoch at
    0.93 instead of 0.62 and the test loss at 0.48 instead of 0.42 (Keras's
    transfer-learning guide gives the same advice).
    """
    net.eval()
    for m in trainable:
        m.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_transform(spec: TransformSpec) -> Callable:
    """Random resized crop and horizontal flip at the backbone's input size and normalisation."""
    from torchvision.transforms import v2 as T

    # Cropping and resizing the PIL image resizes with Pillow, as the eval transform does.
    return T.Compose(
        [
            T.RandomResizedCrop(spec.crop, scale=CROP_SCALE, interpolation=T.InterpolationMode(spec.interpolation)),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(spec.mean), list(spec.std)),
        ]
    )


# ------------------------------------------------------------------------ data


def _decode(root: Path, rel: str, expected_sha: str, transform):
    """Read, check and preprocess one image: ``(tensor, None)`` or ``(None, reason)``."""
    data, why = read_checked(root, rel, expected_sha)
    if why:
        return None, why
    try:
        return transform(load_rgb(root / rel, data=data)), None
    except BadImage as e:
        return None, e.reason


class _Rows(torch.utils.data.Dataset):
    """``(path, label, sha256)`` rows -> ``(tensor | None, label, path, reason)``."""

    def __init__(self, root: Path, rows: list, transform: Callable):
        self.root, self.rows, self.transform = Path(root), rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        path, label, sha = self.rows[i]
        x, why = _decode(self.root, path, sha, self.transform)
        return x, label, path, why


def _collate(items):
    # A failed image travels to the main process as data: an exception raised in
    # a loader worker arrives wrapped in a multi-line traceback.
    bad = [(path, why) for x, _, path, why in items if x is None]
    if bad:
        return None, None, bad
    return torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items]), []


def _loader(root, rows, transform, batch_size, workers, shuffle=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        _Rows(root, rows, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=_collate,
    )


def _check_batch(bad) -> None:
    if bad:
        path, why = bad[0]
        raise PipelineError(f"cannot use {path}: {why}; run dvc repro so that the prepare stage lists the photos again")


def split_validation(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``fraction`` of each class held out, at least one image left to train on.

    A class of one image keeps it for training; ``fraction`` 0 gives no validation slice.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(len(idx) - 1, int(round(len(idx) * fraction)))
        val.extend(idx[:k].tolist())
    val_mask = np.zeros(len(labels), bool)
    val_mask[val] = True
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


@torch.inference_mode()
def predict_logits(net: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and labels (N,) of every batch of ``loader``; leaves ``net`` in eval mode."""
    net.eval()
    logits, labels = [], []
    for x, y, bad in loader:
        _check_batch(bad)
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        logits.append(net(x).float().cpu())
        labels.append(y)
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def logits_for_rows(net, *, root, rows, transform, device="auto", batch_size=32, workers=0):
    """The network's logits for ``(path, label, sha256)`` rows, decoded like the feature cache."""
    dev = resolve_device(device)
    net.to(dev)
    if dev.type == "cuda":
        net.to(memory_format=torch.channels_last)
    return predict_logits(net, _loader(root, rows, transform, batch_size, workers), dev)


# -------------------------------------------------------------------- training


@dataclass
class FitResult:
    best_epoch: int  # 0: nothing trained (epochs 0): the network is still the head's
    best_val_accuracy: float | None
    epochs_run: int
    stopped: str  # "epochs" | "early stopping" | "max_minutes"
    seconds: float
    history: list = field(default_factory=list)  # one dict per epoch


def _check(params: dict) -> None:
    def bad(key, want):
        raise PipelineError(f"finetune.{key} must be {want}, found {params[key]!r}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    unknown = sorted(set(params) - set(FINETUNE_DEFAULTS))
    if unknown:
        raise PipelineError(
            f"unknown finetune key(s) {unknown}; accepted: {', '.join(sorted(FINETUNE_DEFAULTS))}"
        )
    if params["unfreeze"] not in UNFREEZE:
        raise PipelineError(f"unknown finetune.unfreeze '{params['unfreeze']}'; accepted: {', '.join(UNFREEZE)}")
    for key in ("epochs", "seed"):
        if not is_int(params[key]) or params[key] < 0:
            bad(key, "a whole number >= 0")
    if params["decode_workers"] != "auto" and not (is_int(params["decode_workers"]) and params["decode_workers"] >= 0):
        bad("decode_workers", "auto or a whole number >= 0")
    for key in ("batch_size", "patience"):
        if not is_int(params[key]) or params[key] < 1:
            bad(key, "a whole number >= 1")
    for key in ("lr_head", "lr_backbone", "max_minutes"):
        if not is_num(params[key]) or params[key] <= 0:
            bad(key, "a number > 0")
    device = params["device"]
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        bad("device", "auto, cpu, cuda or cuda:N")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"finetune.device is {device!r} but no CUDA device is available; use auto or cpu")
    for key, hi in (("weight_decay", math.inf), ("warmup_fraction", 1), ("label_smoothing", 1), ("val_fraction", 0.5)):
        if not is_num(params[key]) or not 0 <= params[key] < hi:
            bad(key, f"a number in [0, {hi})")


def _workers(setting, device: torch.device) -> int:
    """``auto``: none on the CPU, whose cores run the network; up to 8 beside a GPU."""
    if setting != "auto":
        return int(setting)
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _optimizer(net: FineTuneNet, trainable: list[nn.Module], lr_head, lr_backbone, weight_decay):
    """AdamW; the backbone at a lower rate; no decay on biases and norm parameters."""
    groups = []
    for lr, modules in ((lr_head, trainable[:1]), (lr_backbone, trainable[1:])):
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": weight_decay},
            {"params": rest, "lr": lr, "weight_decay": 0.0},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up to 1, then cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def fit(
    net: FineTuneNet,
    *,
    backbone: str,
    root,
    train_rows: list,
    val_rows: list,
    transform_spec: TransformSpec,
    on_epoch: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] = print,
    **params,
) -> FitResult:
    """Fine-tune ``net`` in place and leave it holding the best epoch's weights.

    Args:
        backbone: registry name, for the ``unfreeze: last`` rule.
        train_rows, val_rows: ``(path, label, sha256)`` relative to ``root``;
            with no val rows the last epoch is kept.
        on_epoch: called with ``(epoch, metrics)``; epoch 0 is the start.
        **params: the ``finetune`` keys of params.yaml (:data:`FINETUNE_DEFAULTS`).

    Returns:
        which epoch was kept, why training stopped, and per-epoch metrics.
    """
    p = {**FINETUNE_DEFAULTS, **params}
    _check(p)
    t_start = time.perf_counter()
    deadline = t_start + 60.0 * p["max_minutes"]
    dev = resolve_device(p["device"])
    cuda = dev.type == "cuda"
    _seed_everything(p["seed"])
    if cuda:
        torch.backends.cudnn.benchmark = True

    trainable = unfreeze_modules(net, backbone, p["unfreeze"])
    net.to(dev)
    if cuda:
        net.to(memory_format=torch.channels_last)
    n_trainable = sum(q.numel() for m in trainable for q in m.parameters())
    bs, workers = p["batch_size"], _workers(p["decode_workers"], dev)
    train_loader = _loader(root, train_rows, train_transform(transform_spec), bs, workers, shuffle=True, seed=p["seed"])
    val_loader = _loader(root, val_rows, transform_spec.build(), bs, workers) if val_rows else None
    n_batches = len(train_loader)
    total_steps = max(1, p["epochs"] * n_batches)
    warmup = int(round(p["warmup_fraction"] * total_steps))
    opt = _optimizer(net, trainable, p["lr_head"], p["lr_backbone"], p["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, warmup))
    criterion = nn.CrossEntropyLoss(label_smoothing=p["label_smoothing"])
    # bfloat16 needs no loss scaling; older GPUs fall back to float16 with a scaler.
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
    log(
        f"finetune: {backbone}, unfreeze {p['unfreeze']} ({n_trainable:,} trainable parameters), "
        f"{len(train_rows)} train / {len(val_rows)} validation images, batch {bs}, "
        f"up to {p['epochs']} epochs or {p['max_minutes']:g} min, on {dev}"
        + (f" ({str(amp_dtype).split('.')[-1]} autocast, channels_last)" if cuda else "")
    )

    def validate() -> dict:
        if val_loader is None:
            return {}
        logits, y = predict_logits(net, val_loader, dev)
        t = torch.from_numpy(logits)
        return {
            "val/loss": float(nn.functional.cross_entropy(t, torch.from_numpy(y))),
            "val/accuracy": float((logits.argmax(1) == y).mean()),
        }

    history = []
    start = validate()
    if start:
        # Optimistic: the head was fitted on the whole train split, validation slice
        # included, so the start is reported but never kept as "best".
        log(f"finetune: start (the logreg head): validation loss {start['val/loss']:.4f}, accuracy "
            f"{start['val/accuracy']:.4f} (optimistic: the head was fitted on these images too)")
        if on_epoch:
            on_epoch(0, start)

    best_state, best_key, best_epoch, best_acc = None, None, 0, None
    stopped, since_best, epoch = "epochs", 0, 0
    for epoch in range(1, p["epochs"] + 1):
        set_train_mode(net, trainable)
        t_epoch = time.perf_counter()
        seen = correct = 0
        loss_sum = 0.0
        timed_out = False
        for i, (x, y, bad) in enumerate(train_loader, start=1):
            _check_batch(bad)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=cuda):
                out = net(x)
                loss = criterion(out.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            seen += len(y)
            correct += int((out.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
            timed_out = time.perf_counter() > deadline
            if epoch == 1 and (i == min(3, n_batches) or (timed_out and i < 3)):
                _estimate(log, time.perf_counter() - t_epoch, i, n_batches, len(val_rows), bs, p)
            if timed_out:
                break
        m = {
            "train/loss": loss_sum / max(1, seen),
            "train/accuracy": correct / max(1, seen),
        }
        m.update(validate())
        m["seconds"] = time.perf_counter() - t_epoch
        history.append({"epoch": epoch, **m})
        if on_epoch:
            on_epoch(epoch, m)
        # Best: highest validation accuracy, then lowest validation loss.
        key = (m["val/accuracy"], -m["val/loss"]) if "val/accuracy" in m else (epoch,)
        improved = best_key is None or key > best_key
        if improved:
            best_key, best_epoch, best_acc = key, epoch, m.get("val/accuracy")
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
            since_best = 0
        else:
            since_best += 1
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "seconds")
        log(f"finetune: epoch {epoch}{' (partial)' if timed_out else ''}: {shown} ({m['seconds']:.0f} s)"
            + (" *" if improved else ""))
        if timed_out:
            stopped = "max_minutes"
            log(f"finetune: finetune.max_minutes ({p['max_minutes']:g}) reached; keeping epoch {best_epoch}")
            break
        if val_loader is not None and since_best >= p["patience"]:
            stopped = "early stopping"
            log(f"finetune: no better validation score for {since_best} epochs; keeping epoch {best_epoch}")
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return FitResult(best_epoch, best_acc, epoch if history else 0, stopped, time.perf_counter() - t_start, history)


def _estimate(log, seconds, batches, n_batches, n_val, bs, p) -> None:
    """Print the expected time per epoch from the first batches."""
    per_batch = seconds / batches
    train = per_batch * n_batches
    # An eval batch has no backward pass: about a third of a training step.
    val = per_batch / 3 * math.ceil(n_val / bs)
    epoch = train + val
    msg = (f"finetune: about {epoch:.0f} s per epoch ({train:.0f} s training, {val:.0f} s validation; "
           f"timed on the first {batches} batches), {p['epochs']} epochs ~ {p['epochs'] * epoch / 60:.1f} min")
    fits = int(60 * p["max_minutes"] // max(epoch, 1e-9))
    if fits < p["epochs"]:
        msg += f"; finetune.max_minutes={p['max_minutes']:g} allows about {fits}"
    log(msg)


# ----------------------------------------------------------------- save / load


def save_finetuned(path, net: FineTuneNet, backbone, classes: list[str], **extra) -> dict:
    """Write ``path`` (a plain state dict) and its ``.json`` description, each atomically.

    Args:
        backbone: the :class:`~pipeline.backbones.Backbone` the network was built
            from: its name, weights, transform and provenance are recorded.
        **extra: more JSON entries (training summary, params).

    Returns:
        the description written.
    """
    path = Path(path)
    info = {
        "format": FORMAT,
        "backbone": backbone.name,
        "weights": backbone.weights,
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


def load_finetuned(path, expected: dict | None = None) -> tuple[FineTuneNet, dict]:
    """Rebuild the fine-tuned network on the CPU, in eval mode, refusing a stale one.

    Args:
        expected: provenance keys (backbone, weights, weights_sha256, transform)
            and ``classes`` it must match.

    Returns:
        the network and its JSON description; ``transform_of(info).build()``
        is its eval transform.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"fine-tuned model {path} not found; run the finetune stage first (dvc repro)")
    info = read_json(path.with_suffix(".json"), f"description of {path}")
    if info.get("format") != FORMAT:
        raise PipelineError(f"{path.with_suffix('.json')} is not a fine-tuned model description of this project")
    check_provenance(dict(info["provenance"], classes=info["classes"]), expected or {}, f"fine-tuned model {path}")
    spec = get_spec(info["backbone"])
    features, _ = spec.split(spec.builder())
    net = FineTuneNet(features, nn.Linear(spec.feature_dim, len(info["classes"])))
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


def transform_of(info: dict) -> TransformSpec:
    """The eval preprocessing recorded in ``models/finetune.json``."""
    t = info["transform"]
    return TransformSpec(t["resize"], t["crop"], t["interpolation"], tuple(t["mean"]), tuple(t["std"]))


# ---------------------------------------------------------------------- stage


def run_finetune(*, prepared_dir, head_path, out_path, live_dir, backbone: str, weights: str, **params) -> FitResult:
    """The ``finetune`` stage: manifest + logreg head in, ``out_path`` (+ .json) and DVCLive logs out."""
    from dvclive import Live

    from pipeline.backbones import load_backbone
    from pipeline.data.manifest import read_prepared
    from pipeline.heads.batch import load_head

    p = {**FINETUNE_DEFAULTS, **params}
    _check(p)
    prepared = read_prepared(prepared_dir)
    bb = load_backbone(backbone, weights)
    head = load_head(head_path, {**bb.provenance(), "classes": prepared.classes})
    rows = [(path, label, sha) for path, label, split, sha in prepared.rows if split == "train"]
    if not rows:
        raise PipelineError(f"{prepared_dir} lists no train images; check data.test_fraction")
    tr, va = split_validation([r[1] for r in rows], p["val_fraction"], p["seed"])
    net = build_network(bb.features, head["estimator"])

    with Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False) as live:
        def on_epoch(epoch: int, m: dict) -> None:
            live.step = epoch
            for k, v in m.items():
                if k != "seconds":
                    live.log_metric(k, v)
            live.next_step()

        result = fit(
            net,
            backbone=backbone,
            root=prepared.root,
            train_rows=[rows[i] for i in tr],
            val_rows=[rows[i] for i in va],
            transform_spec=bb.transform_spec,
            on_epoch=on_epoch,
            **p,
        )
        live.summary.update(
            best_epoch=result.best_epoch,
            epochs_run=result.epochs_run,
            **({"best_val_accuracy": result.best_val_accuracy} if result.best_val_accuracy is not None else {}),
        )
    save_finetuned(
        out_path,
        net,
        bb,
        prepared.classes,
        init_head=str(head_path),
        params=p,
        training={
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            "epochs_run": result.epochs_run,
            "stopped": result.stopped,
            "seconds": round(result.seconds, 1),
            "n_train": len(tr),
            "n_val": len(va),
        },
    )
    print(f"finetune: kept epoch {result.best_epoch} ({result.stopped}) after {result.seconds:.0f} s -> {out_path}",
          flush=True)
    return result
