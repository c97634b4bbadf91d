"""Where a network runs: device and precision.

Every process that runs a network (extract with either engine, finetune,
predict, visualize, the benchmarks) resolves its device and precision once,
with :func:`place`, into one frozen :class:`Placement` that it passes down
(and states in one log line, :meth:`Placement.describe`); extraction then
wraps its network in one :class:`~pipeline.extract.runner.Runner`. So a change
of policy (a new precision, a new device kind) is made here, once.

Example:
    >>> where = place("auto", "auto", section="extract")          # doctest: +SKIP
    >>> runner = Runner(bb.features, where.device, where.precision)  # doctest: +SKIP
    >>> feats = runner(batch)                                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from pipeline.config.checks import DEVICES, EXTRACT_PRECISIONS, PRECISIONS, check_precision  # noqa: F401 (re-exported)
from pipeline.errors import PipelineError
from pipeline.machine import cpu_model_and_flags

#: Photos that calibrate int8 (they fix each activation's quantization range).
INT8_CALIBRATION_IMAGES = 64


def resolve_device(setting: str, key: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error.

    Args:
        setting: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        key: the params key (or option) that gave ``setting``, named in errors.
    """
    setting = str(setting)
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting not in ("cpu", "cuda") and not (setting.startswith("cuda:") and setting[5:].isdigit()):
        raise PipelineError(f"unknown {key} '{setting}'; accepted: {', '.join(DEVICES)}")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"{key} is '{setting}' but no CUDA device is available; use auto or cpu")
    return torch.device(setting)


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512_BF16 or AMX)."""
    return any(f in cpu_model_and_flags()[1] for f in ("avx512_bf16", "amx_bf16"))


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what autocast runs in, and why it was chosen."""

    name: str  # "fp32" | "bf16" | "int8"
    reason: str

    def autocast(self, device: torch.device):
        """The autocast context for this precision on ``device`` (a no-op for fp32 and int8,
        whose quantized graph carries its own types)."""
        if self.name == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_precision(setting: str, device: torch.device, key: str, accepted: tuple = PRECISIONS) -> Precision:
    """``auto``: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere; never int8.

    Args:
        accepted: :data:`EXTRACT_PRECISIONS` where int8 is allowed (inference only).
    """
    check_precision(setting, key, accepted)
    if setting == "int8" and device.type != "cpu":
        raise PipelineError(f"{key}: int8 runs on a CPU only (x86 int8 kernels through Inductor), "
                            f"the device is {device}; use auto or bf16 on a GPU, or set extract.device: cpu")
    if setting != "auto":
        return Precision(setting, f"{key}: {setting}")
    if device.type == "cuda":
        return Precision("bf16", "auto: CUDA device")
    if cpu_has_native_bf16():
        return Precision("bf16", "auto: the CPU has native bf16 (avx512_bf16/amx)")
    return Precision("fp32", "auto: the CPU has no native bf16")


@dataclass(frozen=True)
class Placement:
    """Where one process runs its networks, resolved once by :func:`place` and passed down.

    Attributes:
        device: the torch device.
        precision: what the forward passes run in, with the reason of an automatic choice.
        threads: the CPU threads torch uses (intra-op).
    """

    device: torch.device = torch.device("cpu")
    precision: Precision = Precision("fp32", "fp32: the library default")
    threads: int = 0

    def autocast(self):
        """The autocast context of the forward passes (a no-op for fp32 and int8)."""
        return self.precision.autocast(self.device)

    def describe(self) -> str:
        """One line for the stage's log: what runs where, and why."""
        threads = f", {self.threads} CPU threads" if self.device.type == "cpu" and self.threads else ""
        return f"{self.device}, {self.precision.name} ({self.precision.reason}){threads}"


def place(device="auto", precision="auto", *, section: str, accepted: tuple = PRECISIONS) -> Placement:
    """Resolve ``<section>.device`` and ``<section>.precision`` into a :class:`Placement`.

    The one place a device and a precision are resolved. A :class:`Placement`
    given as ``device`` is returned as it is, so a library function can take
    either the settings or the caller's resolved value; a ``torch.device`` is
    taken as it is (the devices of Ray's actors, not this process's).

    Args:
        section: the params section (``extract``, ``finetune``, ``visualize``)
            or the command (``predict``, ``bench``) the settings came from, named in errors.
        accepted: :data:`EXTRACT_PRECISIONS` where int8 is allowed (inference only).
    """
    if isinstance(device, Placement):
        return device
    # A params section names its keys (extract.device); a command its options (predict --device).
    params = section in ("extract", "finetune", "visualize")
    key = (lambda name: f"{section}.{name}") if params else (lambda name: f"{section} --{name}")
    # A torch.device names where the work runs elsewhere (Ray's GPU actors), taken as it is.
    dev = device if isinstance(device, torch.device) else resolve_device(device, key("device"))
    prec = resolve_precision(precision, dev, key("precision"), accepted)
    return Placement(dev, prec, torch.get_num_threads())


def process_age() -> float | None:
    """Seconds since this process started (Linux; ``None`` elsewhere): start-up as a user meets it."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
