"""Killing ``extract`` part-way (a real subprocess, a real signal) and resuming."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.sample_data, pytest.mark.faults]


def _store_rows(store) -> int:
    n = 0
    for shard in store.rglob("shard-*.h5"):
        with h5py.File(shard) as h5:
            n += len(h5["sha256"])
    return n


def _start_extract(project):
    return subprocess.Popen(
        [sys.executable, "-m", "stages.extract"], cwd=project.path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_rows(proc, store, at_least, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"extract finished before it could be interrupted: {proc.communicate()}")
        if store.is_dir() and _store_rows(store) >= at_least:
            return
        time.sleep(0.2)
    pytest.fail("extract made no progress")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_extract_resumes_without_recomputing_and_leaves_no_partial_file(project, catsdogs, sig):
    project.set_params(
        data={"source": "folder", "folder": str(catsdogs)},
        backbone={"name": "efficientnet_lite0", "weights": "DEFAULT"},
        extract={"flush_every": 16, "compile": False, "batch_size": 16},
        heads={"cv_folds": 3},
    )
    project.commit("params")
    project.dvc("repro", "prepare")
    store = project.path / "data/cache/features"
    out = project.path / "data/features/efficientnet_lite0.h5"

    proc = _start_extract(project)
    _wait_for_rows(proc, store, 48)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "error: interrupted" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a partial feature file was left where later stages read it"
    done = _store_rows(store)
    assert 48 <= done < 240 and done % 16 == 0

    # The rest of the pipeline runs on; extract computes only what was missing.
    res = project.dvc("repro", "evaluate")
    m = re.search(r"(\d+) computed", res.stdout)
    assert m and int(m.group(1)) == 240 - done, res.stdout
    assert not list(out.parent.glob(".*.tmp")) and not list(store.rglob(".*.tmp"))
    with h5py.File(out) as h5:
        assert h5["features"].shape == (240, 1280)
        assert np.isfinite(h5["features"][:]).all()
        assert len(set(h5["sha256"].asstr()[:])) == 240
    assert (project.path / "reports/metrics.json").is_file()
