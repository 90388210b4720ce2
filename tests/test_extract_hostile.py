"""Extraction and tar export of hostile or extreme images (issue 17): no
recursion tied to depth, each directory once, hard links in linear work,
set-ID bits kept without root, names with no local form skipped and
reported, sparse lengths costing nothing.  Work is measured, never timed."""

from __future__ import annotations

import io
import os
import pathlib
import resource
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile

import pytest

import cimfs
from cimfs import FileMetadata, posix
from cimfs.layout import cim, ntfs


def run_cli(*args, limit_fds=None):
    def limit():
        if limit_fds:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_fds, limit_fds))

    return subprocess.run([sys.executable, "-m", "cimfs.cli", *map(str, args)], capture_output=True, preexec_fn=limit)


def tree_of(root) -> dict:
    """Path -> (kind, content or target), walked with an explicit stack."""
    out = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        for e in os.scandir(os.path.join(root, rel) if rel else root):
            p = f"{rel}/{e.name}" if rel else e.name
            if e.is_symlink():
                out[p] = ("link", os.readlink(e.path))
            elif e.is_dir():
                out[p] = ("dir", None)
                stack.append(p)
            else:
                with open(e.path, "rb") as f:
                    out[p] = ("file", f.read())
    return out


def make_deep_tree(root, depth: int) -> None:
    """d/d/d/... ``depth`` levels; every level has a symlink sorting after
    ``d`` (so the walk must come back to it) and every 10th a file."""
    os.mkdir(root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            os.mkdir("d", dir_fd=fd)
            os.symlink(f"target{i}", "zlink", dir_fd=fd)
            if i % 10 == 0:
                f = os.open("afile", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(f, str(i).encode())
                os.close(f)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def no_file_writers(monkeypatch):
    """Extract in this process only (the module that defines Extractor)."""
    module = sys.modules[posix.Extractor.__module__]
    monkeypatch.setattr(module._FileWriters, "available", staticmethod(lambda: False))


@pytest.fixture
def deep_tmp(tmp_path):
    """tmp_path, emptied with rm at the end: pytest's own clean-up recurses."""
    yield tmp_path
    subprocess.run(["rm", "-rf", str(tmp_path)], check=False)


def test_a_deep_tree_extracts_without_recursion_or_a_descriptor_per_level(deep_tmp, monkeypatch):
    tmp_path = deep_tmp
    depth = 1200  # past Python's recursion limit, and the fd limit below
    src = tmp_path / "src"
    make_deep_tree(src, depth)
    p = run_cli("create", src, tmp_path / "deep.cim")
    assert p.returncode == 0, p.stderr[-500:]
    out = tmp_path / "out"
    p = run_cli("extract", tmp_path / "deep.cim", out, limit_fds=256)
    assert p.returncode == 0, p.stderr[-500:]
    expected = tree_of(src)
    assert len(expected) > 2 * depth and tree_of(out) == expected
    # and through the API without the file writer processes
    no_file_writers(monkeypatch)
    with cimfs.open(tmp_path / "deep.cim") as img:
        report = posix.Extractor(img, str(tmp_path / "out2")).run()
    assert report.problems == [] and tree_of(tmp_path / "out2") == expected


# ------------------------------------------------------------------ crafted images
def _region_and_table(img, directory: str, tmp_path):
    rec = img.record(img.lookup(directory) if directory else img.root_id)
    region = tmp_path / img.region_names[rec.stream.offset >> 48][0]
    off = rec.stream.offset & ((1 << 48) - 1)
    names, values = cim.unpack_link_table(img._bytes(rec.stream.offset, rec.stream.length, "t"), 4, "t")
    return region, off, names


def relink(tmp_path, image, directory: str, name: str, target: str) -> None:
    """Make ``directory``/``name`` in the image a second name of ``target``'s FileID."""
    with cimfs.open(tmp_path / image) as img:
        fid = img.lookup(target)
        region, off, names = _region_and_table(img, directory, tmp_path)
    i = names.index(name)
    data = bytearray(region.read_bytes())
    data[off + 8 + 4 * i : off + 12 + 4 * i] = struct.pack("<I", fid)
    region.write_bytes(bytes(data))


def test_a_directory_under_two_names_is_extracted_once(tmp_path):
    with cimfs.create(str(tmp_path), "two.cim") as w:
        w.mkdir("a")
        w.add_file("a/f", b"content")
        w.mkdir("b")
    relink(tmp_path, "two.cim", "", "b", "a")
    with cimfs.open(tmp_path / "two.cim") as img:
        report = posix.Extractor(img, str(tmp_path / "out")).run()
    assert tree_of(tmp_path / "out") == {"a": ("dir", None), "a/f": ("file", b"content")}
    assert len(report.problems) == 1 and "b:" in report.problems[0] and "same directory as a" in report.problems[0]


def test_a_directory_listed_twice_at_every_level_costs_linear_work(tmp_path):
    depth = 24  # once per path would be 2^24 directories
    with cimfs.create(str(tmp_path), "exp.cim") as w:
        path = ""
        for i in range(depth):
            w.mkdir(f"{path}x")
            w.mkdir(f"{path}y")
            path += "x/"
        w.add_file(f"{path}leaf", b"leaf")
    path = ""
    for i in range(depth):
        relink(tmp_path, "exp.cim", path.rstrip("/"), "y", f"{path}x")
        path += "x/"
    made = []
    real_mkdir = os.mkdir

    def counting_mkdir(*a, **k):
        made.append(a[0])
        return real_mkdir(*a, **k)

    with cimfs.open(tmp_path / "exp.cim") as img:
        os.mkdir = counting_mkdir
        try:
            report = posix.Extractor(img, str(tmp_path / "out")).run()
        finally:
            os.mkdir = real_mkdir
    assert len(made) <= depth + 1 and len(report.problems) == depth
    assert tree_of(tmp_path / "out")["/".join(["x"] * depth) + "/leaf"] == ("file", b"leaf")


def test_hard_links_to_one_directorys_files_cost_one_listing(tmp_path):
    n = 400
    with cimfs.create(str(tmp_path), "links.cim") as w:
        for i in range(n):
            w.add_file(f"files/f{i}", str(i).encode()) if i else (w.mkdir("files"), w.add_file("files/f0", b"0"))
        w.mkdir("links")
        for i in range(n):
            w.link(f"links/l{i}a", f"files/f{i}")
            w.link(f"links/l{i}b", f"files/f{i}")
    listed = [0]
    with cimfs.open(tmp_path / "links.cim") as img:
        real = img.scandir

        def counting(*a, **k):
            out = real(*a, **k)
            listed[0] += len(out)
            return out

        img.scandir = counting
        report = posix.Extractor(img, str(tmp_path / "out")).run()
    assert report.problems == []
    entries = 3 * n + 2
    # one pass over every directory plus one listing of "files" for the links
    # (once per link it would be 2 * n * n = 320 000)
    assert listed[0] <= 2 * entries, listed[0]
    out = tmp_path / "out"
    for i in (0, n // 2, n - 1):
        ino = os.stat(out / "files" / f"f{i}").st_ino
        assert os.stat(out / "links" / f"l{i}a").st_ino == ino == os.stat(out / "links" / f"l{i}b").st_ino


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to an unprivileged user: needs root to start")
@pytest.mark.parametrize("writers", [True, False])
def test_set_id_bits_survive_extraction_without_root(tmp_path, monkeypatch, request, writers):
    nobody = 65534
    modes = {"suid": 0o4755, "sgid": 0o2755, "both": 0o6711, "plain": 0o644}
    # a directory nobody can reach (pytest's are private to root)
    holder = tempfile.TemporaryDirectory(prefix="cimfs-setid-")
    request.addfinalizer(holder.cleanup)
    base = pathlib.Path(holder.name)
    os.chmod(base, 0o755)
    with cimfs.create(str(base), "ids.cim") as w:
        for name, mode in modes.items():
            w.add_file(
                name,
                b"#!/bin/sh\n" * 100,
                FileMetadata(ea_buffer=ntfs.pack_eas(ntfs.lx_eas(mode=stat.S_IFREG | mode, uid=nobody, gid=nobody))),
            )
        w.mkdir(
            "sdir",
            FileMetadata(
                attributes=cimfs.FileAttributes.DIRECTORY,
                ea_buffer=ntfs.pack_eas(ntfs.lx_eas(mode=stat.S_IFDIR | 0o2775, uid=nobody, gid=nobody)),
            ),
        )
        w.add_file(
            "sdir/inner",
            b"x",
            FileMetadata(ea_buffer=ntfs.pack_eas(ntfs.lx_eas(mode=stat.S_IFREG | 0o4750, uid=nobody, gid=nobody))),
        )
    dest_parent = base / "dest"
    dest_parent.mkdir()
    os.chown(dest_parent, nobody, nobody)
    img = cimfs.open(base / "ids.cim")
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the unprivileged extraction
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(nobody)
            os.setuid(nobody)
            if not writers:
                no_file_writers(monkeypatch)
            report = posix.Extractor(img, str(dest_parent / "out")).run()
            got = {n: stat.S_IMODE(os.lstat(dest_parent / "out" / n).st_mode) for n in [*modes, "sdir", "sdir/inner"]}
            os.write(wfd, repr((got, report.problems)).encode())
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    img.close()
    assert status == 0 and data
    got, problems = eval(data.decode())  # noqa: S307 - our own child's repr of ints and strings
    assert problems == []
    assert got == {**modes, "sdir": 0o2775, "sdir/inner": 0o4750}


def _patch_name(tmp_path, image: str, old: str, new: str) -> None:
    region_files = [p for p in tmp_path.iterdir() if p.name.startswith("region_")]
    needle = old.encode("utf-16-le")
    for region in region_files:
        data = region.read_bytes()
        if needle in data:
            region.write_bytes(data.replace(needle, new.encode("utf-16-le", "surrogatepass")))
            return
    raise AssertionError(f"{old!r} not found")


def test_names_and_targets_without_a_local_form_are_skipped_and_reported(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"ok")
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    with cimfs.create(str(img_dir), "s.cim") as w:
        posix.DirectoryImporter(w, str(src)).run()
        w.add_file("fQQQ", b"lone surrogate")
        w.add_file("gQQQ", b"what surrogateescape would make of a byte")
        w.add_file("nul", b"", FileMetadata(reparse_data=ntfs.pack_lx_symlink_reparse("a\0b")))
        w.add_file("lone", b"", FileMetadata(reparse_data=ntfs.pack_symlink_reparse("xQQQ")))
    _patch_name(img_dir, "s.cim", "fQQQ", "f\ud800QQ")
    _patch_name(img_dir, "s.cim", "xQQQ", "x\udbffQQ")
    _patch_name(img_dir, "s.cim", "gQQQ", "g\udce9QQ")
    out = tmp_path / "out"
    with cimfs.open(img_dir / "s.cim") as img:
        report = posix.Extractor(img, str(out)).run()
        # a link target with NUL is never made into a (cut) symlink: the
        # reader reports no target for it (posix_info), or it is skipped here
        assert sorted(os.listdir(os.fsencode(out))) in ([b"ok"], [b"nul", b"ok"])
        assert not os.path.islink(out / "nul")
        text = " | ".join(report.problems)
        assert "\\ud800" in text and "\\udce9" in text and "\\udbff" in text
        assert len(report.problems) == 3 + ("NUL" in text)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            exported = posix.export_tar(img, tf)
        assert any("f\ud800" in p for p in exported.problems)
    p = run_cli("extract", img_dir / "s.cim", tmp_path / "out3")
    assert p.returncode == 1 and b"Traceback" not in p.stderr and len(p.stderr.splitlines()) >= 3


def test_tar_export_skips_the_holes_of_a_sparse_stream_near_2_48(tmp_path, monkeypatch):
    size = (1 << 48) - 4096
    with cimfs.create(str(tmp_path), "sp.cim") as w:
        w.create_file("huge", FileMetadata(file_size=size)).close()
        w.add_file("small", b"abc")
    read = [0]
    from cimfs import reader

    real = reader.Image._read_stream

    def counting(self, desc, pos, n):
        read[0] += n
        assert read[0] < 1 << 24, "reading the holes"
        return real(self, desc, pos, n)

    monkeypatch.setattr(reader.Image, "_read_stream", counting)
    buf = io.BytesIO()
    with cimfs.open(tmp_path / "sp.cim") as img, tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        posix.export_tar(img, tf)
    assert read[0] < 1 << 16 and len(buf.getvalue()) < 1 << 16
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        m = tf.getmember("huge")
        assert m.size == size and m.sparse == [(size, 0)]
        assert tf.extractfile("small").read() == b"abc"


def test_symlinks_whose_target_decodes_to_nothing_are_skipped_and_reported(tmp_path):
    """Issue 22 item 19: a link record whose reparse buffer yields no target
    (its buffer's tag is not a link's) or an empty one stopped extract and
    export with a TypeError; each is now reported by path and the rest made."""
    with cimfs.create(tmp_path, "e.cim") as w:
        w.add_file("none", b"", FileMetadata(reparse_data=ntfs.pack_reparse(0x8000_0099, b"\1\2")))
        w.add_file("empty", b"", FileMetadata(reparse_data=ntfs.pack_symlink_reparse("")))
        w.add_file("lx-empty", b"", FileMetadata(reparse_data=ntfs.pack_lx_symlink_reparse("")))
        w.add_file("ok", b"fine")
        w.add_file("link", b"", FileMetadata(reparse_data=ntfs.pack_lx_symlink_reparse("ok")))
    with cimfs.open(tmp_path / "e.cim") as img:
        none = img.lookup("none")
        t = img.file_tables[(none - 1) // cim.FILE_TABLE_CAPACITY]
        rec = img.record(none)
        region = tmp_path / img.region_names[t.offset >> 48][0]
        at = (t.offset & ((1 << 48) - 1)) + ((none - 1) % cim.FILE_TABLE_CAPACITY) * t.entry_size
    with open(region, "r+b") as f:  # the record says LX symlink; its buffer says something else
        f.seek(at)
        f.write(cim.pack_file_record(rec._replace(reparse_tag=ntfs.IO_REPARSE_TAG_LX_SYMLINK))[: min(96, t.entry_size)])
    with cimfs.open(tmp_path / "e.cim") as img:
        assert posix.posix_info(img.stat("none")).target is None
        report = posix.Extractor(img, str(tmp_path / "out")).run()
        assert sorted(report.problems) == [
            "empty: symlink target is empty; not extracted",
            "lx-empty: symlink target is empty; not extracted",
            "none: symlink target could not be read from its reparse buffer; not extracted",
        ]
        assert sorted(os.listdir(tmp_path / "out")) == ["link", "ok"]
        assert os.readlink(tmp_path / "out" / "link") == "ok" and (tmp_path / "out" / "ok").read_bytes() == b"fine"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            exported = posix.export_tar(img, tf)
        assert sorted(p.split(":")[0] for p in exported.problems) == ["empty", "lx-empty", "none"]
        buf.seek(0)
        with tarfile.open(fileobj=buf) as tf:
            assert sorted(m.name.strip("./") for m in tf.getmembers() if m.name.strip("./")) == ["link", "ok"]
    for args in (
        ("extract", tmp_path / "e.cim", tmp_path / "out2"),
        ("export", tmp_path / "e.cim", tmp_path / "e.tar"),
    ):
        p = run_cli(*args)
        err = p.stderr.decode()
        assert p.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 3, err
        assert "none: symlink target could not be read" in err
    p = run_cli("fsck", tmp_path / "e.cim")
    out = p.stdout.decode() + p.stderr.decode()
    assert p.returncode == 1 and "empty: link target is empty" in out and "lx-empty: link target is empty" in out
