"""Photos for fine-tuning: manifest :class:`~pipeline.data.manifest.Row` records to batches.

Every image is read through :func:`pipeline.data.images.decode_checked`, so a
file that changed since the prepare stage listed it is refused here as it is
everywhere else. A photo that cannot be used stops the stage with a one-line
error naming it: training on a silently shorter list would make runs differ.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.data.images import decode_checked
from pipeline.data.manifest import Row, stratified_holdout
from pipeline.errors import PipelineError


class RowImages(torch.utils.data.Dataset):
    """:class:`Row` records -> ``(tensor | None, label, path, reason)``.

    An item is an index, or ``(index, seed)``: the random transform then draws
    from a generator seeded by ``seed`` alone, so a photo's augmentation in an
    epoch is the same in whichever worker, process or resumed run decodes it.
    """

    def __init__(self, root, rows: Sequence[Row], transform: Callable):
        self.root, self.rows, self.transform = Path(root), list(rows), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        row = self.rows[i]
        if seed is None:
            x, why = decode_checked(self.root, row, self.transform)
        else:
            # torchvision's random transforms draw from torch's global generator: fork it.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x, why = decode_checked(self.root, row, self.transform)
        return x, row.label, row.path, why


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (the run's seed, an epoch, a photo or a step, a rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of photo ``index``'s augmentation in ``epoch`` (1 = the first): the same in every worker,
    in a resumed run, and in the cached view that stands for that epoch (:mod:`pipeline.finetune.cached`)."""
    return mix_seed(seed, epoch, index)


class GlobalBatches(torch.utils.data.Sampler):
    """One worker's share of each global batch of an epoch, from batch ``start`` on.

    The epoch's order is a permutation seeded by ``(seed, epoch)``, cut into
    global batches of ``batch_size``; worker ``rank`` of ``world_size`` takes
    positions ``rank, rank + world_size, ...`` of each. The union over the
    workers of a step is therefore the one-worker batch, whatever their number,
    and a resumed run starts at the very batch the interrupted one had reached.
    Items are ``(index, seed)`` with the photo's augmentation seed (:class:`RowImages`).
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world_size, self.start = rank, world_size, start

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.batch_size) - self.start)

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch)))
        for b in range(self.start, math.ceil(self.n / self.batch_size)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            yield [(i, augment_seed(self.seed, self.epoch, i)) for i in batch[self.rank::self.world_size]]


def train_loader(dataset: torch.utils.data.Dataset, sampler: GlobalBatches, workers: int = 0,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The training batches ``(x, y, bad)`` of one epoch (from its sampler's start), read in ``workers`` processes.

    ``dataset``: :class:`RowImages` (photos), or cached activations (:mod:`pipeline.finetune.cached`).
    """
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                       pin_memory=pin_memory)


def collate(items):
    """``(tensor | None, label, path, reason)`` items -> a batch ``(x, y, bad)``."""
    # A failed image travels to the main process as data: an exception raised in
    # a loader worker arrives wrapped in a multi-line traceback.
    bad = [(path, why) for x, _, path, why in items if x is None]
    if bad:
        return None, None, bad
    if not items:  # a worker's empty share of a last global batch smaller than the workers
        return None, torch.zeros(0, dtype=torch.int64), []
    return torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items]), []


def loader(root, rows: Sequence[Row], transform: Callable, batch_size: int, workers: int = 0,
           pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches ``(x, y, bad)`` in the rows' order: ``bad`` lists ``(path, reason)`` of unusable photos (then x is None)."""
    return batches_of(RowImages(root, rows, transform), batch_size, workers, pin_memory)


def batches_of(dataset: torch.utils.data.Dataset, batch_size: int, workers: int = 0,
               pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches ``(x, y, bad)`` of ``dataset``'s items in order."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                       persistent_workers=workers > 0, collate_fn=collate, pin_memory=pin_memory)


def check_batch(bad) -> None:
    """Raise on the first unusable photo of a batch."""
    if bad:
        path, why = bad[0]
        raise PipelineError(f"cannot use {path}: {why}; run dvc repro so that the prepare stage lists the photos again")


def decode_workers(setting, device: torch.device) -> int:
    """``finetune.decode_workers``: ``auto`` is none on the CPU, whose cores run the network; up to 8 beside a GPU."""
    if setting != "auto":
        return int(setting)
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


def split_validation(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """``(train, val)``: ``fraction`` of each class held out to pick the best epoch.

    A class keeps at least one image for training; ``fraction`` 0 gives no
    validation slice. The slice depends on the paths, not on their order.
    """
    rows = list(rows)
    val = stratified_holdout([r.path for r in rows], [r.label for r in rows], fraction, seed, min_holdout=0)
    return [r for r, v in zip(rows, val) if not v], [r for r, v in zip(rows, val) if v]
