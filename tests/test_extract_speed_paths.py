"""Extraction: equal to the straightforward loop, incremental, bounded memory."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from pipeline.backbones import load_backbone
from pipeline.data.manifest import Row
from pipeline.extract.decode import DRAFT_FACTOR
from pipeline.extract.local import extract_features

pytestmark = pytest.mark.sample_data


def _rows(folder, per_class=None):
    rows = []
    for label, cls in enumerate(sorted(p.name for p in folder.iterdir() if p.is_dir())):
        files = sorted((folder / cls).iterdir())[:per_class]
        for f in files:
            sha = hashlib.sha256(f.read_bytes()).hexdigest()
            rows.append(Row(f"{cls}/{f.name}", label, "train", sha))
    return rows


def _features(path):
    with h5py.File(path) as h5:
        return h5["paths"].asstr()[:], h5["features"][:], dict(h5.attrs)


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def test_features_equal_the_straightforward_imagefolder_loop(tmp_path, catsdogs, lite0):
    """The lesson's loop: ImageFolder + DataLoader + the weights' transform, fp32, no_grad."""
    from pipeline.bench.extract import straightforward_loader

    sub = tmp_path / "sub"
    for cls in ("cat", "dog"):
        (sub / cls).mkdir(parents=True)
        for f in sorted((catsdogs / cls).iterdir())[:12]:
            (sub / cls / f.name).symlink_to(f)
    ds, loader = straightforward_loader(sub, lite0.transform_spec, batch_size=8, workers=0)
    with torch.no_grad():
        expected = torch.cat([lite0.features(x) for x, _ in loader]).numpy()
    expected_paths = [os.path.relpath(p, sub) for p, _ in ds.samples]

    rows = _rows(sub)
    for decoder in ("pillow-exact", "pillow"):
        out = tmp_path / f"{decoder}.h5"
        extract_features(lite0, root=sub, rows=rows, classes=["cat", "dog"], out_path=out, decoder=decoder, batch_size=10)
        paths, feats, attrs = _features(out)
        assert list(paths) == expected_paths
        assert attrs["decoder"] == decoder
        # No sample photo is twice the 256-pixel target, so draft mode decodes the
        # same pixels here and the features must match the plain loop too.
        np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-4)

    # The GPU path's code (decode_jpeg + tensor resize) runs on the CPU too. Its
    # bicubic resize differs slightly from Pillow's, so it is close, not equal.
    out = tmp_path / "tv.h5"
    extract_features(lite0, root=sub, rows=rows, classes=["cat", "dog"], out_path=out, decoder="torchvision")
    _, feats, _ = _features(out)
    cos = (feats * expected).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 0.97, cos.min()

    # The CPU's default: Pillow decodes, torchvision resizes the uint8 tensor. Within 2 levels of
    # the exact pixels, and features the lesson loop's to a cosine of 0.9999.
    out = tmp_path / "tensor.h5"
    extract_features(lite0, root=sub, rows=rows, classes=["cat", "dog"], out_path=out, decoder="pillow-tensor")
    paths, feats, attrs = _features(out)
    assert list(paths) == expected_paths and attrs["decoder"] == "pillow-tensor"
    cos = (feats * expected).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 0.9999, cos.min()


def test_tensor_resize_matches_exact_preprocessing(catsdogs, dogbreeds10, lite0):
    """``pillow-tensor``'s resize against torchvision's exact PIL transform, pixel by pixel."""
    from pipeline.data.images import load_rgb

    spec = lite0.transform_spec
    diffs = []
    for folder in (catsdogs, dogbreeds10):
        for f in sorted(folder.rglob("*.jpg"))[::8]:
            image = load_rgb(f)
            exact = np.asarray(spec.resize_crop(image)).astype(int)
            fast = spec.resize_crop_tensor(image)
            assert fast.shape == exact.shape == (spec.crop, spec.crop, 3) and fast.dtype == np.uint8
            diffs.append(np.abs(fast.astype(int) - exact))
    assert len(diffs) > 40
    assert max(d.max() for d in diffs) <= 2  # measured: 2
    assert np.mean([d.mean() for d in diffs]) < 0.01  # measured: 0.003 of a level


def test_reduced_scale_decoding_on_enlarged_photos(tmp_path, dogbreeds10, lite0):
    """The default ``pillow`` decoder's draft path, on photos large enough to take it.

    Its rows must equal the straightforward computation with Pillow's draft
    mode done by hand, stay close to the exact decoder, and differ from it
    (proof that the reduced-scale path ran at all).
    """
    from PIL import Image

    folder = tmp_path / "big"
    (folder / "dog").mkdir(parents=True)
    def large_enough(p):  # enlarged 3x, at least 4x the target per side: where draft mode starts
        with Image.open(p) as im:
            return 3 * min(im.size) >= 2 * DRAFT_FACTOR * lite0.transform_spec.resize

    sources = sorted(p for p in dogbreeds10.rglob("*.jpg") if large_enough(p))[::15][:8]
    for i, f in enumerate(sources):
        with Image.open(f) as im:
            big = im.convert("RGB").resize((im.width * 3, im.height * 3), Image.BICUBIC)
        big.save(folder / "dog" / f"{i}.jpg", quality=92)
    rows = _rows(folder)
    feats = {}
    for decoder in ("pillow", "pillow-exact"):
        out = tmp_path / f"{decoder}.h5"
        extract_features(lite0, root=folder, rows=rows, classes=["dog"], out_path=out, decoder=decoder, batch_size=4)
        feats[decoder] = _features(out)[1]

    spec = lite0.transform_spec
    by_hand = []
    for r in rows:
        with Image.open(folder / r.path) as im:
            full = im.size
            im.draft("RGB", (DRAFT_FACTOR * spec.resize,) * 2)
            assert im.size[0] <= (full[0] + 1) // 2, "the photo was not decoded at reduced scale"
            by_hand.append(spec.build()(im.convert("RGB")))
    with torch.no_grad():
        expected = lite0.features(torch.stack(by_hand)).numpy()
    np.testing.assert_allclose(feats["pillow"], expected, rtol=1e-4, atol=1e-4)

    a, b = feats["pillow"], feats["pillow-exact"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    # JPEG's reduced-scale DCT is a coarser filter than Pillow's bicubic resize of the
    # full picture. Measured on all 386 sample photos enlarged 3x: min 0.9875, median
    # 0.9998 with the draft kept at 2x the target (0.972 and 0.997 at 1x).
    assert cos.min() >= 0.98 and np.median(cos) >= 0.995, cos
    assert np.abs(a - b).max() > 1e-3  # the reduced-scale pixels are not the exact ones


def test_incremental_extraction_computes_only_new_images(tmp_path, catsdogs, lite0):
    folder = tmp_path / "photos"
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((catsdogs / cls).iterdir())[:25]:
            (folder / cls / f.name).symlink_to(f)
    store = tmp_path / "store"
    kw = dict(root=folder, classes=["cat", "dog"], store_dir=store, batch_size=16)
    rows = _rows(folder)
    assert len(rows) == 50
    first = extract_features(lite0, rows=rows[:20] + rows[25:45], out_path=tmp_path / "a.h5", **kw)
    assert first.n_computed == 40 and first.n_reused == 0

    # Ten more images: only those ten go through the network.
    second = extract_features(lite0, rows=rows, out_path=tmp_path / "b.h5", **kw)
    assert second.n_computed == 10 and second.n_reused == 40
    assert sorted(second.computed) == sorted(r.path for r in rows[20:25] + rows[45:50])

    # ... and the result equals a from-scratch extraction, row for row.
    scratch = extract_features(lite0, rows=rows, out_path=tmp_path / "c.h5", root=folder, classes=["cat", "dog"])
    assert scratch.n_computed == 50
    pb, fb, _ = _features(tmp_path / "b.h5")
    pc, fc, _ = _features(tmp_path / "c.h5")
    assert list(pb) == list(pc) == [r.path for r in rows]
    np.testing.assert_allclose(fb, fc, rtol=1e-4, atol=1e-5)

    # Removing images computes nothing; a changed image is recomputed.
    third = extract_features(lite0, rows=rows[5:], out_path=tmp_path / "d.h5", **kw)
    assert third.n_computed == 0 and third.n_images == 45
    # Another backbone configuration never reads these rows.
    other = extract_features(load_backbone("resnet18", "none"), rows=rows[:4], out_path=tmp_path / "e.h5", **kw)
    assert other.n_computed == 4


MEMORY_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys, tracemalloc
    from pathlib import Path
    from pipeline.backbones import load_backbone
    from pipeline.data.manifest import Row
    from pipeline.extract.local import extract_features
    folder = Path(sys.argv[1])
    rows = []
    for label, cls in enumerate(["cat", "dog"]):
        for f in sorted((folder / cls).iterdir()):
            rows.append(Row(f"{cls}/{f.name}", label, "train", hashlib.sha256(f.read_bytes()).hexdigest()))
    bb = load_backbone("mobilenet_v3_large", "none", 64)
    # Traced: Python objects and numpy arrays, where feature rows live once out of the network.
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    res = extract_features(bb, root=folder, rows=rows, classes=["cat", "dog"], out_path=folder / "out.h5",
                           store_dir=folder / "store", batch_size=32, compile=False)
    peak = tracemalloc.get_traced_memory()[1] - base
    print(json.dumps({"n": res.n_images, "dim": bb.feature_dim, "peak": peak}))
    """
)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path, catsdogs):
    """1,200 vs 2,400 distinct files (the sample, made small and repeated, each copy a few bytes different).

    Memory that does not depend on the number of images (the network, decode
    buffers, the writer's 1,024-row blocks, the store reader's shards) is the
    same in both runs; the second run's 1,200 more rows are 6 MB of features.
    Keeping them in memory would add at least that to the peak; streaming
    adds only their bookkeeping (paths, hashes: ~100 bytes a row, measured).
    """
    from PIL import Image

    small = {}
    for cls in ("cat", "dog"):
        for f in sorted((catsdogs / cls).iterdir()):
            with Image.open(f) as im:  # 64-pixel input: the network is cheap, the rows as wide as ever
                im = im.convert("RGB")
                im.thumbnail((96, 96))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=90)
            small[cls, f.name] = buf.getvalue()

    def make(n_copies, dest):
        for (cls, name), data in small.items():
            (dest / cls).mkdir(parents=True, exist_ok=True)
            for k in range(n_copies):
                # Bytes after the JPEG end marker change the hash, not the pixels.
                (dest / cls / f"{k}_{name}").write_bytes(data + k.to_bytes(2, "big") * (k > 0))

    runs = {}
    for n_copies in (5, 10):
        folder = tmp_path / f"x{n_copies}"
        make(n_copies, folder)
        res = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(folder)], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        runs[n_copies] = json.loads(res.stdout.strip().splitlines()[-1])
        assert runs[n_copies]["n"] == 240 * n_copies
    grown = runs[10]["peak"] - runs[5]["peak"]
    more_rows = (runs[10]["n"] - runs[5]["n"]) * runs[10]["dim"] * 4  # float32 features
    print(f"\npeak traced memory: {runs[5]['peak'] / 1e6:.2f} MB for {runs[5]['n']} images, "
          f"{runs[10]['peak'] / 1e6:.2f} MB for {runs[10]['n']} ({more_rows / 1e6:.1f} MB more rows)")
    assert grown < 0.25 * more_rows, (
        f"the peak grew by {grown / 1e6:.1f} MB for {more_rows / 1e6:.1f} MB more feature rows: rows are "
        f"kept in memory ({runs})")


def test_decoding_started_before_the_network_loads_is_used_or_discarded(tmp_path, catsdogs, lite0, monkeypatch):
    """The stage starts decoding while the network loads; the rows are the same either way."""
    from pipeline.backbones import get_spec
    from pipeline.extract import decode

    rows = _rows(catsdogs, per_class=5)
    spec = get_spec("efficientnet_lite0").transform_for("DEFAULT", 0)
    assert spec == lite0.transform_spec  # known without building the network
    kw = {"root": catsdogs, "rows": rows, "classes": ["cat", "dog"], "decoder": "pillow", "batch_size": 4,
          "decode_threads": 1}
    extract_features(lite0, out_path=tmp_path / "plain.h5", **kw)

    def early():
        return decode.batches("pillow", catsdogs, rows, spec, 4, 1, torch.device("cpu"))

    started, batches = early(), decode.batches

    def no_second_decoder(*a, **k):
        raise AssertionError("the early batches were not used")

    monkeypatch.setattr(decode, "batches", no_second_decoder)
    res = extract_features(lite0, out_path=tmp_path / "early.h5", store_dir=tmp_path / "store", early=started, **kw)
    assert res.n_computed == len(rows) and not started.thread.is_alive()
    (p0, f0, _), (p1, f1, _) = _features(tmp_path / "plain.h5"), _features(tmp_path / "early.h5")
    assert list(p0) == list(p1)
    np.testing.assert_allclose(f0, f1, rtol=1e-5, atol=1e-5)

    # Nothing left to compute (every row in the store): the early batches are closed, unused.
    monkeypatch.setattr(decode, "batches", batches)
    unused = early()
    res = extract_features(lite0, out_path=tmp_path / "again.h5", store_dir=tmp_path / "store", early=unused, **kw)
    assert res.n_computed == 0 and not unused.thread.is_alive()


def test_whole_process_bench_times_both_processes_on_the_same_photos(tmp_path, catsdogs):
    """The benchmark's whole-process rows: the stage twice and the lesson loop, each a real process."""
    import shutil

    from pipeline.bench.process import report, whole_process

    folder = tmp_path / "photos"
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((catsdogs / cls).iterdir())[:4]:
            shutil.copy(f, folder / cls / f.name)
    # Eager, so that no package is built here (tests/test_compiled.py builds and loads one through the
    # same background path the benchmark's first run takes).
    r = whole_process(folder, "efficientnet_lite0", precisions=("fp32",), compile=False)
    assert r["images"] == 8
    run = r["runs"]["fp32"]
    # Each run computed all 8 photos itself: the second started with an empty store.
    for which in ("first", "second"):
        assert any("8 computed" in line for line in run[which]["log"]), run[which]["log"]
        assert 0 < run[which]["first_batch_s"] < run[which]["s"]
        assert not run[which]["packaged"]
    assert "package_s" not in run
    assert r["lesson_s"] > 0
    text = report(r, "efficientnet_lite0")
    assert f"{r['lesson_s'] / run['second']['s']:.2f}x the lesson loop" in text


def test_every_bench_command_parses_its_options(capsys):
    """One entry point: each command of ``python -m pipeline.bench`` imports and prints its --help."""
    from pipeline.bench.__main__ import COMMANDS, main

    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert f"python -m pipeline.bench {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_make_set_writes_distinct_variants_per_class(tmp_path, catsdogs):
    from pipeline.bench.process import VARIANTS, make_set

    src = tmp_path / "src"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        for f in sorted((catsdogs / cls).iterdir())[:2]:
            (src / cls / f.name).symlink_to(f)
    n = make_set([src], tmp_path / "set", copies=3)
    written = sorted(p.relative_to(tmp_path / "set") for p in (tmp_path / "set").rglob("*.jpg"))
    assert n == len(written) == 2 * 2 * 3
    assert {p.parts[0] for p in written} == {"cat", "dog"}
    assert {p.stem.rsplit("_", 1)[1] for p in written} == {name for name, _ in VARIANTS[:3]}
    assert len({hashlib.sha256((tmp_path / "set" / p).read_bytes()).hexdigest() for p in written}) == len(written)
