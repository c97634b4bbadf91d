"""The training loop: AdamW with warm-up and cosine decay, the best validation epoch kept.

Epoch 0, the warm-start head before any step, is a candidate like every other
epoch: its head never saw the validation slice, so when no epoch scores better
there the network keeps the head's weights and the stage says so. Optional, by
params: an exponential moving average of the trained weights (``finetune.ema``),
which is what is validated and kept, and horizontal-flip test-time augmentation
(``finetune.tta_flip``) wherever the network is scored.

Example:
    >>> net = build_network(bb.features, head["estimator"])                  # doctest: +SKIP
    >>> result = fit(net, backbone="resnet50", root=prepared.root, train_rows=tr,
    ...              val_rows=va, transform_spec=bb.transform_spec, cfg=cfg.finetune)  # doctest: +SKIP
    >>> result.best_epoch, result.stopped                                     # doctest: +SKIP
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.config import FinetuneConfig
from pipeline.data.manifest import Row
from pipeline.data.transform import TransformSpec
from pipeline.finetune.data import check_batch, decode_workers, loader
from pipeline.finetune.network import FineTuneNet, open_modules, set_train_mode, unfreeze_modules
from pipeline.runtime import Placement, Precision, place

FP32 = Precision("fp32", "fp32")


@dataclass
class FitResult:
    best_epoch: int  # 0: nothing trained (epochs 0): the network is still the head's
    best_val_accuracy: float | None
    epochs_run: int
    stopped: str  # "epochs" | "early stopping" | "max_minutes"
    seconds: float
    history: list = field(default_factory=list)  # one dict per epoch
    train_images_per_second: float | None = None  # training steps only (forward, backward, update, decoding)

    def summary(self) -> dict:
        return {
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            "epochs_run": self.epochs_run,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 1),
            "train_images_per_second": self.train_images_per_second,
        }


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    # channels_last pays off on CUDA; on the CPU it only changes the bits.
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


@torch.inference_mode()
def predict_logits(net: nn.Module, batches, device: torch.device,
                   precision: Precision | None = None, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and labels (N,) of every batch of ``batches``; leaves ``net`` in eval mode.

    ``flip``: average the logits of each image and of its mirror image (the
    training crops are flipped at random, so both views are in distribution).
    """
    net.eval()
    logits, labels = [], []
    precision = precision or FP32
    for x, y, bad in batches:
        check_batch(bad)
        with precision.autocast(device):
            x = _to_device(x, device)
            out = net(x)
            if flip:
                out = (out.float() + net(x.flip(3)).float()) / 2
        logits.append(out.float().cpu())
        labels.append(y)
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _optimizer(groups: list[list[nn.Module]], cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over every group that may train, frozen ones included (they have no gradient until opened).

    The head trains at ``lr_head``; backbone depth group k (0 = the last stage)
    at ``lr_backbone * lr_decay**k``: lower layers hold more general filters,
    which small steps keep. No weight decay on biases and norm parameters.
    """
    rates = [cfg.lr_head, *(cfg.lr_backbone * cfg.lr_decay**k for k in range(len(groups) - 1))]
    params_groups = []
    for lr, modules in zip(rates, groups):
        params = [p for m in modules for p in m.parameters()]
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        params_groups += [
            {"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
            {"params": rest, "lr": lr, "weight_decay": 0.0},
        ]
    return torch.optim.AdamW([g for g in params_groups if g["params"]])


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up to 1, then cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class _EMA:
    """An exponential moving average of the weights, swapped in to validate and keep.

    ``decay`` is per optimiser step; it starts at the warm start, so on a small
    set (a few steps per epoch) the average stays anchored near the head.
    """

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        # Every parameter: progressive unfreezing opens more later; a frozen one equals its average.
        self.params = list(net.parameters())
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live and the averaged weights (call again to swap back)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def batch_mixer(mixup: float, cutmix: float, n_classes: int):
    """``(images, labels) -> (mixed images, soft labels)``: MixUp and/or CutMix (one per batch), or None when off.

    The soft labels (N, classes) sum to one per row; the cross-entropy takes them as they are.
    """
    from torchvision.transforms import v2 as T

    built = [m(alpha=float(a), num_classes=n_classes) for a, m in ((mixup, T.MixUp), (cutmix, T.CutMix)) if a]
    if not built:
        return None
    return built[0] if len(built) == 1 else T.RandomChoice(built)


class _Best:
    """The best epoch so far: highest validation accuracy, then lowest validation loss.

    Against epoch 0 (the warm-start head) accuracy alone decides: a fine-tuned
    epoch replaces it only with strictly more photos right. A lower loss at
    equal accuracy on a validation slice of a few photos is noise, and losing
    to the head sends the stage to the guard's head, the user's logreg.
    """

    def __init__(self):
        self.key, self.epoch, self.accuracy, self.state, self.since = None, 0, None, None, 0

    def offer(self, epoch: int, m: dict, net: nn.Module) -> bool:
        key = (m["val/accuracy"], -m["val/loss"]) if "val/accuracy" in m else (epoch,)
        # Ties go to the earlier epoch: fine-tuning must beat the head, not match it.
        beats = self.key is None or key > self.key
        if beats and self.key is not None and self.epoch == 0 and "val/accuracy" in m:
            beats = m["val/accuracy"] > self.accuracy
        if not beats:
            self.since += 1
            return False
        self.key, self.epoch, self.accuracy, self.since = key, epoch, m.get("val/accuracy"), 0
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        return True


def fit(
    net: FineTuneNet,
    *,
    backbone: str,
    root,
    train_rows: Sequence[Row],
    val_rows: Sequence[Row],
    transform_spec: TransformSpec,
    cfg: FinetuneConfig,
    on_epoch: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] = print,
    placement: Placement | None = None,
) -> FitResult:
    """Fine-tune ``net`` in place and leave it holding the best epoch's weights.

    Args:
        backbone: registry name, for the ``unfreeze: last`` rule.
        train_rows, val_rows: manifest rows of images under ``root``; with no
            val rows the last epoch is kept.
        transform_spec: the backbone's preprocessing: ``augment()`` for
            training, ``build()`` for validation.
        placement: the caller's resolved device and precision; default:
            resolved here from ``cfg.device`` and ``cfg.precision``.
        cfg: the ``finetune`` section of params.yaml.
        on_epoch: called with ``(epoch, metrics)``; epoch 0 is the start.

    Returns:
        which epoch was kept, why training stopped, and per-epoch metrics.
    """
    t_start = time.perf_counter()
    deadline = t_start + 60.0 * cfg.max_minutes
    where = placement or place(cfg.device, cfg.precision, section="finetune")
    dev, precision = where.device, where.precision
    _seed_everything(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        net.to(memory_format=torch.channels_last)

    groups = unfreeze_modules(net, backbone, cfg.unfreeze)
    net.to(dev)
    n_trainable = sum(q.numel() for q in net.parameters() if q.requires_grad)
    bs, workers = cfg.batch_size, decode_workers(cfg.decode_workers, dev)
    aug = cfg.augment
    train_loader = loader(root, train_rows, transform_spec.augment(aug.crop_scale, aug.policy, aug.erasing), bs,
                          workers, shuffle=True, seed=cfg.seed)
    mix = batch_mixer(aug.mixup, aug.cutmix, n_classes=net.head.out_features)
    val_loader = loader(root, val_rows, transform_spec.build(), bs, workers) if val_rows else None
    n_batches = len(train_loader)
    total_steps = max(1, cfg.epochs * n_batches)
    opt = _optimizer(groups, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(total_steps, int(round(cfg.warmup_fraction * total_steps)))
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    log(
        f"finetune: {backbone}, unfreeze {cfg.unfreeze} ({n_trainable:,} trainable parameters), "
        f"{len(train_rows)} train / {len(val_rows)} validation images, batch {bs}, "
        f"up to {cfg.epochs} epochs or {cfg.max_minutes:g} min, on {where.describe()}"
    )

    def validate() -> dict:
        if val_loader is None:
            return {}
        logits, y = predict_logits(net, val_loader, dev, precision, cfg.tta_flip)
        return {
            "val/loss": float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y))),
            "val/accuracy": float((logits.argmax(1) == y).mean()),
        }

    history = []
    best, stopped, epoch = _Best(), "epochs", 0
    ema = _EMA(net, cfg.ema) if cfg.ema > 0 else None
    start = validate()
    if start:
        # The warm-start head never saw these images: an honest score, and a candidate.
        log(f"finetune: epoch 0 (the warm-start head): validation loss {start['val/loss']:.4f}, "
            f"accuracy {start['val/accuracy']:.4f}")
        history.append({"epoch": 0, **start})
        best.offer(0, start, net)
        if on_epoch:
            on_epoch(0, start)
    images_trained, seconds_training = 0, 0.0
    for epoch in range(1, cfg.epochs + 1):
        if cfg.unfreeze == "progressive" and epoch > 1:
            unfreeze_modules(net, backbone, cfg.unfreeze, epoch)
            log(f"finetune: epoch {epoch} trains the last {min(epoch, len(groups) - 1)} of {len(groups) - 1} "
                f"depth groups ({sum(q.numel() for q in net.parameters() if q.requires_grad):,} parameters)")
        set_train_mode(net, open_modules(groups, cfg.unfreeze, epoch))
        t_epoch = time.perf_counter()
        seen = correct = 0
        loss_sum = 0.0
        timed_out = False
        for i, (x, y, bad) in enumerate(train_loader, start=1):
            check_batch(bad)
            x, y = _to_device(x, dev), y.to(dev, non_blocking=True)
            if mix is not None:  # soft targets: each row a mixture of two photos' classes
                x, y = mix(x, y)
            with precision.autocast(dev):
                out = net(x)
                loss = criterion(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update()
            seen += len(y)
            correct += int((out.argmax(1) == (y.argmax(1) if y.ndim == 2 else y)).sum())
            loss_sum += float(loss.detach()) * len(y)
            timed_out = time.perf_counter() > deadline
            if epoch == 1 and (i == min(3, n_batches) or (timed_out and i < 3)):
                _estimate(log, time.perf_counter() - t_epoch, i, n_batches, len(val_rows), cfg)
            if timed_out:
                break
        train_seconds = time.perf_counter() - t_epoch
        images_trained += seen
        seconds_training += train_seconds
        m = {"train/loss": loss_sum / max(1, seen), "train/accuracy": correct / max(1, seen),
             "train/images_per_second": seen / max(train_seconds, 1e-9)}
        if ema is not None:
            ema.swap()  # validate (and keep) the averaged weights; swapped back to train on
        m.update(validate())
        m["seconds"] = time.perf_counter() - t_epoch
        history.append({"epoch": epoch, **m})
        if on_epoch:
            on_epoch(epoch, m)
        improved = best.offer(epoch, m, net)
        if ema is not None:
            ema.swap()
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "seconds")
        log(f"finetune: epoch {epoch}{' (partial)' if timed_out else ''}: {shown} ({m['seconds']:.0f} s)"
            + (" *" if improved else ""))
        if timed_out:
            stopped = "max_minutes"
            log(f"finetune: finetune.max_minutes ({cfg.max_minutes:g}) reached; keeping epoch {best.epoch}")
            break
        if val_loader is not None and best.since >= cfg.patience:
            stopped = "early stopping"
            log(f"finetune: no better validation score for {best.since} epochs; keeping epoch {best.epoch}")
            break
    if best.state is not None:
        net.load_state_dict(best.state)
    net.eval()
    if val_loader is not None and best.epoch == 0:
        log("finetune: fine-tuning did not beat the warm-start head on the validation slice; "
            "keeping the head's weights")
    rate = round(images_trained / seconds_training, 2) if seconds_training else None
    return FitResult(best.epoch, best.accuracy, epoch if cfg.epochs else 0, stopped,
                     time.perf_counter() - t_start, history, rate)


def _estimate(log, seconds: float, batches: int, n_batches: int, n_val: int, cfg: FinetuneConfig) -> None:
    """Print the expected time per epoch from the first batches."""
    per_batch = seconds / batches
    train = per_batch * n_batches
    # An eval batch has no backward pass: about a third of a training step.
    val = per_batch / 3 * math.ceil(n_val / cfg.batch_size)
    epoch = train + val
    msg = (f"finetune: about {epoch:.0f} s per epoch ({train:.0f} s training, {val:.0f} s validation; "
           f"timed on the first {batches} batches), {cfg.epochs} epochs ~ {cfg.epochs * epoch / 60:.1f} min")
    fits = int(60 * cfg.max_minutes // max(epoch, 1e-9))
    if fits < cfg.epochs:
        msg += f"; finetune.max_minutes={cfg.max_minutes:g} allows about {fits}"
    log(msg)
