"""The one network runner: device errors, compile: auto weighed on measured speed, the compile cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline import runtime
from pipeline.errors import PipelineError
from pipeline.runtime import Runner, resolve_device


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
    assert many.mode == "compiled"
    captured = capsys.readouterr()
    out = captured.err + captured.out
    assert "staying eager" in out and "compiling" in out and "cold compile cache" in out
    # Asked once: later calls change nothing.
    few.consider_compiling(10**9, 1.0)
    assert few.mode == "eager"


def test_compile_cache_folder_is_used_and_reported_warm(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    folder = runtime.use_compile_cache(tmp_path / "inductor")
    assert folder == (tmp_path / "inductor").resolve() and folder.is_dir()
    assert not runtime.compile_cache_warm()
    (folder / "fxgraph" / "ab").mkdir(parents=True)
    (folder / "fxgraph" / "ab" / "entry").write_bytes(b"x")
    assert runtime.compile_cache_warm()
    # Another process's cache, named by its folder (the whole-process bench asks so).
    assert runtime.compile_cache_warm(folder) and not runtime.compile_cache_warm(tmp_path / "other")
