"""Shared fixtures: the sample photos and throw-away DVC projects.

The sample photos live outside the repository (``../shared/data`` beside the
project root, or ``$TL_SAMPLE_DATA``). Where they are absent, tests that need
them skip with a message saying so; with ``TL_REQUIRE_SAMPLE_DATA=1`` (set by
``.ci/run``) such a skip becomes a failure, so CI always runs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = Path(os.environ.get("TL_SAMPLE_DATA", ROOT.parent / "shared" / "data"))


def sample_folder(name: str) -> Path:
    """The sample folder ``name``, or skip (fail under TL_REQUIRE_SAMPLE_DATA=1)."""
    path = SAMPLE_DATA / name
    if not path.is_dir():
        msg = (
            f"sample photos not found at {path}: these tests need the sample data set "
            "(set TL_SAMPLE_DATA to its folder)"
        )
        if os.environ.get("TL_REQUIRE_SAMPLE_DATA") == "1":
            pytest.fail(msg + "; TL_REQUIRE_SAMPLE_DATA=1 forbids skipping")
        pytest.skip(msg)
    return path


@pytest.fixture
def catsdogs() -> Path:
    return sample_folder("catsdogs")


@pytest.fixture
def dogbreeds10() -> Path:
    return sample_folder("dogbreeds10")


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


class Project:
    """A fresh git + DVC repository holding a copy of this project's pipeline."""

    @staticmethod
    def ran(out: str) -> set[str]:
        """The stages a ``dvc repro`` output says it ran."""
        return set(re.findall(r"Running stage '([^']+)'", out))

    def __init__(self, path: Path):
        self.path = path

    def run(self, *args, check=True, timeout=900) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.update(
            GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
            GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
            DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1",
        )
        res = subprocess.run(
            list(args), cwd=self.path, env=env, capture_output=True, text=True, timeout=timeout
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n"
                f"--- stderr\n{res.stderr[-4000:]}"
            )
        return res

    def dvc(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, **kw)

    def set_params(self, **sections) -> None:
        file = self.path / "params.yaml"
        params = yaml.safe_load(file.read_text())
        file.write_text(yaml.safe_dump(_deep_update(params, sections), sort_keys=False))

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "-m", message)


@pytest.fixture
def project(tmp_path) -> Project:
    """A temporary git repository with ``dvc init`` and the pipeline's code."""
    path = tmp_path / "project"
    path.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy2(ROOT / name, path / name)
    p = Project(path)
    p.run("git", "init", "-q", "-b", "main")
    p.dvc("init", "-q")
    p.dvc("config", "core.analytics", "false")
    p.commit("pipeline")
    return p
