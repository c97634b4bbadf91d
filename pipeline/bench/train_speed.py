"""Fine-tuning's training speed against the machine's ceiling for the same network.

- the ceiling: forward + backward + AdamW step of the fine-tuning network on one
  batch already in memory, repeated (no decoding, no augmentation), in bf16
  autocast and in fp32, each with and without channels_last;
- the stage's code path: :func:`pipeline.finetune.train.fit` for one epoch on the
  folder's photos (decoding and augmentation included, channels_last inputs, the
  weights as loaded), at the precision the params resolve to, as the stage
  reports it (``train_images_per_second``).

The ratio says how much of the ceiling the stage reaches, and so how much a
faster data path could still give.

Example:
    python -m pipeline.bench train_speed --folder ../shared/data/dogbreeds10 --backbone efficientnet_lite0
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from pipeline.bench.common import add_photo_arguments, describe_cpu, describe_machine, folder_rows


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_photo_arguments(ap)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per ceiling (after 3 warm-up steps)")
    ap.add_argument("--unfreeze", default="last")
    ap.add_argument("--limit", type=int, default=96, help="photos the stage's path trains one epoch on")


def _ceiling(net_factory, x, y, steps: int, precision, channels_last: bool) -> float:
    import torch

    from pipeline.finetune.train import _optimizer

    net, groups, cfg = net_factory()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = _optimizer(groups, cfg)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()

    def step():
        with precision.autocast(torch.device("cpu")):
            loss = loss_fn(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(y) / (time.perf_counter() - t)


def run(a: argparse.Namespace) -> dict:
    import torch
    from torch import nn

    from pipeline.backbones import load_backbone
    from pipeline.config import FinetuneConfig
    from pipeline.finetune.network import FineTuneNet, unfreeze_modules
    from pipeline.finetune.train import fit
    from pipeline.runtime import Precision, place

    classes, rows = folder_rows(Path(a.folder))
    rows = rows[:: max(1, len(rows) // a.limit)][: a.limit]
    cfg = FinetuneConfig(epochs=1, batch_size=a.batch_size, unfreeze=a.unfreeze, val_fraction=0.0, device="cpu")
    where = place("cpu", "auto", section="finetune")

    def factory():
        bb = load_backbone(a.backbone, a.weights)
        net = FineTuneNet(bb.features, nn.Linear(bb.feature_dim, len(classes)))
        return net, unfreeze_modules(net, a.backbone, a.unfreeze), cfg

    bb = load_backbone(a.backbone, a.weights)
    size = bb.transform_spec.crop
    x = torch.randn(a.batch_size, 3, size, size)
    y = torch.randint(0, len(classes), (a.batch_size,))
    print(f"# training speed, {a.backbone} unfreeze {a.unfreeze}, batch {a.batch_size}, {size}px; "
          f"{describe_machine('cpu')}; {describe_cpu()}", flush=True)
    out = {}
    for name, prec in (("bf16", Precision("bf16", "bf16")), ("fp32", Precision("fp32", "fp32"))):
        for cl in (False, True):
            key = f"ceiling_{name}{'_channels_last' if cl else ''}"
            out[key] = _ceiling(factory, x, y, a.steps, prec, cl)
            print(f"  model only, {name}{', channels_last' if cl else ''}: {out[key]:.1f} images/s "
                  f"({out[key] / a.batch_size:.2f} steps/s)", flush=True)
    net, _, _ = factory()
    res = fit(net, backbone=a.backbone, root=a.folder, train_rows=rows, val_rows=[],
              transform_spec=bb.transform_spec, cfg=dataclasses.replace(cfg, precision="auto"),
              log=lambda s: None, placement=where)
    out["stage"] = res.train_images_per_second
    best = max(v for k, v in out.items() if k.startswith("ceiling_"))
    same = out[f"ceiling_{where.precision.name}_channels_last"]  # the stage's inputs are channels_last
    print(f"  the stage's path ({len(rows)} photos decoded and augmented, {where.precision.name}): "
          f"{out['stage']:.1f} images/s = {100 * out['stage'] / same:.0f}% of the same precision's channels_last "
          f"ceiling, {100 * out['stage'] / best:.0f}% of the best ceiling", flush=True)
    return out
