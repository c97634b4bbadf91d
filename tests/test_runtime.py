"""The one network runner: device errors, compile: auto weighed on measured speed, the compile cache."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from pipeline.extract import runner as extract_runner
from pipeline.errors import PipelineError
from pipeline.extract.runner import Runner
from pipeline.runtime import resolve_device


@pytest.fixture(autouse=True)
def environment_as_found():
    """Every test here leaves os.environ exactly as it found it (the code under test sets variables itself)."""
    before = _environment()
    yield
    changed = _changes(before)
    for k, (was, _) in changed.items():  # never leak into later tests, even when failing here
        if was is None:
            del os.environ[k]
        else:
            os.environ[k] = was
    assert not changed, f"os.environ left changed (before, after): {changed}"


def _environment() -> dict:
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)  # pytest's own, changes from setup to teardown
    return env


def _changes(before: dict) -> dict:
    """The variables that differ from ``before``: name -> (before, now), None for absent."""
    now = _environment()
    return {k: (before.get(k), now.get(k)) for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_device_errors_name_the_key():
    with pytest.raises(PipelineError, match="unknown finetune.device 'gpu'; accepted: auto, cpu, cuda, cuda:N"):
        resolve_device("gpu", "finetune.device")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="predict --device is 'cuda' but no CUDA device"):
            resolve_device("cuda", "predict --device")


def test_compile_auto_compiles_only_when_it_saves_more_than_it_costs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cpu = torch.device("cpu")
    few = Runner(_net(), cpu, "fp32", compile="auto")
    assert few.mode == "eager" and few.undecided
    # 100 images at 10 ms: ~0.2 s saved against a 60 s cold compile.
    few.consider_compiling(100, 0.010)
    assert few.mode == "eager" and not few.undecided
    many = Runner(_net(), cpu, "fp32", compile="auto")
    # 100,000 images at 20 ms: ~460 s saved.
    many.consider_compiling(100_000, 0.020)
    assert many.compiles_next and few.wants_package and not many.wants_package
    many(torch.randn(2, 3, 16, 16))  # built on the first call, in a folder of its own
    assert many.mode == "packaged"
    captured = capsys.readouterr()
    out = captured.err + captured.out
    assert "staying eager" in out and "compiling" in out and "cold compile cache" in out
    # Asked once: later calls change nothing.
    few.consider_compiling(10**9, 1.0)
    assert few.mode == "eager"


@pytest.mark.parametrize("users", [False, True], ids=["unset", "set-by-the-user"])
def test_compile_cache_folder_is_used_and_reported_warm(tmp_path, users):
    before = _environment()
    user_folder = tmp_path / "users-inductor"
    with pytest.MonkeyPatch.context() as mp:
        # use_compile_cache sets the variable in os.environ itself. setenv first records
        # the variable as it was, so the undo restores it, absent or not (a delenv of an
        # absent variable records nothing, and the value set below would leak).
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(user_folder))
        if not users:
            mp.delenv("TORCHINDUCTOR_CACHE_DIR")
        folder = extract_runner.use_compile_cache(tmp_path / "inductor")
        # The project's folder, unless the user named one: theirs wins.
        assert folder == (user_folder if users else (tmp_path / "inductor").resolve()) and folder.is_dir()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)  # where torch.compile looks
        assert not extract_runner.compile_cache_warm()
        (folder / "fxgraph" / "ab").mkdir(parents=True)
        (folder / "fxgraph" / "ab" / "entry").write_bytes(b"x")
        assert extract_runner.compile_cache_warm()
        # Another process's cache, named by its folder (the whole-process bench asks so).
        assert extract_runner.compile_cache_warm(folder) and not extract_runner.compile_cache_warm(tmp_path / "other")
    assert _changes(before) == {}  # restored exactly, whatever it held before
