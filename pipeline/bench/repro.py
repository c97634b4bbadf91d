"""What a new C costs: ``python -m pipeline.bench repro --folder PHOTOS``.

A user's session, timed as whole ``dvc repro`` processes in a scratch git +
DVC project holding this pipeline:

1. the first full ``dvc repro`` on the photo folder (every stage, with the
   feature store empty);
2. ``heads.train.logreg.C`` edited, then a plain ``dvc repro``.

It prints which stages each run ran, their wall times, and the ratio: the
edit should cost a small share of the first run (only ``train_heads@logreg``
and ``evaluate@logreg`` re-run; ``prepare`` always re-scans the folder).

Example:
    python -m pipeline.bench repro --folder ../shared/data/catsdogs --set visualize.steps=64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from pipeline.bench.common import ROOT, ProcessFailed, timed_run
from pipeline.config import read_yaml


def _timed(cwd: Path, *args: str) -> tuple[float, str]:
    """Wall seconds and stdout of ``args`` run in ``cwd``, with analytics off and a git identity."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    seconds, stdout, _ = timed_run(list(args), cwd, env)
    return seconds, stdout


def _run(cwd: Path, *args: str) -> str:
    return _timed(cwd, *args)[1]


def _set(params: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = params
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def scratch_project(path: Path, overrides: dict) -> None:
    """A git + DVC repository at ``path`` with this pipeline's code and ``overrides`` in params.yaml."""
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy2(ROOT / name, path / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in overrides.items():
        _set(params, key, value)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(path, "git", "init", "-q", "-b", "main")
    _run(path, "dvc", "init", "-q")
    _commit(path, "pipeline")


def _commit(path: Path, message: str) -> None:
    _run(path, "git", "add", "-A")
    _run(path, "git", "commit", "-q", "-m", message)


def timed_repro(path: Path) -> tuple[float, list[str]]:
    """Wall seconds of a plain ``dvc repro``, and the stages it ran, in order."""
    seconds, out = _timed(path, "dvc", "repro")
    return seconds, re.findall(r"Running stage '([^']+)'", out)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--folder", type=Path, required=True, help="photos, one sub-folder per class")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more params.yaml settings for both runs (YAML values), e.g. visualize.steps=64")
    ap.add_argument("--C", type=float, default=0.5, help="the new heads.train.logreg.C")
    ap.add_argument("--keep", type=Path, help="build the project here and keep it (default: a temporary folder)")


def run(args: argparse.Namespace) -> dict:
    """The two runs; a failed ``git`` or ``dvc`` command ends it with its output's last lines."""
    try:
        return _session(args)
    except ProcessFailed as e:
        raise SystemExit(str(e)) from None


def _session(args: argparse.Namespace) -> dict:
    overrides = {"data.source": "folder", "data.folder": str(args.folder.resolve()),
                 "backbone.name": args.backbone, "backbone.weights": "DEFAULT", "extract.store": ""}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = read_yaml(value)

    with tempfile.TemporaryDirectory(prefix="bench_repro_") as tmp:
        path = args.keep or Path(tmp) / "project"
        path.mkdir(parents=True, exist_ok=True)
        scratch_project(path, overrides)
        first, ran_first = timed_repro(path)
        print(f"first dvc repro: {first:.1f} s, ran {', '.join(ran_first)}", flush=True)
        _commit(path, "first run")
        params = yaml.safe_load((path / "params.yaml").read_text())
        _set(params, "heads.train.logreg.C", [args.C])
        (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        edit, ran_edit = timed_repro(path)
        print(f"after heads.train.logreg.C: [{args.C}]: {edit:.1f} s, ran {', '.join(ran_edit)}")
        print(f"ratio: {edit / first:.1%} of the first run")
        result = {"first_seconds": round(first, 1), "edit_seconds": round(edit, 1),
                  "ratio": round(edit / first, 4), "ran_first": ran_first, "ran_edit": ran_edit}
        print(json.dumps(result))
    return result
