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
import os
from dataclasses import dataclass
from pathlib import Path

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


#: What ``compile: auto`` assumes on a CPU when it weighs compiling against
#: running eager: the share of network time compilation saves (measured: 1.3x
#: to 1.9x faster compiled, so at least ~23%), and what compiling costs with an
#: empty and with a warm compile cache (measured: 15-80 s cold, 3-8 s warm on 2 cores).
COMPILE_SAVES = 0.23
COMPILE_COST_S = {"cold": 60.0, "warm": 8.0}


def use_compile_cache(folder: str | os.PathLike) -> Path:
    """Keep torch.compile's artifacts (Inductor's FX graph and autotuning caches) in ``folder``.

    Inductor's own default is a folder under /tmp, lost on reboot and shared by
    every project; under ``data/cache/`` the second run on a machine loads the
    compiled network instead of compiling it again. An explicit
    ``TORCHINDUCTOR_CACHE_DIR`` in the environment wins.
    """
    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(folder).resolve())))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def compile_cache_warm() -> bool:
    """True when the compile cache holds compiled graphs from an earlier run."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return bool(folder) and any((Path(folder) / "fxgraph").rglob("*"))


def process_age() -> float | None:
    """Seconds since this process started (Linux; ``None`` elsewhere): start-up as a user meets it."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class Runner:
    """A module in inference: on its device, channels_last, optionally compiled.

    ``torch.compile`` failures surface on the first call; the runner then falls
    back to eager once and says so, instead of failing the stage.

    Args:
        module: the network (moved to ``device`` and put in eval mode).
        device: from :func:`resolve_device`.
        precision: a :class:`Precision`, or ``"fp32"``/``"bf16"``.
        compile: ``True``/``False``, or ``"auto"``: compiled on CUDA; on a CPU
            the runner starts eager and :meth:`consider_compiling` decides from
            the measured speed whether compiling shortens the whole run.
        label: prefix of the one-line messages (the stage's name).
    """

    def __init__(self, module: nn.Module, device: torch.device, precision: Precision | str = "fp32",
                 compile: bool | str = False, label: str = "extract"):
        if isinstance(precision, str):
            precision = Precision(precision, precision)
        self.device, self.precision, self.label = device, precision, label
        self.eager = module.to(device).eval().to(memory_format=torch.channels_last)
        self.model, self.mode = self.eager, "eager"
        self.undecided = compile == "auto" and device.type != "cuda"
        if compile is True or (compile == "auto" and device.type == "cuda"):
            self._compile()
        self._first = True

    def _compile(self) -> None:
        try:
            self.model, self.mode = torch.compile(self.eager, dynamic=False), "compiled"
            self._first = True
        except Exception as e:  # noqa: BLE001 - any failure: run eager instead
            tqdm.write(f"{self.label}: torch.compile unavailable ({str(e).splitlines()[0][:120]}); running eager")

    def consider_compiling(self, remaining: int, seconds_per_item: float) -> None:
        """``compile: auto`` on a CPU: compile if the time it saves exceeds what it costs.

        Called once, after the first eager batches are timed; the decision and
        its figures are printed.
        """
        if not self.undecided:
            return
        self.undecided = False
        cache = "warm" if compile_cache_warm() else "cold"
        saves, cost = remaining * seconds_per_item * COMPILE_SAVES, COMPILE_COST_S[cache]
        verdict = "compiling" if saves > cost else "staying eager"
        tqdm.write(f"{self.label}: compile auto: {remaining} images left at {seconds_per_item * 1000:.0f} ms each; "
                   f"compiling would save ~{saves:.0f} s for ~{cost:.0f} s ({cache} compile cache): {verdict}")
        if saves > cost:
            self._compile()

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
