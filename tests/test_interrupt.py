"""Killing ``extract`` part-way (a real subprocess, a real signal) and resuming.

The signal comes at a known point, however fast the machine: one photo of the
folder is swapped for a FIFO after ``prepare`` listed it, so extract computes
and stores the rows before it, then waits on reading it. The test sends the
signal once those rows are on disk, then puts the photo back.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from pipeline.data.manifest import read_prepared

pytestmark = [pytest.mark.slow, pytest.mark.sample_data, pytest.mark.faults]

BATCH = 16  # extract.batch_size and extract.flush_every: a shard per batch
GATE = 4 * BATCH  # the manifest row read through the FIFO: the first of the fifth batch


def _store_rows(store) -> int:
    n = 0
    for shard in store.rglob("shard-*.h5"):
        with h5py.File(shard) as h5:
            n += len(h5["sha256"])
    return n


def _default_sigint() -> None:
    # A suite started in the background by a non-interactive shell inherits SIGINT ignored,
    # and Python then keeps it ignored: the stage must meet Ctrl-C as a user's terminal sends it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_extract(project):
    return subprocess.Popen(
        [sys.executable, "-m", "stages.extract"], cwd=project.path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )


def _wait_for_rows(proc, store, n, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"extract finished before it reached the FIFO: {proc.communicate()}")
        if store.is_dir() and _store_rows(store) >= n:
            return
        time.sleep(0.2)
    pytest.fail(f"extract stored fewer than {n} rows in {timeout} s")


def _open_gate(fifo, proc, timeout=60) -> None:
    """Let the read waiting on ``fifo`` return (nothing: that row is skipped), so the process can exit.

    An interrupted extract closes its decoder, which waits for the reads in flight.
    """
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader has it open yet
                raise
            time.sleep(0.05)
            continue
        os.close(fd)
        return


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=lambda s: s.name)
def test_interrupted_extract_resumes_without_recomputing_and_leaves_no_partial_file(
        project, catsdogs, tmp_path, sig):
    photos = tmp_path / "photos"  # links to the sample photos: the one to block on is swapped here
    for cls in ("cat", "dog"):
        (photos / cls).mkdir(parents=True)
        for f in sorted((catsdogs / cls).iterdir()):
            (photos / cls / f.name).symlink_to(f)
    project.set_params(
        data={"source": "folder", "folder": str(photos)},
        backbone={"name": "efficientnet_lite0", "weights": "DEFAULT"},
        extract={"flush_every": BATCH, "compile": False, "batch_size": BATCH},
        heads={"cv_folds": 3},
    )
    project.commit("params")
    project.dvc("repro", "prepare")
    store = project.path / "data/cache/features"
    out = project.path / "data/features/efficientnet_lite0.h5"

    rows = read_prepared(project.path / "data/prepared").rows  # extract's order
    assert len(rows) == 240
    gate = photos / rows[GATE].path
    photo = gate.readlink()
    gate.unlink()
    os.mkfifo(gate)

    proc = _start_extract(project)
    try:
        _wait_for_rows(proc, store, GATE)
        proc.send_signal(sig)
        if sig == signal.SIGINT:
            _open_gate(gate, proc)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "error: interrupted" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a partial feature file was left where later stages read it"
    done = _store_rows(store)
    assert done == GATE, f"{done} rows stored; the {GATE} before the FIFO were expected"

    # The photo is back as prepare listed it. The rest of the pipeline runs on;
    # extract computes only what was missing.
    gate.unlink()
    gate.symlink_to(photo)
    res = project.dvc("repro", "evaluate")
    m = re.search(r"(\d+) computed", res.stdout)
    assert m and int(m.group(1)) == 240 - done, res.stdout
    assert not list(out.parent.glob(".*.tmp")) and not list(store.rglob(".*.tmp"))
    with h5py.File(out) as h5:
        assert h5["features"].shape == (240, 1280)
        assert np.isfinite(h5["features"][:]).all()
        assert len(set(h5["sha256"].asstr()[:])) == 240
    assert (project.path / "reports/metrics_logreg.json").is_file()
