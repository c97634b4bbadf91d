"""The network phase shared by both engines: decoded batches in, feature rows out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.data.manifest import Row
from pipeline.data.transform import TransformSpec
from pipeline.runtime import Runner

#: Below this many new images, ``compile: auto`` stays eager on a CPU, where
#: compilation costs more than it saves.
COMPILE_MIN_IMAGES_CPU = 1000


def want_compile(setting, device: torch.device, n_images: int) -> bool:
    """``extract.compile``: ``auto`` compiles on CUDA, or on a CPU from :data:`COMPILE_MIN_IMAGES_CPU` images."""
    if setting == "auto":
        return device.type == "cuda" or n_images >= COMPILE_MIN_IMAGES_CPU
    return bool(setting)


@dataclass
class ExtractResult:
    n_images: int  # rows in the output file
    n_computed: int  # images pushed through the network in this run
    n_reused: int  # rows taken from the per-image store
    n_skipped: int
    seconds: float  # whole call
    compute_seconds: float  # decoding + network, excluding compile
    compile_seconds: float
    skipped: list = field(default_factory=list)  # [{"path", "reason"}]
    computed: list = field(default_factory=list)  # paths computed in this run
    mode: str = "eager"

    @property
    def images_per_second(self) -> float:
        """Throughput of the images computed in this run (decode + network)."""
        return self.n_computed / self.compute_seconds if self.compute_seconds > 0 else float("nan")


@dataclass
class Timing:
    seconds: float = 0.0
    compile_seconds: float = 0.0


def run_batches(runner: Runner, spec: TransformSpec, batches, timing: Timing):
    """Push decoded batches through ``runner``.

    Yields:
        ``(rows, features, reasons)`` per batch: ``features[i]`` belongs to
        ``rows[i]`` where ``reasons[i] is None``; the first compiled call's time
        is counted as compile time, not compute time.
    """
    first = True
    t0 = time.perf_counter()
    for chunk, x, reasons in batches:
        x = spec.normalize_(x.to(runner.device, non_blocking=True))
        t_call = time.perf_counter()
        f = runner(x).cpu().numpy()
        if first and runner.mode == "compiled":
            timing.compile_seconds = time.perf_counter() - t_call
            t0 += timing.compile_seconds
        first = False
        timing.seconds = time.perf_counter() - t0
        yield chunk, f[: len(chunk)], reasons


def good_rows(chunk: list[Row], feats: np.ndarray, reasons) -> tuple[list[int], list[tuple[Row, str]]]:
    """Indices of the usable rows of a batch, and ``(row, reason)`` of the others."""
    ok = [i for i, why in enumerate(reasons) if why is None]
    bad = [(chunk[i], why) for i, why in enumerate(reasons) if why is not None]
    return ok, bad
