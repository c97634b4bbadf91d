"""The compiled-model cache: a network compiled ahead of time once, loaded in a blink by every run after.

A package is one AOTInductor ``.pt2`` file (``torch.export``, then
AOTInductor with Inductor's weight freezing): the network's compiled code and
its weights. It is keyed by everything that makes compiled code valid or its
outputs right (:func:`package_key`): the backbone's provenance (name,
weights and their sha256, preprocessing), the precision and, for int8, the
calibration photos, the batch size and input shape, the torch version and the
machine (CPU model and vector extensions, or GPU model and CUDA version).

The key's digest names the file, and the key itself is stored in the
package's metadata and compared on load: a package of another key, or one
that cannot be read, is rebuilt with a one-line message, never trusted. The
:class:`~pipeline.extract.runner.Runner` also checks a loaded package against the
eager network on its first batch (:data:`PARITY`).

Packages are written under a lock, through a temporary file renamed into
place: two processes building one key make one file, and a killed build
leaves no torn one. Every process that shares the folder (a second run, the
Ray actors of one machine) loads the same file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pipeline.fileio import atomic_path, file_lock, file_stem, remove_stale_temporaries
from pipeline.machine import cpu_model_and_flags

#: Bumped when what a package holds, or how it is built, changes: older files are then rebuilt.
FORMAT = 1

#: The lowest per-photo cosine similarity between a package's features and the
#: eager network's on one batch, by precision: far above what a wrong package
#: gives (another network's weights, or int8 kernels that saturate: 0.64), below
#: what rounding alone moves. bf16 packages fold the weights in bf16 (freezing):
#: 0.9945 against bf16 eager on one batch of real photos, whose own distance to
#: fp32 is 0.997. int8 is compared with the float network (its package is what
#: spares quantizing again): 0.962 on the samples.
PARITY = {"fp32": 0.9999, "bf16": 0.99, "int8": 0.93}

#: The key fields that ``python -m pipeline compile`` and a log line name first when two keys differ.
_NAMED = ("torch", "machine", "backbone", "weights", "weights_sha256", "precision", "calibration", "batch_size",
          "input_shape", "format")


def machine_identity(device: torch.device) -> str:
    """What compiled code is specific to: the GPU model and CUDA version, or the CPU model and its extensions."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    model, flags = cpu_model_and_flags()
    return f"cpu: {model} ({' '.join(flags) or 'no AVX2'})"


def package_key(provenance: dict, precision: str, batch_size: int, input_shape, device: torch.device,
                calibration: str = "") -> dict:
    """The fields a package is valid for (see the module's docstring)."""
    return {
        "format": FORMAT,
        **provenance,
        "precision": precision,
        "calibration": calibration,
        "batch_size": int(batch_size),
        "input_shape": [int(s) for s in input_shape],
        "torch": torch.__version__,
        "machine": machine_identity(device),
    }


class _Cast(nn.Module):
    """The network as exported: inputs in, float32 features out, under the precision's autocast.

    Autocast inside ``forward`` is captured by ``torch.export``; entered around
    the export instead, it is dropped and the package computes in fp32.
    """

    def __init__(self, module: nn.Module, precision: str, device_type: str):
        super().__init__()
        self.module, self.bf16, self.device_type = module, precision == "bf16", device_type

    def forward(self, x):
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(x).float()


class Packages:
    """The compiled package of one key in ``folder``: load it, or build it.

    Args:
        folder: where packages live (``data/cache/compiled``).
        key: from :func:`package_key`.
        label: prefix of the one-line messages (the stage's name).
    """

    def __init__(self, folder: str | os.PathLike, key: dict, label: str = "extract", device_index: int = -1):
        self.folder, self.key, self.label = Path(folder), key, label
        self.device_index = device_index  # the CUDA device a package is loaded onto (-1: the current one)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        name = file_stem(str(key.get("backbone", "net")).replace("/", "-"))
        self.path = self.folder / f"{name}-{key['precision']}-b{key['batch_size']}-{digest}.pt2"
        self.built = False  # whether this object compiled the package (not found it built by another process)

    def load(self, quiet: bool = False):
        """The package, loaded; ``None`` when there is none, or it is unreadable or of another key (said in one line)."""
        if not self.path.is_file():
            return None
        try:
            model = torch._inductor.aoti_load_package(str(self.path), device_index=self.device_index)
            found = json.loads(model.get_metadata().get("pipeline_key", "null"))
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: any failure means rebuild
            if not quiet:
                tqdm.write(f"{self.label}: ignoring the unreadable compiled package {self.path} "
                           f"({str(e).splitlines()[0][:120]}); it will be rebuilt")
            return None
        if found != self.key:
            if not quiet:
                tqdm.write(f"{self.label}: the compiled package {self.path} was built for "
                           f"{_difference(found, self.key)}; it will be rebuilt")
            return None
        return model

    def build(self, module: nn.Module, example: torch.Tensor, precision: str):
        """Export and compile ``module`` for inputs shaped as ``example``, write the package, load it.

        Under the folder's lock for this key: a process that waited for it
        while another built the package loads that one instead.

        ``module`` is the float network, or for int8 the quantized graph.
        """
        with self._lock(wait=True):
            model = self.load(quiet=True)
            if model is not None:
                return model
            remove_stale_temporaries(self.folder, f".{self.path.name}.")
            with torch.no_grad():
                program = torch.export.export(_Cast(module, precision, example.device.type), (example,))
                buffer = io.BytesIO()
                torch._inductor.aoti_compile_and_package(
                    program, package_path=buffer,
                    # Freezing folds the weights into the compiled kernels (oneDNN's prepacked
                    # layouts on a CPU): 1.2x (bf16) to 1.9x (fp32) over not freezing here.
                    inductor_configs={"freezing": True,
                                      "aot_inductor.metadata": {"pipeline_key": json.dumps(self.key)}},
                )
            with atomic_path(self.path, durable=True) as tmp:
                tmp.write_bytes(buffer.getvalue())
                tmp.chmod(0o644)  # readable by every process that shares the folder, as the caches beside it
            self.built = True
        return self.load()

    def _lock(self, wait: bool):
        return file_lock(self.path.with_suffix(".lock"), wait)

    def building_elsewhere(self) -> bool:
        """True while another process holds this key's lock (builds its package)."""
        if not self.path.with_suffix(".lock").exists():
            return False
        with self._lock(wait=False) as locked:
            return not locked


def _difference(found, want: dict) -> str:
    """The first telling field in which ``found`` differs from ``want``, in words."""
    if not isinstance(found, dict):
        return "no key of this project"
    for field in _NAMED + tuple(sorted(set(found) | set(want))):
        if found.get(field) != want.get(field):
            return f"{field} {found.get(field)!r} (now {want.get(field)!r})"
    return "another key"


def parity(package_out: torch.Tensor, eager_out: torch.Tensor) -> float:
    """The lowest per-row cosine similarity between two batches of features."""
    a, b = package_out.float().flatten(1), eager_out.float().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).min())


def packages_for(folder: str | os.PathLike, backbone, device: torch.device, precision: str, batch_size: int,
                 calibration: str = "", label: str = "extract") -> Packages:
    """The package cache of ``backbone``'s feature network, as the extract stage runs it."""
    crop = backbone.transform_spec.crop
    key = package_key(backbone.provenance(), precision, batch_size, (3, crop, crop), device, calibration)
    index = device.index if device.type == "cuda" and device.index is not None else -1
    return Packages(folder, key, label, index)
