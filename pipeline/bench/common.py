"""What the benchmarks share: photo folders as rows, scratch copies of them, whole-process timing,
the machine line, the ``--folder/--backbone/--weights`` options, and scratch projects whose stages
run as subprocesses (their environment, params edits, the finetune stage's results).

Nothing here imports torch at module level, so ``python -m pipeline.bench repro`` stays light.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from pipeline.data.manifest import Row
from pipeline.machine import describe_cpu_line

#: The repository root: the code a scratch project or a subprocess runs.
ROOT = Path(__file__).resolve().parents[2]


def add_photo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every extraction benchmark takes: the photos and the backbone."""
    parser.add_argument("--folder", required=True, help="a <class>/<image> folder")
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--weights", default="DEFAULT")


def folder_rows(folder: Path, limit: int | None = None) -> tuple[list[str], list[Row]]:
    """The classes and manifest rows (all ``train``, hashed) of a ``<class>/<image>`` folder, in sorted order."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    rows = []
    for label, cls in enumerate(classes):
        for f in sorted((folder / cls).iterdir()):
            if f.is_file():
                rows.append(Row(f"{cls}/{f.name}", label, "train", hashlib.sha256(f.read_bytes()).hexdigest()))
    return classes, rows[:limit] if limit else rows


def rewrite_folder(src: Path, dest: Path, write: Callable[[Path, Path], int | None]) -> int:
    """Call ``write(file, folder)`` for every file under ``src``, ``folder`` its mirror under ``dest``.

    The folder exists when ``write`` is called; ``write`` returns how many files it wrote
    (``None``: one). Returns the total.
    """
    n = 0
    for f in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        out = dest / f.parent.relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        written = write(f, out)
        n += 1 if written is None else written
    return n


class ProcessFailed(RuntimeError):
    """A timed subprocess exited non-zero; the message holds the ends of its output."""


def timed_run(cmd: list, cwd: Path, env: dict) -> tuple[float, str, str]:
    """Run ``cmd`` as a whole process: its wall seconds (start to exit), stdout and stderr.

    Raises:
        ProcessFailed: it exited non-zero (the command, exit status and the last 3,000
            characters of each stream).
    """
    t = time.perf_counter()
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if res.returncode:
        raise ProcessFailed(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n"
                            f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return seconds, res.stdout, res.stderr


def describe_machine(device) -> str:
    """One line for a benchmark's header: device, torch threads, CPUs, torch version."""
    import torch  # here, so that the benchmarks that time only subprocesses never import it

    return (f"device {device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}")


def describe_cpu() -> str:
    """One line for a benchmark without torch: the CPU model, the vector extensions that matter, the cores,
    numpy's version."""
    import numpy as np

    return f"{describe_cpu_line()}, numpy {np.__version__}"


def stage_env() -> dict:
    """The environment of a stage run as a subprocess of a scratch project: this checkout's code, unbuffered."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                PYTHONUNBUFFERED="1")


def scratch_project(work: Path, **sections) -> dict:
    """An emptied ``work`` with this checkout's params.yaml, ``sections`` (section -> changes) applied."""
    import shutil

    import yaml

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, changes in sections.items():
        params[section].update(changes)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def set_finetune(work: Path, **finetune) -> None:
    """Change keys of the scratch project's ``finetune`` section."""
    import yaml

    params = yaml.safe_load((work / "params.yaml").read_text())
    params["finetune"].update(finetune)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def finetune_result(work: Path) -> dict:
    """The finetune stage's results in ``work``: its weights, per-epoch metrics (DVCLive) and metrics file."""
    from safetensors.torch import load_file

    doc = json.loads((work / "reports/finetune_metrics.json").read_text())
    epochs = {f"{f.parent.name}/{f.stem}": [float(x.split("\t")[1]) for x in f.read_text().splitlines()[1:]]
              for f in (work / "dvclive/plots/metrics").rglob("*.tsv") if "per_second" not in f.stem}
    return {"weights": load_file(str(work / "models/finetune/model.safetensors")), "epochs": epochs, **doc}
