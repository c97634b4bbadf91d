"""Photos for fine-tuning: manifest :class:`~pipeline.data.manifest.Row` records to batches.

Every image is read through :func:`pipeline.data.images.decode_checked`, so a
file that changed since the prepare stage listed it is refused here as it is
everywhere else. A photo that cannot be used stops the stage with a one-line
error naming it: training on a silently shorter list would make runs differ.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from pipeline.data.images import decode_checked
from pipeline.data.manifest import Row, stratified_holdout
from pipeline.errors import PipelineError


class RowImages(torch.utils.data.Dataset):
    """:class:`Row` records -> ``(tensor | None, label, path, reason)``."""

    def __init__(self, root, rows: Sequence[Row], transform: Callable):
        self.root, self.rows, self.transform = Path(root), list(rows), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        x, why = decode_checked(self.root, row, self.transform)
        return x, row.label, row.path, why


def _collate(items):
    # A failed image travels to the main process as data: an exception raised in
    # a loader worker arrives wrapped in a multi-line traceback.
    bad = [(path, why) for x, _, path, why in items if x is None]
    if bad:
        return None, None, bad
    return torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items]), []


def loader(root, rows: Sequence[Row], transform: Callable, batch_size: int, workers: int = 0,
           shuffle: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    """Batches ``(x, y, bad)``: ``bad`` lists ``(path, reason)`` of unusable photos (then x is None)."""
    return torch.utils.data.DataLoader(
        RowImages(root, rows, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=_collate,
    )


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
