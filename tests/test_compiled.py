"""The compiled-model cache: one package per key, built once, loaded after, never trusted blindly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from helpers_dvc import sample_slice
from torch import nn

from pipeline.compiled import Packages, package_key
from pipeline.extract.runner import Runner

CPU = torch.device("cpu")
SHAPE = (4, 3, 32, 32)


def _net(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def _key(**changes) -> dict:
    key = package_key({"backbone": "tiny", "weights": "seed0"}, "fp32", SHAPE[0], SHAPE[1:], CPU)
    return {**key, **changes}


def _x(n: int = SHAPE[0], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *SHAPE[1:]), generator=g).contiguous(memory_format=torch.channels_last)


def _eager(net, x):
    with torch.no_grad():
        return net(x)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One package of the tiny network, built by a runner's first call (the tests below copy it)."""
    folder = tmp_path_factory.mktemp("packages")
    first = Runner(_net(), CPU, "fp32", compile=True, packages=Packages(folder, _key()))
    compiles = first.compiles_next and first.mode == "eager"
    out = first(_x())
    return dict(runner=first, out=out, compiled_on_first_call=compiles, folder=folder)


def _copy(built, folder, key) -> Packages:
    """``built``'s package file under the name of ``key`` in ``folder``."""
    packages = Packages(folder, key)
    packages.path.write_bytes(built["runner"].loaded_from.read_bytes())
    return packages


def test_built_once_then_loaded_and_equal_to_eager(built, capsys):
    net, x, first = _net(), _x(), built["runner"]
    assert built["compiled_on_first_call"]
    assert first.mode == "packaged" and first.prepare_seconds > 0
    assert torch.allclose(built["out"], _eager(net, x), atol=1e-5)
    assert [p.name for p in built["folder"].glob("*.pt2")] == [first.loaded_from.name]

    # A later run: loaded before its first batch, nothing built, the same outputs bit for bit.
    later = Runner(_net(), CPU, "fp32", compile="auto", packages=Packages(built["folder"], _key()))
    assert later.mode == "packaged" and not later.compiles_next and not later.undecided
    assert torch.equal(later(x), built["out"])
    assert later.prepare_seconds == 0
    assert "loaded the compiled package" in capsys.readouterr().out
    # A short last batch is padded to the package's batch size, and cut back.
    short = x[:3]
    assert torch.allclose(later(short), _eager(net, short), atol=1e-5) and later(short).shape[0] == 3
    # compile: false never looks at packages.
    assert Runner(_net(), CPU, "fp32", compile=False, packages=Packages(built["folder"], _key())).mode == "eager"


def test_foreign_or_torn_package_is_ignored_and_rebuilt(built, tmp_path, capsys):
    x = _x()
    other = _copy(built, tmp_path, _key(torch="0.0"))  # as after a torch upgrade: built for another key
    assert other.load() is None
    assert "was built for torch" in capsys.readouterr().out

    runner = Runner(_net(), CPU, "fp32", compile=True, packages=Packages(tmp_path, _key(torch="0.0")))
    assert runner.mode == "eager" and runner.compiles_next
    runner(x)
    assert runner.mode == "packaged"
    found = torch._inductor.aoti_load_package(str(other.path)).get_metadata()["pipeline_key"]
    assert json.loads(found)["torch"] == "0.0"  # rebuilt for its own key

    data = other.path.read_bytes()
    other.path.write_bytes(data[: len(data) // 2])  # torn, as by a crash mid-copy
    torn = Runner(_net(), CPU, "fp32", compile="auto", packages=Packages(tmp_path, _key(torch="0.0")))
    assert torn.mode == "eager" and torn.undecided  # ignored: as if there were none
    assert "ignoring the unreadable compiled package" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*.tmp"))


def test_package_that_disagrees_with_the_eager_network_is_removed(built, tmp_path, capsys):
    x = _x()
    packages = _copy(built, tmp_path, _key())
    # Same key, other weights: what a key that misses a field would let through.
    changed = _net(seed=5)
    runner = Runner(changed, CPU, "fp32", compile="auto", packages=Packages(tmp_path, _key()))
    assert runner.mode == "packaged"
    out = runner(x)
    assert torch.equal(out, _eager(changed, x))  # the eager network's features, never the package's
    assert runner.mode == "eager" and runner.wants_package
    assert not packages.path.exists()
    assert "disagrees with the eager network" in capsys.readouterr().out


_BUILD = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_compiled import _key, _net, _x
    from pipeline.compiled import Packages
    p = Packages({folder!r}, _key())
    model = p.build(_net(), _x(), "fp32")
    print(json.dumps({{"built": p.built, "out": model(_x()).tolist()}}))
""")


def test_two_processes_building_one_key_make_one_package(tmp_path):
    code = _BUILD.format(tests=str(__import__("pathlib").Path(__file__).parent), folder=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["built"] for r in results) == [False, True]  # the second waited, then loaded the first's
    assert results[0]["out"] == results[1]["out"]
    assert len(list(tmp_path.glob("*.pt2"))) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.mark.sample_data
def test_stage_builds_its_package_in_the_background_and_the_next_run_loads_it(tmp_path, catsdogs, monkeypatch,
                                                                              capsys):
    """compile: auto stays eager on a run where compiling does not pay, builds the package after it in a
    detached process, and the next run (compile: auto) runs compiled from its first batch, with the eager
    network's features. ``python -m pipeline compile`` then finds the package ready."""
    from pipeline.config import BackboneConfig, ExtractConfig
    from pipeline.data.sources import prepare
    from pipeline.extract import stage
    from pipeline.extract.cache import open_cache

    photos = sample_slice(catsdogs, tmp_path / "photos", per_class=10)
    project = tmp_path / "project"
    project.mkdir()
    prepare(source="folder", folder=photos, out_dir=project / "data" / "prepared")
    monkeypatch.chdir(project)
    monkeypatch.setattr(stage, "BACKGROUND_MIN_IMAGES", 16)  # the rule at a test's size (1,000 in use)
    backbone = BackboneConfig(name="efficientnet_lite0")
    extract = ExtractConfig(precision="fp32", batch_size=8, compile="auto", store="")
    eager = stage.run_extract(backbone=backbone, extract=extract, out_dir="out-eager")
    assert eager.mode == "eager" and eager.package_wanted and eager.packages == []
    assert "building the compiled package for the next run in the background" in capsys.readouterr().out

    compiled = project / "data" / "cache" / "compiled"
    log = compiled / "background.log"
    deadline = time.monotonic() + 600
    while "compile: built" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(1)
    assert "compile: built" in log.read_text(), log.read_text()[-2000:]
    [package] = compiled.glob("*.pt2")

    packaged = stage.run_extract(backbone=backbone, extract=extract, out_dir="out-packaged")
    assert packaged.mode == "packaged" and packaged.packages == [str(package.resolve())]
    assert packaged.compile_seconds == 0 and not packaged.package_wanted
    a = open_cache("out-packaged/efficientnet_lite0.h5").features
    b = open_cache("out-eager/efficientnet_lite0.h5").features
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert a.shape == (20, 1280) and cos.min() > 0.9999, cos.min()

    options = ["--backbone", "efficientnet_lite0", "--precision", "fp32", "--batch-size", "8"]
    cmd = [sys.executable, "-m", "pipeline", "compile", "--params", "", *options]
    again = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "is ready: loaded and checked" in again.stdout, again.stderr[-2000:]


class _Unlike(nn.Module):
    """A network whose exported graph computes something else than its eager self, as compiled
    code that is wrong on a machine would."""

    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x):
        out = self.net(x)
        return -out if torch.compiler.is_compiling() else out


def test_package_just_built_that_disagrees_is_removed_and_the_run_stays_eager(tmp_path, capsys):
    x = _x()
    runner = Runner(_Unlike().eval(), CPU, "fp32", compile=True, packages=Packages(tmp_path, _key()))
    out = runner(x)
    assert torch.equal(out, _eager(runner.eager, x))  # never the package's features
    assert runner.mode == "eager" and not runner.wants_package  # building again would give the same
    assert not list(tmp_path.glob("*.pt2"))
    assert "the package just compiled disagrees with the eager network" in capsys.readouterr().out
    assert torch.equal(runner(x), out)  # and it stays eager
