"""Where and how a network runs: device, precision, memory format, compilation.

Every process that runs a network (extract with either engine, finetune,
predict, visualize, the benchmarks) resolves its device and precision once,
with :func:`place`, into one frozen :class:`Placement` that it passes down
(and states in one log line, :meth:`Placement.describe`); for inference it
wraps its module in one :class:`Runner`. So a change of policy (a new
precision, a new device kind) is made here, once.

Example:
    >>> where = place("auto", "auto", section="extract")          # doctest: +SKIP
    >>> runner = Runner(bb.features, where.device, where.precision)  # doctest: +SKIP
    >>> feats = runner(batch)                                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pipeline.config.checks import DEVICES, EXTRACT_PRECISIONS, PRECISIONS, check_precision  # noqa: F401 (re-exported)
from pipeline.errors import PipelineError

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
    try:
        flags = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


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


def compile_cache_warm(folder: str | os.PathLike | None = None) -> bool:
    """True when the compile cache (``folder``, default: this process's) holds compiled graphs from an earlier run."""
    folder = folder or os.environ.get("TORCHINDUCTOR_CACHE_DIR")
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
            int8 is always compiled (see :func:`quantize_int8`).
        label: prefix of the one-line messages (the stage's name).
        calibration: for int8 only, float batches of the shape the runner
            will be called with (see :func:`quantize_int8`).
    """

    def __init__(self, module: nn.Module, device: torch.device, precision: Precision | str = "fp32",
                 compile: bool | str = False, label: str = "extract", calibration: list | None = None):
        if isinstance(precision, str):
            precision = Precision(precision, precision)
        self.device, self.precision, self.label = device, precision, label
        self.eager = module.to(device).eval().to(memory_format=torch.channels_last)
        self.model, self.mode = self.eager, "eager"
        self._first = True
        self.prepare_seconds = 0.0  # quantizing, for int8: counted with the compile time
        if precision.name == "int8":
            # Never an eager fallback: its rows would be fp32 ones under the int8 key.
            self.undecided = False
            t = time.perf_counter()
            self.model, self.mode = torch.compile(quantize_int8(self.eager, calibration), dynamic=False), "int8"
            self.prepare_seconds = time.perf_counter() - t
            return
        self.undecided = compile == "auto" and device.type != "cuda"
        if compile is True or (compile == "auto" and device.type == "cuda"):
            self._compile()

    def _compile(self) -> None:
        try:
            self.model, self.mode = torch.compile(self.eager, dynamic=False), "compiled"
            self._first = True
        except Exception as e:  # noqa: BLE001 - any failure: run eager instead
            tqdm.write(f"{self.label}: torch.compile unavailable ({str(e).splitlines()[0][:120]}); running eager")

    @property
    def compiles_next(self) -> bool:
        """True when the next call compiles (its time is compile time, not compute time)."""
        return self._first and self.mode in ("compiled", "int8")

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
        if self.mode == "int8":
            return self._call_int8(x)
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

    def _call_int8(self, x: torch.Tensor) -> torch.Tensor:
        # Freezing lets Inductor fold the quantized weights into oneDNN's int8
        # convolutions; passing it as torch.compile's options instead leaves
        # onednn.qconv_prepack uncompiled, and the call fails. It is set on every
        # call, not only the first, since a caller's change of grad mode (say,
        # inference_mode) recompiles, and unfrozen the graph runs at half speed.
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            try:
                out = self.model(x)
            except Exception as e:  # any failure: named, with what to do instead
                if not self._first:
                    raise
                raise PipelineError(f"extract.precision: int8 could not be compiled "
                                    f"({str(e).splitlines()[0][:160]}); use bf16 or fp32") from e
            finally:
                self._first = False
        return out.float()


def quantize_int8(module: nn.Module, calibration: list) -> nn.Module:
    """``module`` quantized to int8 (x86 VNNI) with torchao's PT2E flow, calibrated on ``calibration``.

    Weights per channel and activations per tensor, as torchao's default x86
    Inductor recipe; the activations' ranges come from running the
    ``calibration`` batches (float, normalised, shaped as the later calls).
    The result runs fast only compiled: eager, it simulates int8 in float.

    Raises:
        PipelineError: torchao is missing, or no calibration batch was given.
    """
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as e:
        raise PipelineError("extract.precision: int8 needs torchao (pip install .[int8]); "
                            "or use auto, fp32 or bf16") from e
    if not calibration:
        raise PipelineError("extract.precision: int8 needs calibration photos, and none could be "
                            "decoded; use auto, fp32 or bf16")
    with torch.no_grad():
        # strict=True: after the non-strict export, prepare_pt2e fails on torchvision's
        # ResNets, which use one ReLU module at several places.
        graph = torch.export.export(module, (calibration[0],), strict=True).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        for x in calibration:
            prepared(x)
        return convert_pt2e(prepared)
