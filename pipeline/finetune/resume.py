"""Checkpoints of a fine-tuning run, so that a killed run goes on where it stopped.

One file, ``<cache>/<key>/checkpoint.safetensors``: every tensor of the run's
state (the network, AdamW's moments, the EMA's weights, the best epoch's
weights) in safetensors, and the rest (position, counters, history, scheduler,
the optimiser's hyper-parameters) as JSON in its metadata. No pickle: a
checkpoint is read with the same safety as a model folder.

- **Where**: under ``data/cache/finetune/`` (not an output of the stage, which
  DVC deletes before running it), in a folder named by :func:`run_key`: a hash
  of everything that changes what is learned (the params without the runtime
  keys, the backbone, the precision, the training and validation photos, the
  warm start's weights). Other params or other data never find it; a file whose
  recorded key differs is ignored with a message, never loaded.
- **When**: after each epoch, and every ``finetune.checkpoint_every`` steps.
  Written by rank 0 alone, atomically and durably (temporary file, fsync,
  rename), so a kill at any moment leaves the previous checkpoint or the new
  one, never a torn one; a torn or unreadable file is ignored with a message.
- **Exactness**: a step's random draws (the augmentation of each photo, MixUp,
  stochastic depth) are seeded from the run's seed, the epoch, the photo or the
  step and the rank (:func:`pipeline.finetune.data.mix_seed`), never carried
  over from the step before. The position (epoch, step) is thus the whole of the
  random state, and a resumed run replays the very steps the killed one would
  have taken. The folder is removed once the model folder is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.data.manifest import Row
from pipeline.fileio import atomic_path

FILE = "checkpoint.safetensors"
#: Raised when what a checkpoint holds changes meaning: older files are then ignored, not misread.
CHECKPOINT_FORMAT = 1


def run_key(params: dict, *, backbone: dict, precision: str, train_rows: Sequence[Row], val_rows: Sequence[Row],
            start: dict[str, torch.Tensor]) -> str:
    """The sha256 naming a run: what it learns from, never where it runs.

    Args:
        params: the ``finetune`` section without its runtime keys (``learned_dict``).
        backbone: the backbone's provenance (name, weights and their sha256, transform).
        start: the network's state before the first step (the warm-start head included).
    """
    h = hashlib.sha256()
    h.update(json.dumps({"format": CHECKPOINT_FORMAT, "params": params, "backbone": backbone,
                         "precision": precision,
                         "train": [(r.path, r.sha256, r.label) for r in train_rows],
                         "val": [(r.path, r.sha256, r.label) for r in val_rows]},
                        sort_keys=True, default=list).encode())
    for name in sorted(start):
        h.update(name.encode())
        h.update(start[name].detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


class Checkpoints:
    """The checkpoint of one run (:func:`run_key`) under ``cache`` (``data/cache/finetune``)."""

    def __init__(self, cache, key: str, log: Callable[[str], None] = print):
        self.cache, self.key, self.log = Path(cache), key, log
        self.path = self.cache / key[:16] / FILE

    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        text = json.dumps({"key": self.key, "format": CHECKPOINT_FORMAT, **meta})
        with atomic_path(self.path, durable=True) as tmp:
            save_file(state, str(tmp), metadata={"run": text})

    def load(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The run's last checkpoint, or None (with a message when one was there but cannot be used)."""
        if not self.path.is_file():
            others = [p.parent.name for p in self.cache.glob(f"*/{FILE}")] if self.cache.is_dir() else []
            if others:
                self.log(f"finetune: no checkpoint of these params and photos; {len(others)} of other runs in "
                         f"{self.cache} left alone")
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = json.loads((f.metadata() or {})["run"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - any unreadable file is ignored, whatever the reader raised
            self.log(f"finetune: ignoring the unreadable checkpoint {self.path} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:120] if str(e) else 'torn'}); starting over")
            return None
        if meta.get("key") != self.key or meta.get("format") != CHECKPOINT_FORMAT:
            self.log(f"finetune: ignoring the checkpoint {self.path}: it was written for other params or photos; "
                     "starting over")
            return None
        return tensors, meta

    def clear(self) -> None:
        """Remove the run's folder: the model is written, nothing is left to resume."""
        shutil.rmtree(self.path.parent, ignore_errors=True)


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """``opt.state_dict()`` as tensors (``opt.<index>.<name>``) and JSON (the groups, non-tensor state)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{name}"] = v
            else:
                scalars.setdefault(str(idx), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
