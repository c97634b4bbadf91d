"""The network phase shared by both engines: decoded batches in, feature rows out."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from pipeline.data.manifest import Row
from pipeline.data.transform import TransformSpec
from pipeline.extract.runner import Runner
from pipeline.runtime import INT8_CALIBRATION_IMAGES


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
    first_batch_seconds: float | None = None  # process start to the first computed batch (Linux)
    packages: list = field(default_factory=list)  # the compiled package files that computed the rows
    package_wanted: bool = False  # compile: auto stayed eager where a compiled package would serve later runs

    @property
    def images_per_second(self) -> float:
        """Throughput of the images computed in this run (decode + network)."""
        return self.n_computed / self.compute_seconds if self.compute_seconds > 0 else float("nan")


@dataclass
class Timing:
    seconds: float = 0.0
    compile_seconds: float = 0.0
    first_batch_age: float | None = None  # seconds from process start to the first batch's features


#: Eager batches timed before ``compile: auto`` decides (the first one warms up).
TIMED_BATCHES = 3


def run_batches(runner: Runner, spec: TransformSpec, batches, timing: Timing, n_total: int = 0):
    """Push decoded batches through ``runner``.

    Yields:
        ``(rows, features, reasons)`` per batch: ``features[i]`` belongs to
        ``rows[i]`` where ``reasons[i] is None``; the first compiled call's time
        is counted as compile time, not compute time.
    """
    first_compiled, done, t0 = True, 0, time.perf_counter()
    t_timed = None
    for k, (chunk, x, reasons) in enumerate(batches):
        x = spec.normalize_(x.to(runner.device, non_blocking=True))
        t_call = time.perf_counter()
        compiles = runner.compiles_next
        f = runner(x).cpu().numpy()
        if compiles and first_compiled:
            first_compiled = False
            timing.compile_seconds = time.perf_counter() - t_call
            t0 += time.perf_counter() - t_call
        done += len(chunk)
        timing.seconds = time.perf_counter() - t0
        if k == 0:
            t_timed, done_timed = time.perf_counter(), done
        elif k == TIMED_BATCHES and runner.undecided:
            per_item = (time.perf_counter() - t_timed) / max(1, done - done_timed)
            runner.consider_compiling(max(0, n_total - done), per_item)
        yield chunk, f[: len(chunk)], reasons


def good_rows(chunk: list[Row], reasons) -> tuple[list[int], list[tuple[Row, str]]]:
    """Indices of the usable rows of a batch, and ``(row, reason)`` of the others."""
    ok = [i for i, why in enumerate(reasons) if why is None]
    bad = [(chunk[i], why) for i, why in enumerate(reasons) if why is not None]
    return ok, bad


def calibration_rows(rows: list[Row], n: int = INT8_CALIBRATION_IMAGES) -> list[Row]:
    """The photos that calibrate int8: ``n`` distinct training photos, those of the lowest content hashes.

    The same manifest always gives the same photos, in any row order, and a
    pseudo-random mix of classes. Adding photos changes the choice only when
    a new training photo's hash sorts among the first ``n``.
    """
    train = {r.sha256: r for r in rows if r.split == "train"} or {r.sha256: r for r in rows}
    return [train[h] for h in sorted(train)[:n]]


def calibration_id(rows: list[Row]) -> str:
    """Names a calibration set in the store's key and the cache's attributes."""
    return hashlib.sha256("".join(r.sha256 for r in rows).encode()).hexdigest()[:16]


def calibration_batches(source, spec: TransformSpec, device: torch.device, batch_size: int) -> list[torch.Tensor]:
    """The decodable photos of ``source`` as full, normalised, channels_last batches.

    Every batch has ``batch_size`` rows, the shape of the later calls (the
    quantized graph is exported for it); photos are repeated to fill the last.
    """
    good = []
    for chunk, x, reasons in source:
        ok, _ = good_rows(chunk, reasons)
        if ok:
            good.append(spec.normalize_(x[ok].to(device)))
    if not good:
        return []
    xs = torch.cat(good)
    n = -(-len(xs) // batch_size) * batch_size
    xs = xs[torch.arange(n) % len(xs)].contiguous(memory_format=torch.channels_last)
    return list(xs.split(batch_size))
