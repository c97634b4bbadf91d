"""Disk full and read-only output folders: one clear line naming the path.

These tests mount small tmpfs file systems, which needs root (CI runs as root);
elsewhere they skip and say why (and fail under TL_NO_SKIP=1, as .ci/run sets).
"""

from __future__ import annotations

import hashlib
import subprocess

import numpy as np
import pytest
from conftest import skip_or_fail
from PIL import Image

from pipeline.backbones import load_backbone
from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.extract.local import extract_features
from pipeline.fileio import write_json

pytestmark = pytest.mark.faults


@pytest.fixture
def mount(tmp_path):
    mounted = []

    def _mount(name, options):
        target = tmp_path / name
        target.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        if res.returncode != 0:
            skip_or_fail(f"cannot mount a tmpfs here (needs root): {res.stderr.decode().strip()}")
        mounted.append(target)
        return target

    yield _mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(0)
    for i in range(4):
        path = root / "a" / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        rows.append(Row(f"a/{i}.png", 0, "train", hashlib.sha256(path.read_bytes()).hexdigest()))
    return root, rows


def test_disk_full_is_one_line_naming_the_path_and_leaves_nothing(mount, images):
    root, rows = images
    full = mount("full", "size=48k")
    bb = load_backbone("resnet50", "none")  # 2048-d rows: 4 of them fill 48 KiB with HDF5 overhead
    out = full / "features" / "resnet50.h5"
    with pytest.raises(PipelineError) as e:
        extract_features(bb, root=root, rows=rows * 1, classes=["a"], out_path=out, store_dir=full / "store",
                         flush_every=1)
    msg = str(e.value)
    assert "no space left on device" in msg and str(full) in msg and "\n" not in msg, msg
    assert not out.exists()
    assert not list(full.rglob("*.tmp"))


def test_read_only_folder_is_one_line_naming_the_path(mount):
    ro = mount("ro", "ro,size=64k")
    with pytest.raises(PipelineError) as e:
        write_json(ro / "reports" / "metrics.json", {"a": 1})
    msg = str(e.value)
    assert str(ro / "reports" / "metrics.json") in msg and "read-only file system" in msg, msg


def test_no_room_for_the_feature_file_is_refused_before_writing(mount, images, tmp_path):
    root, rows = images
    full = mount("small", "size=16k")
    out = full / "resnet50.h5"
    with pytest.raises(PipelineError, match=r"cannot write .*resnet50.h5: no space left on device \(needs about"):
        extract_features(load_backbone("resnet50", "none"), root=root, rows=rows, classes=["a"], out_path=out,
                         store_dir=tmp_path / "store")
    assert list(full.iterdir()) == []
    # The computed rows are kept: with room, nothing is recomputed.
    res = extract_features(load_backbone("resnet50", "none"), root=root, rows=rows, classes=["a"],
                           out_path=tmp_path / "ok.h5", store_dir=tmp_path / "store")
    assert res.n_computed == 0 and res.n_images == 4
