"""Fine-tuning over cached activations: ``finetune.cached_views: K``.

With ``unfreeze: none`` or ``last``, everything below the part that trains is
frozen and in eval mode: it computes the same tensor from the same input in
every epoch, and it is most of the network's work. So the stage computes once,
into one HDF5 file, the activations entering the part that trains (the last
stage's input, or the pooled features for ``none``) for ``K`` augmented views of
each training photo and for the validation photos; the epochs then run only the
part that trains, over those tensors, with no photo decoded.

- **The same inputs as full fine-tuning.** View ``k`` of a photo is the very
  augmentation that epoch ``k + 1`` of full fine-tuning draws for it (seeded by
  the run's seed, the epoch and the photo, :class:`~pipeline.finetune.data.GlobalBatches`).
  The first ``K`` epochs therefore see what full fine-tuning sees, and epoch
  ``e > K`` reuses view ``(e - 1) mod K``. MixUp and CutMix, which mix pixels in
  full fine-tuning, mix these activations instead (manifold mixup).
- **The file** is ``data/cache/finetune/views/<key>.h5``, the key a hash of all
  that fixes its tensors: the backbone's provenance, the precision, where the
  network is cut, the preprocessing and augmentation, the seed, ``K``, and the
  training and validation photos with their sha256. Learning rates, epochs,
  the method or the schedule are not in it: editing them reuses the file. It
  is written under a lock, through a temporary file renamed when complete, so
  concurrent runs build it once and a killed build leaves nothing a run reads.
- **Skipping the frozen part.** While training, the modules registered before
  the cut, on the path from the network to it, pass their input through
  unchanged (their ``forward`` is replaced on the instance, so their weights
  stay in the state dict and in every checkpoint), and the cached tensor is
  the network's input. That holds where the forward runs them as one chain
  into the cut (ResNet, VGG, EfficientNet, MobileNet, ConvNeXt); it is checked
  on real photos before anything is cached, and a backbone where it does not
  hold is refused in one line.

Example:
    >>> views = cached_views(net, backbone=bb, root=prepared.root, train_rows=tr, val_rows=va,
    ...                      cfg=cfg.finetune, placement=where, cache_dir="data/cache/finetune")  # doctest: +SKIP
    >>> fit(net, ..., views=views)                                                              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.backbones.stages import last_stage_path
from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_path, file_lock, remove_stale_temporaries
from pipeline.finetune.data import RowImages, augment_seed, check_batch, collate, decode_workers
from pipeline.runtime import Placement

#: Raised when what a views file holds changes meaning: older files are then rebuilt, never misread.
VIEWS_FORMAT = 1
FOLDER = "views"
#: Photos per forward pass while caching (no backward pass: larger batches than training's).
BATCH = 32


def cut_path(net: nn.Module, backbone: str, unfreeze: str) -> tuple[str, ...]:
    """Names from the fine-tuning network to the first module that trains: the head, or the last stage."""
    if unfreeze == "none":
        return ("head",)
    if unfreeze == "last":
        return ("features", *last_stage_path(backbone, net.features))
    raise ValueError(f"no cut for finetune.unfreeze '{unfreeze}' (FinetuneConfig refuses it with cached_views)")


class _Reached(Exception):
    """Raised by the hook at the cut: the rest of the network is not needed."""


def _pass_through(x, *args, **kwargs):
    return x


class Split:
    """``net`` cut before the module at ``path``: the activations entering it, and the network from there on."""

    def __init__(self, net: nn.Module, path: Sequence[str]):
        self.net, self.path = net, tuple(path)
        self.entry = net.get_submodule(".".join(self.path))
        self.lower: list[nn.Module] = []
        node = net
        for name in self.path:
            for n, child in node.named_children():
                if n == name:
                    break
                self.lower.append(child)
            node = getattr(node, name)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """What enters the cut when ``net`` reads ``x`` (the rest of the network is not run)."""
        seen: list = []

        def hook(module, args):
            seen.append(args[0] if args else None)
            raise _Reached

        handle = self.entry.register_forward_pre_hook(hook)
        try:
            self.net(x)
        except _Reached:
            pass
        finally:
            handle.remove()
        if len(seen) != 1 or not isinstance(seen[0], torch.Tensor):
            raise PipelineError(f"finetune.cached_views: the network never passes a tensor to {'.'.join(self.path)}, "
                                "where it would be cut; set finetune.cached_views: 0")
        return seen[0]

    @contextlib.contextmanager
    def skipping_lower(self):
        """Inside: ``net(a)`` for activations ``a`` computes what ``net(x)`` does for the photos they came from."""
        for m in self.lower:
            m.forward = _pass_through
        try:
            yield
        finally:
            for m in self.lower:
                del m.forward


def check_split(split: Split, x: torch.Tensor, backbone: str) -> None:
    """Refuse a backbone whose network from the cut does not reproduce the whole network on ``x`` (fp32, eval)."""
    was_training = split.net.training
    split.net.eval()
    why = ""
    try:
        with torch.no_grad():
            whole = split.net(x).float()
            a = split.activations(x)
            with split.skipping_lower():
                top = split.net(a).float()
        gap = float((top - whole).abs().max())
        if gap > 1e-4 * float(whole.abs().max()) + 1e-5:
            why = f"the network from there differs from the whole one by {gap:.3g}"
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the chained forward means: not one chain
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        split.net.train(was_training)
    if why:
        raise PipelineError(f"finetune.cached_views: backbone '{backbone}' does not run the layers below "
                            f"{'.'.join(split.path)} as one chain into it ({why}); set finetune.cached_views: 0")


@dataclass(frozen=True)
class Views:
    """A complete views file: what :func:`pipeline.finetune.train.fit` reads instead of photos."""

    path: str
    k: int
    cut: tuple[str, ...]
    shape: tuple[int, ...]  # one activation's
    n_val: int

    def train(self, epoch: int) -> "ViewSet":
        """The training activations epoch ``epoch`` (1 = the first) reads: view ``(epoch - 1) mod K``."""
        return ViewSet(self.path, "train", (epoch - 1) % self.k)

    def val(self) -> "ViewSet":
        return ViewSet(self.path, "val", None)


class ViewSet(torch.utils.data.Dataset):
    """One view of the training photos, or the validation photos, as ``(tensor, label, path, None)`` items.

    An item is an index, or ``(index, seed)`` from :class:`GlobalBatches` (the
    seed drew the view when it was cached). The file opens in the process that
    reads it (a loader's worker has its own handle).
    """

    def __init__(self, path: str, split: str, view: int | None):
        self.path, self.split, self.view = path, split, view
        self._file = None
        with h5py.File(path, "r") as f:
            self.labels = f[f"{split}_labels"][:]
            self.bf16 = f.attrs["dtype"] == "bfloat16"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item):
        i = item[0] if isinstance(item, tuple) else item
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        ds = self._file[self.split]
        a = torch.from_numpy(ds[self.view, i] if self.view is not None else ds[i])
        return (a.view(torch.bfloat16) if self.bf16 else a), int(self.labels[i]), f"{self.split}[{i}]", None


def views_key(*, backbone: dict, precision: str, cut: Sequence[str], transform: dict, augment: dict, seed: int,
              k: int, train_rows: Sequence[Row], val_rows: Sequence[Row]) -> str:
    """The sha256 naming a views file: everything that fixes its tensors, nothing that only trains on them."""
    return hashlib.sha256(json.dumps(
        {"format": VIEWS_FORMAT, "backbone": backbone, "precision": precision, "cut": list(cut),
         "transform": transform, "augment": augment, "seed": seed, "k": k,
         "train": [(r.path, r.sha256, r.label) for r in train_rows],
         "val": [(r.path, r.sha256, r.label) for r in val_rows]},
        sort_keys=True, default=list).encode()).hexdigest()


def _open(path: Path, key: str, log: Callable[[str], None]) -> dict | None:
    """The file's description when it is whole and of ``key``; None (said in one line) otherwise."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs["key"] != key:
                log(f"finetune: ignoring {path}: written for other photos or settings; it will be rebuilt")
                return None
            return _describe(f)
    except Exception as e:  # noqa: BLE001 - torn or foreign: rebuild
        log(f"finetune: ignoring the unreadable cached views {path} ({str(e).splitlines()[0][:120]}); "
            "they will be rebuilt")
        return None


def _describe(f: h5py.File) -> dict:
    return {"shape": tuple(int(s) for s in f["train"].shape[2:]), "n_val": int(f["val"].shape[0])}


def cached_views(net: nn.Module, *, backbone, root, train_rows: Sequence[Row], val_rows: Sequence[Row], cfg,
                 placement: Placement, cache_dir, log: Callable[[str], None] = print) -> Views:
    """The views file of this run: found, or computed now (``cfg``: the ``finetune`` section).

    ``net`` is the fine-tuning network before any step; ``backbone`` its
    :class:`~pipeline.backbones.Backbone` (name, provenance, preprocessing).
    """
    k, aug, spec = cfg.cached_views, cfg.augment, backbone.transform_spec
    cut = cut_path(net, backbone.name, cfg.unfreeze)
    split = Split(net, cut)
    provenance = {key: v for key, v in backbone.provenance().items()
                  if key in ("backbone", "weights", "weights_sha256", "transform")}
    key = views_key(backbone=provenance, precision=placement.precision.name, cut=cut, transform=spec.to_dict(),
                    augment=aug.learned_dict(), seed=cfg.seed, k=k, train_rows=train_rows, val_rows=val_rows)
    folder = Path(cache_dir) / FOLDER
    path = folder / f"{backbone.name.replace('/', '-')}-{key[:24]}.h5"
    with file_lock(path.with_suffix(".lock")):
        found = _open(path, key, log)
        if found is None:
            remove_stale_temporaries(folder, f".{path.name}.")
            found = _build(path, key, split, root, train_rows, val_rows, cfg, placement, backbone, log)
        else:
            log(f"finetune: reusing the cached activations of {k} view{'s' if k > 1 else ''} of "
                f"{len(train_rows)} train and {len(val_rows)} validation photos ({path})")
    return Views(str(path), k, cut, found["shape"], found["n_val"])


def _build(path: Path, key: str, split: Split, root, train_rows, val_rows, cfg, placement: Placement, backbone,
           log) -> dict:
    dev, precision, spec, aug, k = placement.device, placement.precision, backbone.transform_spec, cfg.augment, \
        cfg.cached_views
    split.net.to(dev).eval()  # the frozen layers, as full fine-tuning runs them
    workers = decode_workers(cfg.decode_workers, dev)
    augmented = spec.augment(aug.crop_scale, aug.policy, aug.erasing)
    first = next(iter(_batches(root, (val_rows or train_rows)[:2], spec.build(), cfg.seed, None, 2, 0)))
    check_batch(first[2])
    check_split(split, first[0].to(dev), backbone.name)
    t0 = time.perf_counter()
    log(f"finetune: caching the activations entering {'.'.join(split.path)}: {k} augmented view"
        f"{'s' if k > 1 else ''} of {len(train_rows)} train photos and {len(val_rows)} validation photos "
        f"-> {path}")
    with atomic_path(path, suffix=".h5", durable=True) as tmp, h5py.File(tmp, "w") as f, \
            tqdm(total=k * len(train_rows) + len(val_rows), unit="img", desc="finetune views",
                 dynamic_ncols=True) as bar:
        f.attrs["key"] = key
        jobs = [(view, "train", train_rows, augmented) for view in range(k)] + [(None, "val", val_rows, spec.build())]
        for view, name, rows, transform in jobs:
            if f"{name}_labels" not in f:
                f.create_dataset(f"{name}_labels", data=np.array([r.label for r in rows], np.int64))
            start = 0
            for x, _, bad in _batches(root, rows, transform, cfg.seed, view, BATCH, workers):
                check_batch(bad)
                x = x.to(dev)
                if view is not None:  # as fit() feeds training photos on every device
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), precision.autocast(dev):
                    a = split.activations(x).contiguous()
                a = a.cpu()
                stored = a.view(torch.int16).numpy() if a.dtype == torch.bfloat16 else a.float().numpy()
                if "train" not in f:
                    f.attrs["dtype"] = "bfloat16" if a.dtype == torch.bfloat16 else "float32"
                    shape = stored.shape[1:]
                    f.create_dataset("train", (k, len(train_rows), *shape), stored.dtype, chunks=(1, 1, *shape))
                    f.create_dataset("val", (len(val_rows), *shape), stored.dtype,  # none: finetune.val_fraction 0
                                     chunks=(1, *shape) if val_rows else None)
                if view is None:
                    f[name][start:start + len(stored)] = stored
                else:
                    f[name][view, start:start + len(stored)] = stored
                start += len(stored)
                bar.update(len(stored))
        found = _describe(f)
    log(f"finetune: cached {k * len(train_rows) + len(val_rows)} activations of shape {found['shape']} "
        f"in {time.perf_counter() - t0:.0f} s ({path.stat().st_size / 2**20:.0f} MiB)")
    return found


def _batches(root, rows: Sequence[Row], transform, seed: int, view: int | None, batch_size: int, workers: int):
    """``(x, y, bad)`` batches of ``rows`` in order; view ``v`` draws each photo's augmentation as epoch v + 1."""
    items = [(i, augment_seed(seed, view + 1, i)) if view is not None else i for i in range(len(rows))]
    order = [items[j:j + batch_size] for j in range(0, len(items), batch_size)]
    return torch.utils.data.DataLoader(RowImages(root, rows, transform), batch_sampler=order, num_workers=workers,
                                       collate_fn=collate)
