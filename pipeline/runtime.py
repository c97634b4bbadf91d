"""Where and how a network runs: device, precision, memory format, compilation.

Every stage that runs a network (extract with either engine, finetune,
evaluate, predict, visualize) resolves its device and precision here and, for
inference, wraps its module in one :class:`Runner`. So a change of policy
(a new precision, a new device kind) is made once.

Example:
    >>> dev = resolve_device("auto", key="extract.device")          # doctest: +SKIP
    >>> runner = Runner(bb.features, dev, precision="fp32")         # doctest: +SKIP
    >>> feats = runner(batch)                                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from pipeline.errors import PipelineError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("auto", "fp32", "bf16")


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
    try:
        flags = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what autocast runs in, and why it was chosen."""

    name: str  # "fp32" | "bf16"
    reason: str

    def autocast(self, device: torch.device):
        """The autocast context for this precision on ``device`` (a no-op for fp32)."""
        if self.name == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_precision(setting: str, device: torch.device, key: str) -> Precision:
    """``auto``: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    if setting not in PRECISIONS:
        raise PipelineError(f"unknown {key} '{setting}'; accepted: {', '.join(PRECISIONS)}")
    if setting != "auto":
        return Precision(setting, f"{key}: {setting}")
    if device.type == "cuda":
        return Precision("bf16", "auto: CUDA device")
    if cpu_has_native_bf16():
        return Precision("bf16", "auto: the CPU has native bf16 (avx512_bf16/amx)")
    return Precision("fp32", "auto: the CPU has no native bf16")


class Runner:
    """A module in inference: on its device, channels_last, optionally compiled.

    ``torch.compile`` failures surface on the first call; the runner then falls
    back to eager once and says so, instead of failing the stage.

    Args:
        module: the network (moved to ``device`` and put in eval mode).
        device: from :func:`resolve_device`.
        precision: a :class:`Precision`, or ``"fp32"``/``"bf16"``.
        compile: wrap the module in ``torch.compile`` (static shapes).
        label: prefix of the one-line messages (the stage's name).
    """

    def __init__(self, module: nn.Module, device: torch.device, precision: Precision | str = "fp32",
                 compile: bool = False, label: str = "extract"):
        if isinstance(precision, str):
            precision = Precision(precision, precision)
        self.device, self.precision, self.label = device, precision, label
        self.eager = module.to(device).eval().to(memory_format=torch.channels_last)
        self.model, self.mode = self.eager, "eager"
        if compile:
            try:
                self.model, self.mode = torch.compile(self.eager, dynamic=False), "compiled"
            except Exception as e:  # noqa: BLE001 - any failure: run eager instead
                tqdm.write(f"{label}: torch.compile unavailable ({str(e).splitlines()[0][:120]}); running eager")
        self._first = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run a batch already on the device; returns float32 outputs."""
        with torch.inference_mode(), self.precision.autocast(self.device):
            try:
                out = self.model(x)
            except Exception as e:  # noqa: BLE001 - compile errors surface on the first call
                if not self._first or self.mode != "compiled":
                    raise
                tqdm.write(f"{self.label}: torch.compile failed ({str(e).splitlines()[0][:120]}); running eager")
                self.model, self.mode = self.eager, "eager"
                out = self.model(x)
            finally:
                self._first = False
        return out.float()
