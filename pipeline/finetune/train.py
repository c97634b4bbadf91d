"""The training loop: AdamW with warm-up and cosine decay, the best validation epoch kept.

Epoch 0, the warm-start head before any step, is a candidate like every other
epoch: its head never saw the validation slice, so when no epoch scores better
there the network keeps the head's weights and the stage says so. Optional, by
params: an exponential moving average of the trained weights (``finetune.ema``),
validated every epoch beside the trained weights as one more candidate (kept when
it scores better; without a validation slice it is what is kept), and
horizontal-flip test-time augmentation
(``finetune.tta_flip``) wherever the network is scored.

One loop for one process or many (:mod:`pipeline.finetune.distributed`): the
same global batches, schedule and random draws whatever the number of workers,
and a checkpoint (:mod:`pipeline.finetune.resume`) from which a killed run
goes on to the very weights an unbroken one reaches.

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
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.config import FinetuneConfig
from pipeline.data.manifest import Row
from pipeline.data.transform import TransformSpec
from pipeline.finetune.cached import Split, Views
from pipeline.finetune.data import (
    GlobalBatches, RowImages, batches_of, check_batch, decode_workers, loader, mix_seed, train_loader,
)
from pipeline.finetune.distributed import Workers, single
from pipeline.finetune import methods
from pipeline.finetune.network import FineTuneNet, open_modules, open_part, set_train_mode, unfreeze_modules
from pipeline.finetune.resume import (
    Checkpoints, load_optimizer_state, optimizer_state, prefixed, unprefixed,
)
from pipeline.runtime import Placement, Precision, place

FP32 = Precision("fp32", "fp32")
#: ``finetune.epochs: budget``: as many epochs as ``max_minutes`` allows, timed on this many batches,
#: and never more than this many epochs (a few photos in ten minutes would otherwise run thousands).
BUDGET, BUDGET_PROBE_STEPS, BUDGET_MAX_EPOCHS, BUDGET_SHARE = "budget", 3, 100, 0.8


@dataclass
class FitResult:
    best_epoch: int  # 0: nothing trained (epochs 0): the network is still the head's
    best_val_accuracy: float | None
    epochs_run: int
    stopped: str  # "epochs" | "early stopping" | "max_minutes"
    seconds: float
    history: list = field(default_factory=list)  # one dict per epoch
    train_images_per_second: float | None = None  # training steps only (forward, backward, update, decoding)
    resumed_from: str | None = None  # "epoch E, step S" when the run went on from a checkpoint
    kept_weights: str = "trained"  # "ema": the kept epoch's average of the weights (finetune.ema) scored better
    epochs_planned: int | None = None  # finetune.epochs, or the number finetune.epochs: budget chose

    def summary(self) -> dict:
        return {
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            "epochs_run": self.epochs_run,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 1),
            "train_images_per_second": self.train_images_per_second,
            "resumed_from": self.resumed_from,
            "kept_weights": self.kept_weights,
            "epochs_planned": self.epochs_planned,
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
    """An exponential moving average of the weights, swapped in to validate (and keep, when it wins).

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
    mixer = built[0] if len(built) == 1 else T.RandomChoice(built)

    def mix(x: torch.Tensor, y: torch.Tensor):
        # torchvision mixes (N, C, H, W) batches; feature vectors (cached views with unfreeze: none)
        # go through as 1x1 maps, which MixUp mixes alike.
        if x.ndim != 2:
            return mixer(x, y)
        x, y = mixer(x[:, :, None, None], y)
        return x.flatten(1), y

    return mix


class _Best:
    """The best epoch so far: highest validation accuracy, then lowest validation loss.

    Against epoch 0 (the warm-start head) accuracy alone decides: a fine-tuned
    epoch replaces it only with at least ``margin`` more validation photos right
    (``finetune.beat_head_by``). A lower loss at equal accuracy, or one photo
    more, on a validation slice of a few dozen photos is noise, and losing to the
    head sends the stage to the guard's head, the user's logreg.
    """

    def __init__(self, n_val: int = 0, margin: int = 1):
        self.key, self.epoch, self.accuracy, self.state, self.since = None, 0, None, None, 0
        self.n_val, self.margin = n_val, margin
        self.weights = "trained"  # or "ema": which of the epoch's candidates was kept

    def offer(self, epoch: int, m: dict, net: nn.Module, weights: str = "trained", count: bool = True) -> bool:
        """Keep ``net``'s weights if ``m`` beats the best so far; ``count``: a miss counts toward patience.

        An epoch's second candidate (its EMA) is offered with ``count`` False, so
        that an epoch counts once: as an improvement when either candidate wins.
        """
        key = (m["val/accuracy"], -m["val/loss"]) if "val/accuracy" in m else (epoch,)
        # Ties go to the earlier epoch: fine-tuning must beat the head, not match it.
        beats = self.key is None or key > self.key
        if beats and self.key is not None and self.epoch == 0 and "val/accuracy" in m:
            gained = round((m["val/accuracy"] - self.accuracy) * self.n_val) if self.n_val else 1
            beats = m["val/accuracy"] > self.accuracy and gained >= self.margin
        if not beats:
            self.since += count
            return False
        self.key, self.epoch, self.accuracy, self.since = key, epoch, m.get("val/accuracy"), 0
        self.weights = weights
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
    workers: Workers | None = None,
    checkpoints: Checkpoints | None = None,
    views: Views | None = None,
) -> FitResult:
    """Fine-tune ``net`` in place and leave it holding the best epoch's weights.

    The same function runs in one process or in each of several workers: the
    global batches, the learning-rate schedule and every random draw are the
    same for any number of workers (:mod:`pipeline.finetune.distributed`).

    Args:
        backbone: registry name, for the ``unfreeze: last`` rule.
        train_rows, val_rows: manifest rows of images under ``root``; with no
            val rows the last epoch is kept.
        transform_spec: the backbone's preprocessing: ``augment()`` for
            training, ``build()`` for validation.
        placement: the caller's resolved device and precision; default:
            resolved here from ``cfg.device`` and ``cfg.precision``.
        cfg: the ``finetune`` section of params.yaml.
        on_epoch: called with ``(epoch, metrics)``; epoch 0 is the start. After
            a resume, first with each epoch the checkpoint holds.
        workers: this process's place among the workers; default: alone, on the placement's device.
        checkpoints: where to save the run's state and resume it from
            (:mod:`pipeline.finetune.resume`); None: no checkpoints.
        views: cached activations (:mod:`pipeline.finetune.cached`) to train on
            instead of decoding photos, and to validate on unless ``tta_flip``
            (which needs the mirrored photos); None: photos.

    Returns:
        which epoch was kept, why training stopped, and per-epoch metrics.
    """
    t_start = time.perf_counter()
    where = placement or place(cfg.device, cfg.precision, section="finetune")
    ctx = workers or single(where.device)
    dev, precision = ctx.device, where.precision
    _seed_everything(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        net.to(memory_format=torch.channels_last)

    # The method's parameters (adapters, scales and shifts) first: the groups and the optimiser then hold them.
    methods.prepare(net, open_part(net, backbone, cfg.unfreeze), cfg.method, lora_rank=cfg.lora_rank,
                    backbone=backbone)
    def unfreeze(epoch: int) -> list[list[nn.Module]]:  # and, within what opens, only what the method trains
        groups = unfreeze_modules(net, backbone, cfg.unfreeze, epoch)
        methods.restrict(net, net.head, cfg.method)
        return groups

    groups = unfreeze(1)
    # With views, the frozen layers below the cut pass their input through: the input is what they computed.
    top = Split(net, views.cut).skipping_lower if views is not None else nullcontext
    cached_val = views is not None and not cfg.tta_flip
    net.to(dev)
    n_trainable = sum(q.numel() for q in net.parameters() if q.requires_grad)
    bs, decoders = cfg.batch_size, decode_workers(cfg.decode_workers, dev)
    train_decoders = decoders if views is None else 0  # views are read, not decoded
    aug = cfg.augment
    train_transform = transform_spec.augment(aug.crop_scale, aug.policy, aug.erasing)
    mix = batch_mixer(aug.mixup, aug.cutmix, n_classes=net.head.out_features)
    mine = list(val_rows)[ctx.rank::ctx.world_size]  # this worker's share of the validation photos
    val_loader = (batches_of(torch.utils.data.Subset(views.val(), range(ctx.rank, len(val_rows), ctx.world_size)), bs)
                  if cached_val else
                  loader(root, mine, transform_spec.build(), bs, decoders, pin_memory=dev.type == "cuda"))
    n_batches = math.ceil(len(train_rows) / bs)
    opt = _optimizer(groups, cfg)

    def schedule(epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
        total_steps = max(1, epochs * n_batches)
        return torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(total_steps, int(round(cfg.warmup_fraction * total_steps))))

    # Summed over the photos and divided by the global batch: the gradient DDP averages over
    # the workers is then the one-process batch's mean, whatever each worker's share.
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="sum")
    if ctx.main:
        log(
            f"finetune: {backbone}, unfreeze {cfg.unfreeze}"
            + (f", method {cfg.method}" + (f" (rank {cfg.lora_rank})" if cfg.method == "lora" else "")
               if cfg.method != "full" else "")
            + f" ({n_trainable:,} trainable parameters), "
            f"{len(train_rows)} train / {len(val_rows)} validation images, batch {bs}"
            + (f" across {ctx.world_size} workers ({ctx.engine})" if ctx.distributed else "")
            + (f", up to {cfg.epochs} epochs or {cfg.max_minutes:g} min" if cfg.epochs != BUDGET else
               f", as many epochs as fit in {cfg.max_minutes:g} min (finetune.epochs: budget)")
            + f", on {where.describe()}"
            + (f"; over the cached activations entering {'.'.join(views.cut)} ({views.k} view"
               f"{'s' if views.k > 1 else ''} per photo)" if views is not None else "")
        )

    def validate() -> dict:
        if not val_rows:
            return {}
        with top() if cached_val else nullcontext():
            logits, y = predict_logits(net, val_loader, dev, precision, cfg.tta_flip)
        parts = [p for p in ctx.gather((logits, y)) if len(p[1])]
        logits, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return {
            "val/loss": float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y))),
            "val/accuracy": float((logits.argmax(1) == y).mean()),
        }

    shape = views.shape if views is not None else (3, transform_spec.crop, transform_spec.crop)

    def forward_backward(x, y, i: int):
        """One step's forward and backward pass on the ``i``-th global batch (1 = the first): ``(out, y, loss)``."""
        n_global = min(bs, len(train_rows) - (i - 1) * bs)
        if x is None:  # an empty share: a forward pass of no photos keeps DDP's collectives in step
            x = torch.zeros(0, *shape)
        x, y = _to_device(x, dev), y.to(dev, non_blocking=True)
        # channels_last inputs for training on the CPU too: 1.6x the images/s of a bf16 step of
        # efficientnet_lite0 on AVX-512 (python -m pipeline.bench train_speed). Scoring keeps the
        # extraction's layout, so epoch 0 still predicts exactly what the cached features' head does.
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if mix is not None and len(y):  # soft targets: each row a mixture of two photos' classes
            x, y = mix(x, y)
        with precision.autocast(dev):
            out = model(x)
            batch_loss = criterion(out.float(), y)
        opt.zero_grad(set_to_none=True)
        (batch_loss * (ctx.world_size / n_global)).backward()
        return out, y, batch_loss

    def epoch_data(epoch: int):
        return views.train(epoch) if views is not None else RowImages(root, train_rows, train_transform)

    def budget_epochs(val_seconds: float) -> int:
        """``finetune.epochs: budget``: the epochs that fit in what is left of ``max_minutes``, timed now.

        The first batches of epoch 1 go forward and backward with no update, so the
        run trains exactly as it would with that number of epochs given.
        """
        set_train_mode(net, open_modules(groups, cfg.unfreeze, 1))
        sampler = GlobalBatches(len(train_rows), bs, cfg.seed, 1, ctx.rank, ctx.world_size)
        steps = min(BUDGET_PROBE_STEPS, n_batches)
        t = time.perf_counter()
        with top():
            for i, (x, y, bad) in zip(range(1, steps + 1), train_loader(epoch_data(1), sampler, train_decoders)):
                check_batch(bad)
                torch.manual_seed(mix_seed(cfg.seed, 1, i, ctx.rank))
                forward_backward(x, y, i)
        opt.zero_grad(set_to_none=True)
        # The slowest worker sets the pace, and every worker computes the same number from the gathered times.
        per_step = max(p[0] for p in ctx.gather(((time.perf_counter() - t) / steps,)))
        epoch_seconds = per_step * n_batches + val_seconds
        left = 60.0 * cfg.max_minutes - (time.perf_counter() - t_start)
        # A fifth of it kept back: epochs vary (a shared machine, checkpoints), and max_minutes stops the run anyway.
        n = max(1, min(BUDGET_MAX_EPOCHS, int(BUDGET_SHARE * left // max(epoch_seconds, 1e-9))))
        if ctx.main:
            log(f"finetune: finetune.epochs: budget: {n} epochs of about {epoch_seconds:.1f} s fit in the "
                f"{left / 60:.1f} min left of finetune.max_minutes {cfg.max_minutes:g} (timed on {steps} "
                f"batches{'; at most ' + str(BUDGET_MAX_EPOCHS) if n == BUDGET_MAX_EPOCHS else ''})")
        return n

    best = _Best(len(val_rows), cfg.beat_head_by)
    ema = _EMA(net, cfg.ema) if cfg.ema > 0 else None
    run = _Run()
    resumed = checkpoints.load() if checkpoints is not None else None
    model = ctx.wrap(net)
    epochs = cfg.epochs
    if resumed is not None:
        epochs = resumed[1].get("epochs", epochs)  # budget: what the first run measured, not a new guess
        sched = schedule(epochs)
        run.restore(resumed, net, opt, sched, ema, best)
        if ctx.main:
            log(f"finetune: resuming from epoch {run.epoch}, step {run.step} of {n_batches} "
                f"({checkpoints.path})")
            if on_epoch:  # DVCLive's log was an output: deleted before this run
                replay(run.history, on_epoch)
    ctx.agree(run.epoch * (n_batches + 1) + run.step, "the step to resume from")
    deadline = t_start + 60.0 * cfg.max_minutes - run.elapsed

    def save(stopped: str | None = None) -> None:
        if checkpoints is not None and ctx.main:
            checkpoints.save(*run.state(net, opt, sched, ema, best, stopped,
                                        elapsed=run.elapsed + time.perf_counter() - t_start))

    if resumed is None:
        t_val = time.perf_counter()
        start = validate()
        t_val = time.perf_counter() - t_val
        if start:
            # The warm-start head never saw these images: an honest score, and a candidate.
            if ctx.main:
                log(f"finetune: epoch 0 (the warm-start head): validation loss {start['val/loss']:.4f}, "
                    f"accuracy {start['val/accuracy']:.4f}")
            run.history.append({"epoch": 0, **start})
            best.offer(0, start, net)
            if on_epoch:
                on_epoch(0, start)
        if epochs == BUDGET:
            epochs = budget_epochs(t_val)
        sched = schedule(epochs)
    run.epochs = epochs
    stopped = run.stopped or "epochs"
    for epoch in range(run.epoch, epochs + 1 if run.stopped is None else 0):
        if cfg.unfreeze == "progressive":
            unfreeze(epoch)
            model = ctx.wrap(net)  # DDP syncs the parameters that train at its construction: these ones now
            if epoch > 1 and ctx.main:
                log(f"finetune: epoch {epoch} trains the last {min(epoch, len(groups) - 1)} of {len(groups) - 1} "
                    f"depth groups ({sum(q.numel() for q in net.parameters() if q.requires_grad):,} parameters)")
        set_train_mode(net, open_modules(groups, cfg.unfreeze, epoch))
        first = run.step
        sampler = GlobalBatches(len(train_rows), bs, cfg.seed, epoch, ctx.rank, ctx.world_size, start=first)
        batches = train_loader(epoch_data(epoch), sampler, train_decoders, pin_memory=dev.type == "cuda")
        t_epoch = time.perf_counter()
        timed_out = False
        with top():
            for i, (x, y, bad) in enumerate(batches, start=first + 1):
                check_batch(bad)
                torch.manual_seed(mix_seed(cfg.seed, epoch, i, ctx.rank))  # MixUp, stochastic depth: by step
                out, y, batch_loss = forward_backward(x, y, i)
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update()
                correct = int((out.argmax(1) == (y.argmax(1) if y.ndim == 2 else y)).sum())
                seen, correct, loss_sum, late = ctx.sum(
                    [len(y), correct, float(batch_loss.detach()), float(time.perf_counter() > deadline)])
                run.count(seen, correct, loss_sum)
                run.step = i
                timed_out = late > 0
                if epoch == 1 and ctx.main and first == 0 and (i == min(3, n_batches) or (timed_out and i < 3)):
                    _estimate(log, time.perf_counter() - t_epoch, i, n_batches, len(val_rows), cfg, epochs)
                if timed_out:
                    break
                if cfg.checkpoint_every and i % cfg.checkpoint_every == 0 and i < n_batches:
                    save()
        train_seconds = time.perf_counter() - t_epoch
        run.images_trained += run.seen - run.seen_before_resume
        run.seconds_training += train_seconds
        m = {"train/loss": run.loss_sum / max(1, run.seen), "train/accuracy": run.correct / max(1, run.seen),
             "train/images_per_second": (run.seen - run.seen_before_resume) / max(train_seconds, 1e-9)}
        m.update(validate())
        # Without a validation slice there is nothing to choose by: the average, when there is one, is kept.
        improved = (best.offer(epoch, m, net) and "*") if ema is None or val_rows else ""
        if ema is not None:
            # The average as one more candidate, swapped in to be validated (and kept), then back to train on.
            ema.swap()
            averaged = validate()
            m.update({k.replace("val/", "val_ema/"): v for k, v in averaged.items()})
            if best.offer(epoch, averaged or m, net, weights="ema", count=not val_rows):
                improved = "* (EMA)"
            ema.swap()
        m["seconds"] = time.perf_counter() - t_epoch
        run.history.append({"epoch": epoch, **m})
        if on_epoch and ctx.main:
            on_epoch(epoch, m)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "seconds")
        if ctx.main:
            log(f"finetune: epoch {epoch}{' (partial)' if timed_out else ''}: {shown} ({m['seconds']:.0f} s)"
                + (f" {improved}" if improved else ""))
        run.next_epoch(epoch)
        if timed_out:
            stopped = "max_minutes"
            if ctx.main:
                log(f"finetune: finetune.max_minutes ({cfg.max_minutes:g}) reached; keeping epoch {best.epoch}")
        elif val_rows and best.since >= cfg.patience:
            stopped = "early stopping"
            if ctx.main:
                log(f"finetune: no better validation score for {best.since} epochs; keeping epoch {best.epoch}")
        save(stopped if stopped != "epochs" else None)
        if stopped != "epochs":
            break
    if best.state is not None:
        net.load_state_dict(best.state)
    methods.merge(net, cfg.method)  # plain layers again: the model folder holds an ordinary network
    net.eval()
    if val_rows and best.epoch == 0 and ctx.main:
        log("finetune: fine-tuning did not beat the warm-start head on the validation slice; "
            "keeping the head's weights")
    rate = round(run.images_trained / run.seconds_training, 2) if run.seconds_training else None
    epochs_run = max((h["epoch"] for h in run.history), default=0) if epochs else 0
    # This process's seconds (what wall_seconds beside them measures); max_minutes counted the earlier runs' too.
    return FitResult(best.epoch, best.accuracy, epochs_run, stopped, time.perf_counter() - t_start,
                     run.history, rate,
                     resumed_from=f"epoch {run.resumed[0]}, step {run.resumed[1]}" if run.resumed else None,
                     kept_weights=best.weights if best.epoch else "trained", epochs_planned=epochs)


def replay(history: list[dict], on_epoch: Callable[[int, dict], None]) -> None:
    """Call ``on_epoch`` with each epoch of ``history`` (from a checkpoint, or from Ray's workers)."""
    for h in history:
        on_epoch(h["epoch"], {k: v for k, v in h.items() if k != "epoch"})


class _Run:
    """Where a run is (epoch, step) and its running sums: what a checkpoint holds besides the tensors."""

    def __init__(self):
        self.epoch, self.step = 1, 0  # the epoch in progress, the steps of it done
        self.seen = self.correct = 0
        self.loss_sum = 0.0
        self.seen_before_resume = 0
        self.images_trained, self.seconds_training, self.elapsed = 0, 0.0, 0.0
        self.history: list[dict] = []
        self.stopped: str | None = None
        self.resumed: tuple[int, int] | None = None
        self.epochs: int = 0  # the run's number of epochs (finetune.epochs, or what budget chose)

    def count(self, seen: float, correct: float, loss_sum: float) -> None:
        self.seen += int(seen)
        self.correct += int(correct)
        self.loss_sum += loss_sum

    def next_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch + 1, 0
        self.seen = self.correct = self.seen_before_resume = 0
        self.loss_sum = 0.0

    def state(self, net, opt, sched, ema, best, stopped, elapsed) -> tuple[dict, dict]:
        tensors = prefixed("model", net.state_dict())
        opt_tensors, opt_meta = optimizer_state(opt)
        tensors.update(opt_tensors)
        if ema is not None:
            tensors.update({f"ema.{i}": t for i, t in enumerate(ema.shadow)})
        if best.state is not None:
            tensors.update(prefixed("best", best.state))
        meta = {"epochs": self.epochs, "epoch": self.epoch, "step": self.step, "seen": self.seen,
                "correct": self.correct,
                "loss_sum": self.loss_sum, "images_trained": self.images_trained,
                "seconds_training": self.seconds_training, "elapsed": elapsed, "history": self.history,
                "stopped": stopped, "optimizer": opt_meta, "scheduler": sched.state_dict(),
                "best": {"key": best.key, "epoch": best.epoch, "accuracy": best.accuracy, "since": best.since,
                         "weights": best.weights}}
        return tensors, meta

    def restore(self, saved: tuple[dict, dict], net, opt, sched, ema, best) -> None:
        tensors, meta = saved
        net.load_state_dict(unprefixed("model", tensors))
        load_optimizer_state(opt, tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        if ema is not None:
            for i, s in enumerate(ema.shadow):
                s.copy_(tensors[f"ema.{i}"])
        b = meta["best"]
        best.key = tuple(b["key"]) if b["key"] is not None else None
        best.epoch, best.accuracy, best.since = b["epoch"], b["accuracy"], b["since"]
        best.weights = b.get("weights", "trained")
        best.state = unprefixed("best", tensors) or None
        self.epoch, self.step = meta["epoch"], meta["step"]
        self.seen, self.correct, self.loss_sum = meta["seen"], meta["correct"], meta["loss_sum"]
        self.seen_before_resume = self.seen
        self.images_trained, self.seconds_training = meta["images_trained"], meta["seconds_training"]
        self.elapsed, self.history, self.stopped = meta["elapsed"], meta["history"], meta["stopped"]
        self.resumed = (self.epoch, self.step)


def _estimate(log, seconds: float, batches: int, n_batches: int, n_val: int, cfg: FinetuneConfig,
              epochs: int) -> None:
    """Print the expected time per epoch from the first batches."""
    per_batch = seconds / batches
    train = per_batch * n_batches
    # An eval batch has no backward pass: about a third of a training step.
    val = per_batch / 3 * math.ceil(n_val / cfg.batch_size)
    epoch = train + val
    msg = (f"finetune: about {epoch:.0f} s per epoch ({train:.0f} s training, {val:.0f} s validation; "
           f"timed on the first {batches} batches), {epochs} epochs ~ {epochs * epoch / 60:.1f} min")
    fits = int(60 * cfg.max_minutes // max(epoch, 1e-9))
    if fits < epochs:
        msg += f"; finetune.max_minutes={cfg.max_minutes:g} allows about {fits}"
    log(msg)
