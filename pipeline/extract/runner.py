"""The network of extraction in inference: eager, or as a compiled package, and int8 quantization.

:class:`Runner` wraps the backbone's feature network for both engines: on its
device, channels_last, eager or as an AOTInductor package from the cache of
:mod:`pipeline.compiled`; ``compile: auto`` weighs building one from the
measured speed. :func:`quantize_int8` is ``extract.precision: int8``. Where
and in what precision it runs is :mod:`pipeline.runtime`'s to say.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pipeline.compiled import PARITY, Packages, package_key, parity
from pipeline.errors import PipelineError
from pipeline.runtime import Precision

#: What ``compile: auto`` assumes on a CPU when it weighs compiling against
#: running eager: the share of network time a compiled package saves (measured
#: with efficientnet_lite0: bf16 136 -> 202 img/s, fp32 55 -> 105), and what
#: building one costs with an empty and with a warm Inductor cache. Loading a
#: package that exists costs nothing worth weighing (10 ms).
COMPILE_SAVES = 0.3
COMPILE_COST_S = {"cold": 40.0, "warm": 15.0}


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


class Runner:
    """A module in inference: on its device, channels_last, eager or as a compiled package.

    Compiling means an AOTInductor package from :mod:`pipeline.compiled`: built
    once per key, then loaded by every later run. A package found on disk is
    loaded and checked against the eager network on the first batch; one that
    disagrees is removed, and the runner goes on as if there were none. A
    failed export or compile runs eager with one line that says why.

    Args:
        module: the network (moved to ``device`` and put in eval mode).
        device: from :func:`resolve_device`.
        precision: a :class:`Precision`, or ``"fp32"``/``"bf16"``.
        compile: ``False``: eager, packages unused; ``True``: the package, built
            on the first call if missing; ``"auto"``: a package found is used; else
            compiled on CUDA, and on a CPU the runner starts eager and
            :meth:`consider_compiling` decides from the measured speed whether
            building one now shortens this run (if not, :attr:`wants_package`
            says a later run would profit). int8 always runs as a package.
        label: prefix of the one-line messages (the stage's name).
        calibration: for int8 only: float batches of the shape the runner will
            be called with, or a function returning them (called only when the
            package must be built; see :func:`quantize_int8`).
        packages: the package cache of this network (:func:`~pipeline.compiled.packages_for`);
            ``None``: a package is built in a temporary folder, for this runner only.
    """

    def __init__(self, module: nn.Module, device: torch.device, precision: Precision | str = "fp32",
                 compile: bool | str = False, label: str = "extract", calibration=None, packages=None):
        if isinstance(precision, str):
            precision = Precision(precision, precision)
        self.device, self.precision, self.label = device, precision, label
        self.eager = module.to(device).eval().to(memory_format=torch.channels_last)
        self.model, self.mode = self.eager, "eager"
        self.calibration, self.packages = calibration, packages
        self.prepare_seconds = 0.0  # building the package (quantizing too, for int8): counted as compile time
        self.build_next = self.verify_next = False
        self.undecided = self.wants_package = False
        self.loaded_from = None  # the package file this runner loaded or built
        self._package_shape = None  # (batch, channels, height, width) of the package's inputs
        self._quantized = None  # int8: the quantized graph, where a package was built from it
        self.int8 = precision.name == "int8"
        if compile is False and not self.int8:
            return
        if packages is not None and self._load():
            return
        # int8 never runs eager (its rows would be float ones under the int8 key), so it builds now.
        if self.int8 or compile is True or device.type == "cuda":
            self.build_next = True
        else:
            self.undecided = True

    def _load(self) -> bool:
        model = self.packages.load()
        if model is None:
            return False
        self.model, self.mode, self.verify_next = model, "packaged", True
        self.loaded_from = self.packages.path
        key = self.packages.key
        self._package_shape = (key["batch_size"], *key["input_shape"])
        tqdm.write(f"{self.label}: loaded the compiled package {self.packages.path}")
        return True

    @property
    def compiles_next(self) -> bool:
        """True when the next call builds the package (its time is compile time, not compute time)."""
        return self.build_next

    def consider_compiling(self, remaining: int, seconds_per_item: float) -> None:
        """``compile: auto`` on a CPU without a package: build one now if the time it saves exceeds what it costs.

        Called once, after the first eager batches are timed; the decision and
        its figures are printed. When building does not pay on this run,
        :attr:`wants_package` is set: the caller may build it for the next run.
        """
        if not self.undecided:
            return
        self.undecided = False
        cache = "warm" if compile_cache_warm() else "cold"
        saves, cost = remaining * seconds_per_item * COMPILE_SAVES, COMPILE_COST_S[cache]
        busy = self.packages is not None and self.packages.building_elsewhere()
        verdict = ("another process is building the package: staying eager" if busy
                   else "compiling" if saves > cost else "staying eager")
        tqdm.write(f"{self.label}: compile auto: {remaining} images left at {seconds_per_item * 1000:.0f} ms each; "
                   f"compiling would save ~{saves:.0f} s for ~{cost:.0f} s ({cache} compile cache): {verdict}")
        if busy:
            return
        if saves > cost:
            self.build_next = True
        else:
            self.wants_package = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run a batch already on the device; returns float32 outputs."""
        if self.build_next:
            self.build_next = False
            self._build(x)
        if self.mode != "packaged":
            return self._eager(x)
        n, shape = x.shape[0], self._package_shape
        if tuple(x.shape[1:]) != shape[1:] or n > shape[0]:
            return self._eager(x)
        if n < shape[0]:  # a package has one batch size: a short batch is padded
            x = torch.cat([x, x.new_zeros((shape[0] - n, *shape[1:]))]).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.model(x)
        if self.verify_next:
            self.verify_next = False
            out = self._verify(x, out)
        return out[:n].float()

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        """The network uncompiled (for int8 where no package could be built: the quantized graph, slow)."""
        if self.mode == "int8-eager":
            with torch.no_grad():
                return self.model(x).float()
        with torch.inference_mode(), self.precision.autocast(self.device):
            return self.eager(x).float()

    def _verify(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Compare the package's first batch with the eager network's on ``x`` (int8: the float network's).

        A loaded package that disagrees is removed, and the runner goes on as
        if there had been none (int8 builds a new one). One just built that
        disagrees computes wrongly on this machine (int8 without VNNI, say):
        it is removed too, and the runner runs uncompiled (for int8, the
        quantized graph: slow, but int8's features).
        """
        ref = self._eager(x)
        agree, least = parity(out, ref), PARITY[self.precision.name]
        if agree >= least:
            return out
        Path(self.loaded_from).unlink(missing_ok=True)
        if self.prepare_seconds:  # built by this runner: building again would give the same
            slow = "; running the quantized graph uncompiled (slow): bf16 or fp32 run faster" if self.int8 else \
                "; running eager"
            tqdm.write(f"{self.label}: the package just compiled disagrees with the eager network on this machine "
                       f"(lowest cosine {agree:.4f} < {least}); removed{slow}")
            if self.int8:
                self.model, self.mode = self._quantized, "int8-eager"
                return self._eager(x)
            self.model, self.mode = self.eager, "eager"
            return ref
        tqdm.write(f"{self.label}: the compiled package {self.loaded_from} disagrees with the eager network "
                   f"(lowest cosine {agree:.4f} < {least}); removed, it will be rebuilt")
        self.model, self.mode = self.eager, "eager"
        if self.int8:
            self.build_next = True
            return self(x)
        self.wants_package = True
        return ref

    def _build(self, x: torch.Tensor) -> None:
        """Build the package for inputs shaped as ``x`` (quantizing first, for int8), and load it."""
        t = time.perf_counter()
        module = self.eager
        if self.int8:
            calibration = self.calibration() if callable(self.calibration) else self.calibration
            module = quantize_int8(self.eager, calibration or [])
        packages, own = self.packages, None
        if packages is None:  # no cache: a package for this runner only
            own = tempfile.mkdtemp(prefix="package-")
            key = package_key({"backbone": "runner"}, self.precision.name, x.shape[0], x.shape[1:], self.device)
            packages = Packages(own, key, self.label)
        try:
            model = packages.build(module, x.contiguous(memory_format=torch.channels_last), self.precision.name)
        except Exception as e:  # noqa: BLE001 - any failure to export or compile: run eager, say why
            model = None
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            slow = " (the quantized graph uncompiled: slow)" if self.int8 else ""
            tqdm.write(f"{self.label}: could not compile the network ({why}); running eager{slow}")
        finally:
            if own is not None:
                shutil.rmtree(own, ignore_errors=True)
        self.prepare_seconds = time.perf_counter() - t
        if model is None:
            self.model, self.mode = (module, "int8-eager") if self.int8 else (self.eager, "eager")
            return
        self._quantized = module if self.int8 else None
        # Checked like a loaded one: compiled code can be wrong on a machine (int8 without VNNI).
        self.model, self.mode, self.loaded_from, self.verify_next = model, "packaged", packages.path, True
        self._package_shape = tuple(x.shape)


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
