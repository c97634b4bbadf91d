"""Downloads (checksums, resume, failures) and safe archive extraction, all offline."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers_images import closed_port_url, http_server, make_tar, make_zip, md5, sha256

import pipeline.data.archives as archives_module
import pipeline.data.download as download_module
from pipeline.data.archives import safe_extract
from pipeline.data.download import download
from pipeline.errors import PipelineError

PAYLOAD = bytes(range(256)) * 400


@pytest.fixture
def served(tmp_path):
    """A folder to serve holding one file, that file, and a download folder (not created)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "file.bin").write_bytes(PAYLOAD)
    dl = tmp_path / "dl"
    return site, site / "file.bin", dl


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# --------------------------------------------------------------------------- download


def test_download_verifies_checksums(served):
    site, src, dl = served
    with http_server(site) as server:
        out = download(server.url + "file.bin", dl / "file.bin", md5=md5(src), sha256=sha256(src))
    assert out == dl / "file.bin"
    assert out.read_bytes() == PAYLOAD
    assert not (dl / "file.bin.part").exists()


def test_wrong_checksum_leaves_nothing(served):
    site, src, dl = served
    with http_server(site) as server:
        url = server.url + "file.bin"
        with pytest.raises(PipelineError) as e:
            download(url, dl / "file.bin", sha256="0" * 64)
    msg = str(e.value)
    assert "\n" not in msg
    assert url in msg and "0" * 64 in msg and sha256(src) in msg
    assert not (dl / "file.bin").exists()
    assert not (dl / "file.bin.part").exists()


def test_existing_verified_file_is_not_downloaded_again(served, capsys):
    site, src, dl = served
    dl.mkdir()
    (dl / "file.bin").write_bytes(PAYLOAD)
    with http_server(site) as server:
        download(server.url + "file.bin", dl / "file.bin", md5=md5(src))
        assert server.requests == []
    assert "already present and verified" in capsys.readouterr().out


def test_existing_file_with_wrong_checksum_is_replaced(served):
    site, src, dl = served
    dl.mkdir()
    (dl / "file.bin").write_bytes(b"stale")
    with http_server(site) as server:
        download(server.url + "file.bin", dl / "file.bin", md5=md5(src))
    assert (dl / "file.bin").read_bytes() == PAYLOAD


def test_resume_with_range(served):
    site, src, dl = served
    dl.mkdir()
    half = len(PAYLOAD) // 2
    (dl / "file.bin.part").write_bytes(PAYLOAD[:half])
    with http_server(site) as server:
        download(server.url + "file.bin", dl / "file.bin", sha256=sha256(src))
        assert server.requests == [("/file.bin", f"bytes={half}-")]
    assert (dl / "file.bin").read_bytes() == PAYLOAD


def test_restart_when_server_ignores_range(served):
    site, src, dl = served
    dl.mkdir()
    (dl / "file.bin.part").write_bytes(b"garbage that is not a prefix")
    with http_server(site, ranges=False) as server:
        download(server.url + "file.bin", dl / "file.bin", sha256=sha256(src))
    assert (dl / "file.bin").read_bytes() == PAYLOAD


def test_part_longer_than_file_restarts(served):
    site, src, dl = served
    dl.mkdir()
    (dl / "file.bin.part").write_bytes(PAYLOAD + b"extra")
    with http_server(site) as server:
        download(server.url + "file.bin", dl / "file.bin", sha256=sha256(src))
    assert (dl / "file.bin").read_bytes() == PAYLOAD


def test_corrupt_part_fails_checksum_and_is_deleted(served):
    site, src, dl = served
    dl.mkdir()
    (dl / "file.bin.part").write_bytes(b"x" * 100)  # a wrong prefix, resumed as if right
    with http_server(site) as server:
        with pytest.raises(PipelineError, match="checksum mismatch"):
            download(server.url + "file.bin", dl / "file.bin", sha256=sha256(src))
    assert not (dl / "file.bin").exists() and not (dl / "file.bin.part").exists()
    with http_server(site) as server:  # the next run starts clean and succeeds
        download(server.url + "file.bin", dl / "file.bin", sha256=sha256(src))
    assert (dl / "file.bin").read_bytes() == PAYLOAD


def test_lost_connection_keeps_part_for_resume(served):
    site, src, dl = served
    with http_server(site) as server:
        server.cut_at = 1000
        with pytest.raises(PipelineError, match="could not download"):
            download(server.url + "file.bin", dl / "file.bin")  # no checksum: length is checked
        assert not (dl / "file.bin").exists()
        assert (dl / "file.bin.part").read_bytes() == PAYLOAD[:1000]
        server.cut_at = None
        download(server.url + "file.bin", dl / "file.bin", md5=md5(src))
        assert server.requests[-1] == ("/file.bin", "bytes=1000-")
    assert (dl / "file.bin").read_bytes() == PAYLOAD


@pytest.mark.parametrize("ranges", [True, False], ids=["resume", "restart"])
@pytest.mark.parametrize("cut", [0, 1, len(PAYLOAD) // 2, len(PAYLOAD) - 1])
def test_interrupted_download_is_never_used(served, cut, ranges):
    """The server closes the connection mid-file: no dest; the next call completes and verifies."""
    site, src, dl = served
    with http_server(site, ranges=ranges) as server:
        url = server.url + "file.bin"
        server.cut_at = cut
        with pytest.raises(PipelineError, match=rf"could not download .*connection closed after "
                                                rf"{cut:,} of {len(PAYLOAD):,} bytes"):
            download(url, dl / "file.bin", sha256=sha256(src))
        assert not (dl / "file.bin").exists()
        assert (dl / "file.bin.part").read_bytes() == PAYLOAD[:cut]
        # A second call without a checksum does not take the .part as the file either.
        with pytest.raises(PipelineError, match="connection closed"):
            download(url, dl / "file.bin")
        assert not (dl / "file.bin").exists()

        server.cut_at = None
        server.requests.clear()
        download(url, dl / "file.bin", sha256=sha256(src))
        expected_range = f"bytes={cut}-" if cut else None
        assert server.requests == [("/file.bin", expected_range)]
    assert (dl / "file.bin").read_bytes() == PAYLOAD
    assert not (dl / "file.bin.part").exists()


def test_connection_lost_twice_then_complete(served):
    site, src, dl = served
    with http_server(site) as server:
        url = server.url + "file.bin"
        for cut in (1000, 30000):
            server.cut_at = cut
            with pytest.raises(PipelineError, match="could not download"):
                download(url, dl / "file.bin", md5=md5(src))
            assert not (dl / "file.bin").exists()
        server.cut_at = None
        download(url, dl / "file.bin", md5=md5(src))
        assert server.requests == [("/file.bin", None), ("/file.bin", "bytes=1000-"),
                                   ("/file.bin", "bytes=30000-")]
    assert (dl / "file.bin").read_bytes() == PAYLOAD


def test_ctrl_c_mid_download_leaves_no_dest(served, monkeypatch):
    site, src, dl = served
    real_tqdm = download_module.tqdm

    class InterruptedBar(real_tqdm):
        def update(self, n=1):
            super().update(n)
            if self.n >= 3 * 4096:
                raise KeyboardInterrupt

    monkeypatch.setattr(download_module, "_CHUNK", 4096)
    monkeypatch.setattr(download_module, "tqdm", InterruptedBar)
    with http_server(site) as server:
        with pytest.raises(KeyboardInterrupt):
            download(server.url + "file.bin", dl / "file.bin", sha256=sha256(src))
        assert not (dl / "file.bin").exists()
        assert (dl / "file.bin.part").read_bytes() == PAYLOAD[: 3 * 4096]
        monkeypatch.setattr(download_module, "tqdm", real_tqdm)
        download(server.url + "file.bin", dl / "file.bin", sha256=sha256(src))
        assert server.requests[-1] == ("/file.bin", f"bytes={3 * 4096}-")
    assert (dl / "file.bin").read_bytes() == PAYLOAD


def test_file_url(served):
    _, src, dl = served
    out = download(src.as_uri(), dl / "copy.bin", md5=md5(src))
    assert out.read_bytes() == PAYLOAD


def test_unreachable_url_is_one_line_naming_it(tmp_path):
    url = closed_port_url()
    with pytest.raises(PipelineError) as e:
        download(url, tmp_path / "x.bin")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"could not download {url} (")
    assert str(tmp_path / "x.bin") in msg
    assert not (tmp_path / "x.bin").exists()


def test_http_404(served):
    site, _, dl = served
    with http_server(site) as server:
        with pytest.raises(PipelineError, match="HTTP 404"):
            download(server.url + "missing.bin", dl / "missing.bin")
    assert not (dl / "missing.bin").exists()


# --------------------------------------------------------------------------- extraction


def test_extract_tar_gz_and_skip_when_done(tmp_path, capsys):
    archive = make_tar(tmp_path / "a.tar.gz", {"top/x.txt": b"x", "top/sub/y.txt": b"y"})
    target = tmp_path / "out"
    assert safe_extract(archive, target) == target
    assert (target / "top/x.txt").read_bytes() == b"x"
    assert (target / "top/sub/y.txt").read_bytes() == b"y"
    assert tree(tmp_path) == {"a.tar.gz", "out", "out/top", "out/top/x.txt", "out/top/sub",
                              "out/top/sub/y.txt", "out/.a.tar.gz.extracted.json"}
    capsys.readouterr()
    safe_extract(archive, target)
    assert "already extracted" in capsys.readouterr().out


def test_two_archives_share_a_target(tmp_path):
    images = make_tar(tmp_path / "images.tar.gz", {"images/a.jpg": b"a"})
    notes = make_tar(tmp_path / "annotations.tar.gz", {"annotations/list.txt": b"l"})
    target = tmp_path / "pets"
    safe_extract(images, target)
    safe_extract(notes, target)
    assert (target / "images/a.jpg").exists() and (target / "annotations/list.txt").exists()


def test_interrupted_extraction_is_redone(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"top/x.txt": b"x"})
    target = tmp_path / "out"
    # What a crash mid-way leaves: a partial temporary sibling, no marker.
    (tmp_path / ".out.extracting-abc" / "top").mkdir(parents=True)
    target.mkdir()
    (target / "top").mkdir()
    safe_extract(archive, target)
    assert (target / "top/x.txt").read_bytes() == b"x"
    assert not list(tmp_path.glob(".out.extracting-*"))


def test_changed_archive_is_extracted_again(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"top/x.txt": b"old"})
    target = tmp_path / "out"
    safe_extract(archive, target)
    make_zip(archive, {"top/x.txt": b"new!"})
    safe_extract(archive, target)
    assert (target / "top/x.txt").read_bytes() == b"new!"


def _tar_with(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tf:
        tf.addfile(_file("ok.txt"), io.BytesIO(b"ok"))
        for m in members:
            tf.addfile(m, io.BytesIO(b"evil") if m.isreg() else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 4 if name != "ok.txt" else 2
    return info


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


@pytest.mark.parametrize("members, bad", [
    (lambda base: [_file("../evil")], "../evil"),
    (lambda base: [_file("a/../../evil")], "a/../../evil"),
    (lambda base: [_file(f"{base}/evil")], "{base}/evil"),
    (lambda base: [_link("passwd", "/etc/passwd")], "passwd"),
    (lambda base: [_link("up", "../../outside")], "up"),
    (lambda base: [_link("hard", "/etc/passwd", tarfile.LNKTYPE)], "hard"),
    (lambda base: [_link("hard", "../outside", tarfile.LNKTYPE)], "hard"),
    (lambda base: [_device("null")], "null"),
    # Chains of links, each pointing inside, that lead outside together.
    (lambda base: [_link("s", "."), _link("a", "s/..")], "a"),
    (lambda base: [_link("a", "s/.."), _link("s", "."), _file("a/evil")], "a/evil"),
    (lambda base: [_link("s", "."), _file("s/../evil")], "s/../evil"),
    (lambda base: [_link("s", "."), _link("h", "s/../outside", tarfile.LNKTYPE)], "h"),
], ids=["parent", "nested-parent", "absolute", "symlink-abs", "symlink-up", "hardlink-abs",
        "hardlink-up", "device", "link-chain", "write-through-chain", "path-through-link",
        "hardlink-through-link"])
@pytest.mark.parametrize("with_data_filter", [True, False], ids=["filter", "own-checks-only"])
def test_tar_unsafe_members_are_refused(tmp_path, monkeypatch, members, bad, with_data_filter):
    if not with_data_filter:  # as on Pythons without tarfile's filters
        monkeypatch.setattr(archives_module, "_DATA_FILTER", None)
    work = tmp_path / "work"
    work.mkdir()
    archive = _tar_with(work / "bad.tar", *members(tmp_path))
    with pytest.raises(PipelineError) as e:
        safe_extract(archive, work / "out")
    msg = str(e.value)
    assert "bad.tar" in msg and "\n" not in msg
    assert f"'{bad.format(base=tmp_path)}'" in msg
    assert "is unsafe (" not in msg  # caught by our checks, not only by tarfile's filter
    assert tree(tmp_path) == {"work", "work/bad.tar"}  # nothing outside, nothing inside


def test_zip_with_parent_path_is_refused(tmp_path):
    work = tmp_path / "work"
    archive = make_zip(work / "bad.zip", {"ok.txt": b"ok", "../evil": b"evil"})
    with pytest.raises(PipelineError, match=r"bad\.zip.*'\.\./evil'"):
        safe_extract(archive, work / "out")
    assert tree(tmp_path) == {"work", "work/bad.zip"}


@pytest.mark.parametrize("name, why", [
    ("/tmp/evil", "has an absolute path"),
    ("C:/evil", "has an absolute path"),
    ("\\\\server\\share\\evil", "has an absolute path"),
    ("a/../../evil", "has a path that leads outside the target folder"),
])
def test_zip_unsafe_names_are_refused(tmp_path, name, why):
    work = tmp_path / "work"
    archive = make_zip(work / "bad.zip", {"ok.txt": b"ok", name: b"evil"})
    with pytest.raises(PipelineError) as e:
        safe_extract(archive, work / "out")
    assert f"'{name}' {why}" in str(e.value)
    assert tree(tmp_path) == {"work", "work/bad.zip"}


@pytest.mark.parametrize("target", ["../../outside", "sub/../../../outside", "/etc/passwd"])
def test_zip_symlinks_leading_out_are_refused(tmp_path, target):
    work = tmp_path / "work"
    work.mkdir()
    archive = work / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", b"ok")
        info = zipfile.ZipInfo("top/link")
        info.external_attr = (0o120777 << 16)  # a symbolic link; its data is the target
        zf.writestr(info, target)
    with pytest.raises(PipelineError, match=r"'top/link' is a symbolic link to "):
        safe_extract(archive, work / "out")
    assert tree(tmp_path) == {"work", "work/bad.zip"}


def test_zip_symlink_inside_is_accepted(tmp_path):
    archive = tmp_path / "ok.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", b"ok")
        info = zipfile.ZipInfo("top/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "../ok.txt")  # top/../ok.txt: inside
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out/ok.txt").read_bytes() == b"ok"


def test_zip_symlink_outside_is_refused(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)  # a symbolic link; its data is the target
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(PipelineError, match="'link'.*symbolic link"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_zip_is_refused(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"x.txt": b"hello " * 1000})
    data = bytearray(archive.read_bytes())
    at = data.index(b"x.txt") + len(b"x.txt") + 10  # inside the first member's data
    data[at] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="corrupt"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_tar_gz_is_refused(tmp_path):
    archive = make_tar(tmp_path / "a.tar.gz", {f"top/{i}.bin": os.urandom(5000) for i in range(5)})
    archive.write_bytes(archive.read_bytes()[:-4000])
    with pytest.raises(PipelineError, match=r"a\.tar\.gz is corrupt or incomplete"):
        safe_extract(archive, tmp_path / "out")
    assert tree(tmp_path) == {"a.tar.gz"}


def test_not_an_archive(tmp_path):
    page = tmp_path / "page.zip"
    page.write_text("<html>an error page saved under the archive's name</html>")
    with pytest.raises(PipelineError, match="corrupt"):
        safe_extract(page, tmp_path / "out")
    other = tmp_path / "data.rar"
    other.write_bytes(b"Rar!")
    with pytest.raises(PipelineError, match=r"expected a \.zip"):
        safe_extract(other, tmp_path / "out")
    assert not (tmp_path / "out").exists()
