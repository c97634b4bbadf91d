"""The prepare stage's library: folder, Cats vs Dogs and Oxford-IIIT Pet sources, offline."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from helpers_images import (
    http_server,
    image_bytes,
    make_class_folder,
    make_tar,
    make_zip,
    md5,
    sha256,
    truncated_jpeg,
    write,
)

from pipeline.data.manifest import MANIFEST_HEADER, read_prepared
from pipeline.data.sources import prepare
from pipeline.errors import PipelineError


def manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load(out: Path, name: str):
    return json.loads((out / name).read_text(encoding="utf-8"))


def rejected(out: Path) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in load(out, "rejected.json")}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root with its bytes' hash and mtime: to prove nothing changed."""
    out = {}
    for folder, dirs, files in os.walk(os.fsencode(root)):
        for name in dirs + files:
            p = os.path.join(folder, name)
            st = os.lstat(p)
            data = open(p, "rb").read() if os.path.isfile(p) else b""
            out[p] = (st.st_mtime_ns, hashlib.sha256(data).hexdigest())
    return out


@pytest.fixture
def messy(tmp_path) -> Path:
    """Two classes of good images, with the kinds of junk real folders hold."""
    root = make_class_folder(tmp_path / "images", {"cat": 10, "dog": 6})
    write(root / "dog" / "extra.png", image_bytes(7, fmt="PNG"))      # a PNG is fine
    write(root / "cat" / "empty.jpg", b"")
    write(root / "cat" / "cut.jpg", truncated_jpeg())
    write(root / "dog" / "notes.jpg", b"this is text, not a JPEG\n")
    write(root / "dog" / "Thumbs.db", b"\0" * 64)
    write(root / "cat" / ".DS_Store", b"\0" * 16)
    write(root / "cat" / ".thumbnails" / "x.jpg", image_bytes(1))
    write(root / "dog" / "puppies" / "p.jpg", image_bytes(2))
    write(root / "README.txt", b"my pets\n")
    return root


# --------------------------------------------------------------------------- folder source


def test_folder_outputs(messy, tmp_path, capsys):
    out = tmp_path / "prepared"
    info = prepare(source="folder", folder=str(messy), out_dir=out)

    assert info == {"source": "folder", "root": str(messy), "n_train": 14, "n_test": 3,
                    "n_rejected": 8, "classes": 2}
    assert load(out, "dataset.json") == info
    assert load(out, "classes.json") == ["cat", "dog"]

    assert (out / "manifest.csv").read_text().splitlines()[0] == ",".join(MANIFEST_HEADER)
    rows = manifest(out)
    assert [(r["split"], r["label"], r["path"]) for r in rows] == sorted(
        (r["split"], r["label"], r["path"]) for r in rows)
    for r in rows:
        assert r["sha256"] == sha256(messy / r["path"])
    by = {(label, split): sum(r["label"] == label and r["split"] == split for r in rows)
          for label in ("cat", "dog") for split in ("train", "test")}
    # 20% of each class, rounded: 10 cats -> 2, 7 dogs -> 1.
    assert by == {("cat", "train"): 8, ("cat", "test"): 2, ("dog", "train"): 6, ("dog", "test"): 1}
    assert "dog/extra.png" in {r["path"] for r in rows}

    reasons = rejected(out)
    assert list(reasons) == sorted(reasons)
    assert reasons["cat/empty.jpg"] == "empty file (0 bytes)"
    assert reasons["cat/cut.jpg"].startswith("corrupt image")
    assert reasons["dog/notes.jpg"].startswith("not an image")
    assert reasons["dog/Thumbs.db"] == "not an image file (extension .db)"
    assert reasons["cat/.DS_Store"].startswith("hidden file")
    assert reasons["cat/.thumbnails"].startswith("hidden folder")
    assert reasons["dog/puppies/p.jpg"].startswith("in a subfolder of class folder 'dog'")
    assert reasons["README.txt"].startswith("not in a class folder")
    assert len(reasons) == 8

    printed = capsys.readouterr().out
    assert f"prepare: folder {messy}: 17 images in 2 classes (14 train / 3 test), 8 rejected" \
        in printed
    assert "8 files rejected" in printed


def test_same_seed_same_bytes_other_seed_other_split(messy, tmp_path):
    def run(name, seed):
        out = tmp_path / name
        prepare(source="folder", folder=str(messy), out_dir=out, seed=seed)
        return {f: (out / f).read_bytes() for f in
                ("manifest.csv", "classes.json", "rejected.json", "dataset.json")}

    first = run("a", 0)
    assert run("b", 0) == first
    assert run("c", 1)["manifest.csv"] != first["manifest.csv"]


def test_root_is_recorded_as_given(messy, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    info = prepare(source="folder", folder="../images", out_dir="data/prepared")
    assert info["root"] == "../images"
    assert read_prepared("data/prepared").root == Path("../images")


def test_user_folder_is_left_untouched(messy, tmp_path):
    before = snapshot(messy)
    prepare(source="folder", folder=str(messy), out_dir=tmp_path / "out")
    assert snapshot(messy) == before


@pytest.mark.parametrize("fraction, per_class", [(0.5, (5, 5)), (0.01, (9, 1)), (0.99, (1, 9))])
def test_split_keeps_one_image_on_each_side(tmp_path, fraction, per_class):
    root = make_class_folder(tmp_path / "img", {"a": 10, "b": 10})
    prepare(source="folder", folder=str(root), out_dir=tmp_path / "out", test_fraction=fraction)
    rows = manifest(tmp_path / "out")
    for label in ("a", "b"):
        train = sum(r["label"] == label and r["split"] == "train" for r in rows)
        test = sum(r["label"] == label and r["split"] == "test" for r in rows)
        assert (train, test) == per_class


def test_two_images_per_class_is_enough(tmp_path):
    root = make_class_folder(tmp_path / "img", {"a": 2, "b": 2})
    info = prepare(source="folder", folder=str(root), out_dir=tmp_path / "out")
    assert (info["n_train"], info["n_test"]) == (2, 2)


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes")
def test_non_utf8_name_is_rejected(tmp_path):
    root = make_class_folder(tmp_path / "img", {"a": 3, "b": 3})
    with open(os.path.join(os.fsencode(root / "a"), b"caf\xe9.jpg"), "wb") as f:
        f.write(image_bytes(5))
    prepare(source="folder", folder=str(root), out_dir=tmp_path / "out")
    assert rejected(tmp_path / "out") == {
        "a/caf\\xe9.jpg": "file name is not valid UTF-8 (rename the file to use it)"}


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes")
def test_non_utf8_folder_name_is_rejected_with_its_files(tmp_path):
    root = make_class_folder(tmp_path / "img", {"a": 3, "b": 3})
    folder = os.path.join(os.fsencode(root), b"\xe9t\xe9")
    os.mkdir(folder)
    with open(os.path.join(folder, b"1.jpg"), "wb") as f:
        f.write(image_bytes(5))
    info = prepare(source="folder", folder=str(root), out_dir=tmp_path / "out")
    assert info["classes"] == 2
    assert rejected(tmp_path / "out") == {
        "\\xe9t\\xe9/1.jpg": "folder name is not valid UTF-8 (rename the folder to use its files)"}


@pytest.mark.skipif(sys.platform != "linux", reason="needs symbolic links and FIFOs")
def test_links_are_followed_and_special_files_rejected(tmp_path):
    """Symbolic links to images and class folders are used; loops, dangling links,
    FIFOs and devices are listed with a reason, and none of them stops the run
    (before: a loop of links raised OSError out of prepare)."""
    elsewhere = make_class_folder(tmp_path / "elsewhere", {"a": 3, "b": 3})
    root = tmp_path / "img"
    (root / "a").mkdir(parents=True)
    os.symlink(elsewhere / "b", root / "b")                      # a linked class folder
    for name in ("000.jpg", "001.jpg", "002.jpg"):
        os.symlink(elsewhere / "a" / name, root / "a" / name)    # linked images
    os.symlink("loop.jpg", root / "a" / "loop.jpg")
    os.symlink("gone.jpg", root / "a" / "dangling.jpg")
    os.mkfifo(root / "a" / "pipe.jpg")                            # opening it would block
    os.symlink("/dev/zero", root / "a" / "zero.jpg")              # reading it never ends
    os.symlink("loop2", root / "loop2")                           # a loop where a class would be
    out = tmp_path / "out"
    info = prepare(source="folder", folder=str(root), out_dir=out)

    assert (info["n_train"] + info["n_test"], info["n_rejected"]) == (6, 5)
    rows = manifest(out)
    assert {r["path"] for r in rows} == {f"{c}/00{i}.jpg" for c in "ab" for i in range(3)}
    for r in rows:
        assert r["sha256"] == sha256(elsewhere / r["path"])
    assert rejected(out) == {
        "a/dangling.jpg": "broken symbolic link (to gone.jpg)",
        "a/loop.jpg": "symbolic link that cannot be followed (Too many levels of symbolic links)",
        "a/pipe.jpg": "not a regular file (a FIFO, a socket, a device, ...)",
        "a/zero.jpg": "not a regular file (a FIFO, a socket, a device, ...)",
        "loop2": "symbolic link that cannot be followed (Too many levels of symbolic links)",
    }


def test_missing_folder(tmp_path):
    with pytest.raises(PipelineError, match=r"data folder .*nowhere not found"):
        prepare(source="folder", folder=str(tmp_path / "nowhere"), out_dir=tmp_path / "out")


def test_folder_not_set(tmp_path):
    with pytest.raises(PipelineError, match="data.folder is empty"):
        prepare(source="folder", folder=None, out_dir=tmp_path / "out")


def test_folder_without_class_folders(tmp_path):
    write(tmp_path / "flat" / "1.jpg", image_bytes(1))
    with pytest.raises(PipelineError, match="has no class subfolders.*<class>/<image>"):
        prepare(source="folder", folder=str(tmp_path / "flat"), out_dir=tmp_path / "out")


def test_single_class(tmp_path):
    root = make_class_folder(tmp_path / "img", {"cat": 3})
    with pytest.raises(PipelineError, match=r"single class folder \(cat\)"):
        prepare(source="folder", folder=str(root), out_dir=tmp_path / "out")


def test_class_without_usable_image(tmp_path):
    root = make_class_folder(tmp_path / "img", {"cat": 3, "dog": 3})
    (root / "bird").mkdir()
    write(root / "bird" / "a.jpg", b"")
    write(root / "bird" / "b.jpg", truncated_jpeg())
    out = tmp_path / "out"
    with pytest.raises(PipelineError) as e:
        prepare(source="folder", folder=str(root), out_dir=out)
    msg = str(e.value)
    assert f"class folder {root}/bird has no usable image (2 files rejected: see " in msg
    assert "rejected.json" in msg and "remove the folder or add images" in msg
    assert set(rejected(out)) == {"bird/a.jpg", "bird/b.jpg"}
    assert not (out / "dataset.json").exists()


def test_no_usable_image_at_all(tmp_path):
    root = tmp_path / "img"
    write(root / "cat" / "Thumbs.db", b"\0")
    (root / "dog").mkdir()
    with pytest.raises(PipelineError, match=r"class folder .*/cat has no usable image \(1 file rejected"):
        prepare(source="folder", folder=str(root), out_dir=tmp_path / "out")


def test_class_with_one_usable_image(tmp_path):
    root = make_class_folder(tmp_path / "img", {"cat": 3, "dog": 1})
    with pytest.raises(PipelineError, match=r"dog has only 1 usable image.*at least 2"):
        prepare(source="folder", folder=str(root), out_dir=tmp_path / "out")


def test_unknown_source(tmp_path):
    with pytest.raises(PipelineError) as e:
        prepare(source="imagenet", out_dir=tmp_path / "out")
    assert str(e.value) == ("unknown data.source 'imagenet'; accepted: cats-vs-dogs, folder, "
                            "oxford-iiit-pet")


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, "0.2", True, None])
def test_bad_test_fraction(messy, tmp_path, fraction):
    with pytest.raises(PipelineError, match="data.test_fraction must be a number between 0 and 1"):
        prepare(source="folder", folder=str(messy), out_dir=tmp_path / "out",
                test_fraction=fraction)


@pytest.mark.parametrize("seed", [-1, 0.5, "0", None])
def test_bad_seed(messy, tmp_path, seed):
    with pytest.raises(PipelineError, match="data.seed must be a non-negative integer"):
        prepare(source="folder", folder=str(messy), out_dir=tmp_path / "out", seed=seed)


# --------------------------------------------------------------------------- read_prepared


def test_read_prepared_round_trip(messy, tmp_path):
    out = tmp_path / "out"
    prepare(source="folder", folder=str(messy), out_dir=out)
    p = read_prepared(out)
    assert p.root == messy and p.classes == ["cat", "dog"]
    assert [(path, p.classes[i], split, h) for path, i, split, h in p.rows] == [
        (r["path"], r["label"], r["split"], r["sha256"]) for r in manifest(out)]


def test_read_prepared_missing(tmp_path):
    with pytest.raises(PipelineError, match="run the prepare stage first"):
        read_prepared(tmp_path / "nothing")


def test_read_prepared_inconsistent(messy, tmp_path):
    out = tmp_path / "out"
    prepare(source="folder", folder=str(messy), out_dir=out)
    (out / "classes.json").write_text('["cat"]')
    with pytest.raises(PipelineError, match=r"manifest.csv:\d+: label 'dog' is not in classes"):
        read_prepared(out)


# --------------------------------------------------------------------------- Oxford-IIIT Pet

TRAINVAL = """#Image CLASS-ID SPECIES BREED ID
#ID: 1:37 Class ids
boxer_1 1 2 1
boxer_2 1 2 1
Abyssinian_1 2 1 1
Abyssinian_2 2 1 1

"""
TEST = """#Image CLASS-ID SPECIES BREED ID
boxer_3 1 2 1
boxer_4 1 2 1
Abyssinian_3 2 1 1
Abyssinian_4 2 1 1
Abyssinian_5 2 1 1
"""


@pytest.fixture
def oxford_site(tmp_path) -> Path:
    """images.tar.gz and annotations.tar.gz laid out like the real ones, with their flaws."""
    site = tmp_path / "site"
    images = {f"images/{name}.jpg": image_bytes(i) for i, name in enumerate(
        ["boxer_1", "boxer_2", "boxer_3", "Abyssinian_1", "Abyssinian_2", "Abyssinian_3",
         "Abyssinian_4", "boxer_9"])}
    images["images/boxer_4.jpg"] = truncated_jpeg()      # listed, but broken
    images["images/boxer_1.mat"] = b"MATLAB 5.0"         # the real archive has a few
    make_tar(site / "images.tar.gz", images)
    make_tar(site / "annotations.tar.gz", {"annotations/trainval.txt": TRAINVAL.encode(),
                                           "annotations/test.txt": TEST.encode(),
                                           "annotations/README": b"readme"})
    return site


def _oxford_md5(site: Path) -> dict:
    return {name: md5(site / name) for name in ("images.tar.gz", "annotations.tar.gz")}


def test_oxford(oxford_site, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    with http_server(oxford_site) as server:
        info = prepare(source="oxford-iiit-pet", out_dir=out, download_dir=str(raw),
                       oxford_base_url=server.url, oxford_md5=_oxford_md5(oxford_site))
    assert info == {"source": "oxford-iiit-pet", "root": (raw / "oxford-iiit-pet").as_posix(),
                    "n_train": 4, "n_test": 3, "n_rejected": 4, "classes": 2}
    assert load(out, "classes.json") == ["boxer", "Abyssinian"]  # by class id, not by name
    assert {(r["path"], r["label"], r["split"]) for r in manifest(out)} == {
        ("images/boxer_1.jpg", "boxer", "train"), ("images/boxer_2.jpg", "boxer", "train"),
        ("images/Abyssinian_1.jpg", "Abyssinian", "train"),
        ("images/Abyssinian_2.jpg", "Abyssinian", "train"),
        ("images/boxer_3.jpg", "boxer", "test"), ("images/Abyssinian_3.jpg", "Abyssinian", "test"),
        ("images/Abyssinian_4.jpg", "Abyssinian", "test")}
    reasons = rejected(out)
    assert reasons.keys() == {"images/boxer_4.jpg", "images/boxer_1.mat", "images/boxer_9.jpg",
                              "images/Abyssinian_5.jpg"}
    assert reasons["images/boxer_4.jpg"].startswith("corrupt image")
    assert reasons["images/boxer_1.mat"] == "not in the official trainval/test lists"
    assert reasons["images/boxer_9.jpg"] == "not in the official trainval/test lists"
    assert "missing" in reasons["images/Abyssinian_5.jpg"]

    p = read_prepared(out)
    assert {(path, p.classes[i]) for path, i, _, _ in p.rows} >= {
        ("images/boxer_1.jpg", "boxer"), ("images/Abyssinian_1.jpg", "Abyssinian")}
    assert all((p.root / path).is_file() for path, _, _, _ in p.rows)

    # A second run finds the verified archives and extracted files: no network.
    with http_server(oxford_site) as server:
        again = prepare(source="oxford-iiit-pet", out_dir=tmp_path / "out2",
                        download_dir=str(raw), oxford_base_url=server.url,
                        oxford_md5=_oxford_md5(oxford_site))
        assert server.requests == []
    assert again == info
    assert (tmp_path / "out2" / "manifest.csv").read_bytes() == (out / "manifest.csv").read_bytes()


def test_oxford_wrong_md5(oxford_site, tmp_path):
    md5s = _oxford_md5(oxford_site) | {"images.tar.gz": "0" * 32}
    with http_server(oxford_site) as server:
        with pytest.raises(PipelineError, match=r"md5 checksum mismatch for .*images\.tar\.gz"):
            prepare(source="oxford-iiit-pet", out_dir=tmp_path / "out",
                    download_dir=str(tmp_path / "raw"), oxford_base_url=server.url,
                    oxford_md5=md5s)
    assert not (tmp_path / "raw" / "images.tar.gz").exists()
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- Cats vs Dogs


@pytest.fixture
def petimages_site(tmp_path) -> Path:
    """A small kagglecatsanddogs zip with the flaws of the real one."""
    files = {f"PetImages/Cat/{i}.jpg": image_bytes(i) for i in range(4)}
    files |= {f"PetImages/Dog/{i}.jpg": image_bytes(10 + i) for i in range(4)}
    files["PetImages/Cat/666.jpg"] = b""
    files["PetImages/Dog/11702.jpg"] = truncated_jpeg()
    files["PetImages/Cat/Thumbs.db"] = b"\0" * 64
    files["readme[1].txt"] = b"Microsoft Cats vs Dogs"
    make_zip(tmp_path / "site" / "kagglecatsanddogs_5340.zip", files)
    return tmp_path / "site"


def test_cats_vs_dogs(petimages_site, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    archive_sha256 = sha256(petimages_site / "kagglecatsanddogs_5340.zip")
    with http_server(petimages_site) as server:
        info = prepare(source="cats-vs-dogs", out_dir=out, download_dir=str(raw),
                       catsdogs_url=server.url + "kagglecatsanddogs_5340.zip")
    assert info == {"source": "cats-vs-dogs",
                    "root": (raw / "cats-vs-dogs" / "PetImages").as_posix(),
                    "n_train": 6, "n_test": 2, "n_rejected": 3, "classes": 2,
                    "archive_sha256": archive_sha256}
    assert (raw / "kagglecatsanddogs_5340.zip").is_file()
    assert load(out, "classes.json") == ["Cat", "Dog"]
    assert {r["path"] for r in manifest(out)} == (
        {f"Cat/{i}.jpg" for i in range(4)} | {f"Dog/{i}.jpg" for i in range(4)})
    assert rejected(out) == {
        "Cat/666.jpg": "empty file (0 bytes)",
        "Cat/Thumbs.db": "not an image file (extension .db)",
        "Dog/11702.jpg": "corrupt image (truncated image data)",
    }


def test_cats_vs_dogs_pinned_sha256(petimages_site, tmp_path):
    url_name = "kagglecatsanddogs_5340.zip"
    good = sha256(petimages_site / url_name)
    with http_server(petimages_site) as server:
        with pytest.raises(PipelineError, match="sha256 checksum mismatch"):
            prepare(source="cats-vs-dogs", out_dir=tmp_path / "out",
                    download_dir=str(tmp_path / "raw"), catsdogs_url=server.url + url_name,
                    catsdogs_sha256="f" * 64)
        info = prepare(source="cats-vs-dogs", out_dir=tmp_path / "out",
                       download_dir=str(tmp_path / "raw"), catsdogs_url=server.url + url_name,
                       catsdogs_sha256=good.upper())
    assert info["archive_sha256"] == good
