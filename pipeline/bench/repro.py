"""What a new C costs: ``python -m pipeline.bench_repro --folder PHOTOS``.

A user's session, timed as whole ``dvc repro`` processes in a scratch git +
DVC project holding this pipeline:

1. the first full ``dvc repro`` on the photo folder (every stage, with the
   feature store empty);
2. ``heads.train.logreg.C`` edited, then a plain ``dvc repro``.

It prints which stages each run ran, their wall times, and the ratio: the
edit should cost a small share of the first run (only ``train_heads@logreg``
and ``evaluate@logreg`` re-run; ``prepare`` always re-scans the folder).

Example:
    python -m pipeline.bench_repro --folder ../shared/data/catsdogs --set visualize.steps=64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run(cwd: Path, *args: str) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    res = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


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
    t0 = time.perf_counter()
    out = _run(path, "dvc", "repro")
    return time.perf_counter() - t0, re.findall(r"Running stage '([^']+)'", out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, required=True, help="photos, one sub-folder per class")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more params.yaml settings for both runs (YAML values), e.g. visualize.steps=64")
    ap.add_argument("--C", type=float, default=0.5, help="the new heads.train.logreg.C")
    ap.add_argument("--keep", type=Path, help="build the project here and keep it (default: a temporary folder)")
    args = ap.parse_args(argv)
    overrides = {"data.source": "folder", "data.folder": str(args.folder.resolve()),
                 "backbone.name": args.backbone, "backbone.weights": "DEFAULT", "extract.store": ""}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)

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
        print(json.dumps({"first_seconds": round(first, 1), "edit_seconds": round(edit, 1),
                          "ratio": round(edit / first, 4), "ran_first": ran_first, "ran_edit": ran_edit}))


if __name__ == "__main__":
    main()
