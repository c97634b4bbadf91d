"""Shared fixtures: the sample photos and throw-away DVC projects; the rules on skips and markers.

The sample photos live outside the repository (``../shared/data`` beside the
project root, or ``$TL_SAMPLE_DATA``). Where they are absent, tests that need
them skip with a message saying so.

Skips CI can avoid (no sample photos, Ray or torchao not installed, no tmpfs
to mount) fail instead under ``TL_NO_SKIP=1``, set by ``.ci/run``, with the
same message (``TL_REQUIRE_SAMPLE_DATA=1`` does the same for the sample
photos alone). Only :func:`skip_unavoidable` (say, no GPU on the CI machine)
still skips there.

Markers follow from fixtures, and collection fails where one is missing
(:data:`MARKER_OF_FIXTURE`): a test that uses the sample photos carries
``sample_data``, and one that runs ``dvc repro`` in a :func:`project` carries
``slow``, so ``-m "not slow"`` and ``-m "not sample_data"`` leave out exactly those.
"""

from __future__ import annotations

import importlib
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

#: The fixture -> the marker every test using it must carry (directly, through
#: another fixture, or by naming it as a parameter for ``request.getfixturevalue``).
MARKER_OF_FIXTURE = {"catsdogs": "sample_data", "dogbreeds10": "sample_data", "project": "slow"}


def no_skip(env: str = "TL_NO_SKIP") -> str | None:
    """``TL_NO_SKIP`` (or the narrower ``env`` given) where set to 1: skips CI can avoid are failures."""
    return next((name for name in ("TL_NO_SKIP", env) if os.environ.get(name) == "1"), None)


def skip_or_fail(reason: str, *, env: str = "TL_NO_SKIP", allow_module_level: bool = False):
    """Skip for ``reason``, something CI can provide; under ``TL_NO_SKIP=1`` fail with the same message."""
    if forbidden_by := no_skip(env):
        pytest.fail(f"{reason}; {forbidden_by}=1 forbids skipping", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def import_or_skip(module: str, reason: str):
    """``pytest.importorskip`` that fails under ``TL_NO_SKIP=1``: CI installs every extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        skip_or_fail(f"{reason} ({e})", allow_module_level=True)


def skip_unavoidable(reason: str):
    """Skip for what no CI machine has (a GPU): the only skip ``TL_NO_SKIP=1`` keeps."""
    skipped = pytest.skip.Exception(reason)
    skipped.unavoidable = True  # an attribute, not a subclass: this file may be imported twice
    raise skipped


def _forbidden(report, excinfo=None) -> bool:
    if not (report.skipped and no_skip()) or hasattr(report, "wasxfail"):
        return False
    return not getattr(getattr(excinfo, "value", None), "unavoidable", False)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under TL_NO_SKIP=1 any other skip (a ``skipif``, a plain ``pytest.skip``) fails too."""
    report = (yield).get_result()
    if _forbidden(report, call.excinfo):
        report.outcome = "failed"
        report.longrepr = f"{_skip_reason(report)}; TL_NO_SKIP=1 forbids skipping"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """... and so does a whole module's skip (a module-level ``importorskip``)."""
    report = (yield).get_result()
    if _forbidden(report):
        report.outcome = "failed"
        report.longrepr = f"{_skip_reason(report)}; TL_NO_SKIP=1 forbids skipping"


def pytest_collection_modifyitems(config, items):
    """Fail collection where a test lacks the marker its fixtures imply (see MARKER_OF_FIXTURE)."""
    missing = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        used = set(getattr(item, "fixturenames", ())) | {v for v in params.values() if isinstance(v, str)}
        for fixture in sorted(used & MARKER_OF_FIXTURE.keys()):
            marker = MARKER_OF_FIXTURE[fixture]
            if item.get_closest_marker(marker) is None:
                test = item.nodeid.split("[")[0]  # one line for all of a test's parameters
                missing.append(f"  {test}: uses the {fixture!r} fixture, lacks @pytest.mark.{marker}")
    if missing:
        raise pytest.UsageError(
            "tests lack the markers their fixtures imply (-m 'not slow' or 'not sample_data' would run them); "
            "add the markers:\n" + "\n".join(dict.fromkeys(missing)))


def sample_folder(name: str) -> Path:
    """The sample folder ``name``, or skip (fail under TL_NO_SKIP=1 or TL_REQUIRE_SAMPLE_DATA=1).

    Reach it through the ``catsdogs``/``dogbreeds10`` fixtures, so that the
    marker check sees the use.
    """
    path = SAMPLE_DATA / name
    if not path.is_dir():
        skip_or_fail(f"sample photos not found at {path}: these tests need the sample data set "
                     "(set TL_SAMPLE_DATA to its folder)", env="TL_REQUIRE_SAMPLE_DATA")
    return path


# Session-scoped, so module-scoped fixtures can build on them (and the marker check sees them there).
@pytest.fixture(scope="session")
def catsdogs() -> Path:
    return sample_folder("catsdogs")


@pytest.fixture(scope="session")
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
    # The project's own DVC settings (analytics off, the offline plots page).
    shutil.copy2(ROOT / ".dvc" / "config", path / ".dvc" / "config")
    p.commit("pipeline")
    return p


# A project with trained model folders, made once per session (predict, model folders, export).
from helpers_models import pretrained, trained  # noqa: E402,F401
