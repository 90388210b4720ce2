"""Consistent images (CONSISTENT_CIM, the CLI's default): the same input
gives the same files, byte for byte and by name, however many processes
copy the contents, whenever and wherever the image is written."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading

import pytest

import cimfs
from cimfs import CimError, errors, posix
from cimfs.store import CONSISTENT_LANES, SMALL_DATA_MAX, lane_of


def make_source(root) -> None:
    """Small and large files of many sizes (every lane), duplicates, a
    sparse file, hard links, a symlink and nested directories."""
    os.makedirs(root)
    for d in range(4):
        sub = os.path.join(root, f"dir{d}", "nested")
        os.makedirs(sub)
        for i in range(40):
            size = (i * 977 + d * 131) % 3000 + 1
            with open(os.path.join(root, f"dir{d}", f"small{i}.txt"), "wb") as f:
                f.write(bytes([i % 251]) * size)
        for i in range(3):
            with open(os.path.join(sub, f"large{i}.bin"), "wb") as f:
                f.write(hashlib.sha256(f"{d}/{i}".encode()).digest() * ((40_000 + 4096 * i + d) // 32))
    with open(os.path.join(root, "dup-of-small0.txt"), "wb") as f:  # a duplicate: stored once
        f.write(bytes([0]) * 1)
    with open(os.path.join(root, "sparse.img"), "wb") as f:
        f.truncate(1 << 20)
        f.write(b"head")
    os.link(os.path.join(root, "dir0", "small1.txt"), os.path.join(root, "hardlink.txt"))
    os.symlink("dir1/small2.txt", os.path.join(root, "symlink"))
    os.utime(root, ns=(1_650_000_000_000_000_000, 1_650_000_000_000_000_000))


def image_files(d) -> dict:
    """Every file of an image directory: name -> SHA-256 of its bytes."""
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest() for n in sorted(os.listdir(d))}


def build(d, src, **options) -> dict:
    os.makedirs(d)
    with cimfs.create(d, "a.cim", consistent=True, sync=False, **options) as w:
        posix.DirectoryImporter(w, str(src)).run()
    return image_files(d)


def test_lanes_cover_both_size_classes():
    lanes = {lane_of(n) for n in range(1, 5000)} | {lane_of(SMALL_DATA_MAX + n) for n in range(1, 5000)}
    assert lanes == set(range(CONSISTENT_LANES))
    assert all(lane_of(n) < 2 for n in range(1, SMALL_DATA_MAX + 1, 997))


def test_same_tree_same_files_whatever_copies_the_contents(tmp_path):
    src = tmp_path / "src"
    make_source(str(src))
    results = {dp: build(tmp_path / f"img-{dp}", src, data_process=dp) for dp in (False, 1, 2, 3)}

    # and with another thread running, where no process can be forked
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        results["thread"] = build(tmp_path / "img-thread", src)
    finally:
        stop.set()
        t.join()
    first = results[False]
    for key, files in results.items():
        assert files == first, key
    # the region set is named by its contents: region and object ID files share one id
    names = [n for n in first if n != "a.cim"]
    ids = {n.split("_")[1] for n in names}
    assert len(ids) == 1 and len(names) >= 6  # metadata + lanes, each with its object ID file
    with cimfs.open(tmp_path / "img-2" / "a.cim") as im:
        assert str(im.header.region_set.id) == ids.pop()
        assert im.read_bytes("dir2/nested/large1.bin") == (src / "dir2/nested/large1.bin").read_bytes()
        assert im.stat("hardlink.txt").nlink == 2
        assert im.check() == []


@pytest.mark.parametrize("slow_worker", [0, 1])
def test_the_order_data_processes_finish_in_changes_nothing(tmp_path, monkeypatch, slow_worker):
    """The copies of one of two data processes (the lanes it takes) are made
    slow (the processes inherit the patch when forked), so the other one
    finishes first."""
    import time

    from cimfs import dataprocess

    src = tmp_path / "src"
    make_source(str(src))
    expected = build(tmp_path / "img-inline", src, data_process=False)

    def slowed(original, size_at):
        def copy(*args, **kw):
            if lane_of(args[size_at]) % 2 == slow_worker:
                time.sleep(0.003)
            return original(*args, **kw)

        return copy

    monkeypatch.setattr(dataprocess, "read_small_source", slowed(dataprocess.read_small_source, 1))
    monkeypatch.setattr(dataprocess, "copy_content", slowed(dataprocess.copy_content, 4))
    assert build(tmp_path / "img-slow", src, data_process=2) == expected


def test_default_api_images_keep_random_set_ids(tmp_path):
    """Without consistent=True (CimCreateImage) nothing changes: a fresh random id each time."""
    ids = []
    for n in ("a", "b"):
        d = tmp_path / n
        d.mkdir()
        with cimfs.create(d, "x.cim", sync=False) as w:
            w.add_file("f", b"same")
        with cimfs.open(d / "x.cim") as im:
            ids.append(im.header.region_set.id)
    assert ids[0] != ids[1]


def run_cli(*args, env=None):
    p = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", *map(str, args)], capture_output=True, env={**os.environ, **(env or {})}
    )
    assert p.returncode == 0, p.stderr.decode()
    return p


def test_cli_create_is_consistent_after_touch_a(tmp_path):
    src = tmp_path / "src"
    make_source(str(src))
    (tmp_path / "one").mkdir()
    run_cli("create", src, tmp_path / "one" / "a.cim")
    # reading the tree (the scan, cat) and touch -a move atimes (and ctimes)
    subprocess.run(["touch", "-a", str(src / "dir0" / "small3.txt"), str(src / "dir1"), str(src)], check=True)
    for dp, _, fns in os.walk(src):
        for n in fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            os.utime(p, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns), follow_symlinks=False)
    (tmp_path / "two").mkdir()
    run_cli("create", src, tmp_path / "two" / "a.cim")
    assert image_files(tmp_path / "one") == image_files(tmp_path / "two")
    # the atime stored is the mtime
    with cimfs.open(tmp_path / "two" / "a.cim") as im:
        st = im.stat("dir0/small3.txt")
        assert st.last_access_time == st.last_write_time == st.change_time
    # --no-consistent keeps the scan's atimes (and a random set id)
    (tmp_path / "three").mkdir()
    run_cli("create", "--no-consistent", src, tmp_path / "three" / "a.cim")
    with cimfs.open(tmp_path / "three" / "a.cim") as im:
        st = im.stat("dir0/small3.txt")
        assert st.last_access_time != st.last_write_time
    assert image_files(tmp_path / "three").keys() != image_files(tmp_path / "one").keys()


def test_source_date_epoch_clamps_newer_times(tmp_path):
    src = tmp_path / "src"
    make_source(str(src))
    old = 1_500_000_000 * 10**9  # before the epoch below: kept as it is
    os.utime(src / "dir0" / "small0.txt", ns=(old, old))
    epoch = 1_600_000_000
    env = {"SOURCE_DATE_EPOCH": str(epoch)}
    (tmp_path / "one").mkdir()
    run_cli("create", src, tmp_path / "one" / "a.cim", env=env)
    # a fresh checkout: every other mtime moves to now, after the epoch
    for dp, _, fns in os.walk(src):
        for n in fns:
            if n != "small0.txt":
                os.utime(os.path.join(dp, n), follow_symlinks=False)
    (tmp_path / "two").mkdir()
    run_cli("create", src, tmp_path / "two" / "a.cim", env=env)
    assert image_files(tmp_path / "one") == image_files(tmp_path / "two")
    clamp = cimfs.filetime_from_ns(epoch * 10**9)
    with cimfs.open(tmp_path / "two" / "a.cim") as im:
        st = im.stat("dir1/small5.txt")
        assert st.last_write_time == st.creation_time == st.last_access_time == st.change_time == clamp
        assert im.stat("dir0/small0.txt").last_write_time == cimfs.filetime_from_ns(old)
    p = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "create", src, tmp_path / "bad.cim"],
        capture_output=True,
        env={**os.environ, "SOURCE_DATE_EPOCH": "yesterday"},
    )
    assert p.returncode != 0 and b"SOURCE_DATE_EPOCH" in p.stderr and not (tmp_path / "bad.cim").exists()


def fork_in(d, src, changes, **options) -> dict:
    """A consistent base of ``src`` in ``d``, then a fork of it with ``changes``."""
    d.mkdir()
    with cimfs.create(d, "base.cim", consistent=True, sync=False) as w:
        posix.DirectoryImporter(w, str(src)).run()
    with cimfs.create(d, "fork.cim", base="base.cim", consistent=True, sync=False, **options) as w:
        w.delete("dir3")
        w.add_file("dir0/new-small.txt", b"new")
        w.add_local_files(
            "dir1",
            [
                (
                    f"copy{i}.bin",
                    str(changes / f"c{i}.bin"),
                    cimfs.FileMetadata(file_size=os.path.getsize(changes / f"c{i}.bin"), last_write_time=7),
                )
                for i in range(4)
            ],
        )
    return image_files(d)


def test_same_parent_and_changes_give_the_same_fork(tmp_path):
    src = tmp_path / "src"
    make_source(str(src))
    changes = tmp_path / "changes"
    changes.mkdir()
    for i in range(4):  # two duplicate parent contents (deduplicated against it), two new ones
        data = (src / "dir0" / f"small{i}.txt").read_bytes() if i < 2 else os.urandom(1000 + 40_000 * (i - 2))
        (changes / f"c{i}.bin").write_bytes(data)
    a = fork_in(tmp_path / "a", src, changes, data_process=False)
    b = fork_in(tmp_path / "b", src, changes, data_process=2)
    assert a == b
    fork_sets = {n.split("_")[1] for n in a if n.startswith("region_")}
    assert len(fork_sets) == 2  # the parent's set and the fork's own
    with cimfs.open(tmp_path / "b" / "fork.cim") as im:
        assert im.read_bytes("dir1/copy3.bin") == (changes / "c3.bin").read_bytes()
        assert not im.exists("dir3")
        assert im.check() == []


def test_cli_fork_is_consistent(tmp_path):
    src = tmp_path / "src"
    make_source(str(src))
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "motd").write_bytes(b"hello\n" * 9000)
    results = []
    for n in ("one", "two"):
        d = tmp_path / n
        d.mkdir()
        run_cli("create", src, d / "base.cim")
        run_cli("fork", d / "base.cim", d / "v2.cim", "--add", f"{extra}:/etc", "--delete", "/dir2")
        results.append(image_files(d))
    assert results[0] == results[1]


def test_identical_images_share_one_region_set_and_rm_keeps_it(tmp_path):
    src = tmp_path / "src"
    make_source(str(src))
    d = tmp_path / "img"
    d.mkdir()
    for name in ("a.cim", "b.cim"):
        with cimfs.create(d, name, consistent=True, sync=False) as w:
            posix.DirectoryImporter(w, str(src)).run()
    files = os.listdir(d)
    assert (d / "a.cim").read_bytes() == (d / "b.cim").read_bytes()
    assert len({n.split("_")[1] for n in files if n.startswith("region_")}) == 1
    run_cli("rm", d / "a.cim")
    with cimfs.open(d / "b.cim") as im:
        assert im.read_bytes("dir0/small7.txt") == (src / "dir0" / "small7.txt").read_bytes()
        assert im.check() == []


def test_a_failed_commit_never_removes_a_set_another_image_uses(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    with cimfs.create(d, "a.cim", consistent=True, sync=False) as w:
        w.add_file("f", b"same" * 5000)
    before = image_files(d)
    w = cimfs.create(d, "b.cim", consistent=True, sync=False)
    w.add_file("f", b"same" * 5000)
    (d / "b.cim").write_bytes(b"appeared meanwhile")
    with pytest.raises(CimError) as e:
        w.commit()
    assert e.value.hresult == errors.ERROR_FILE_EXISTS
    w.close()
    after = image_files(d)
    del after["b.cim"]
    assert after == before
    with cimfs.open(d / "a.cim") as im:
        assert im.read_bytes("f") == b"same" * 5000


@pytest.mark.parametrize("data_process", [False, 2])
def test_a_vanished_source_fails_the_consistent_image(tmp_path, data_process):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_bytes(b"x" * 100)
    d = tmp_path / "img"
    d.mkdir()
    with pytest.raises(CimError) as e:
        with cimfs.create(d, "a.cim", consistent=True, data_process=data_process) as w:
            w.mkdir("dir")
            w.add_local_files(
                "dir",
                [
                    ("x", str(src / "x"), cimfs.FileMetadata(file_size=100)),
                    ("gone", str(src / "gone"), cimfs.FileMetadata(file_size=100)),
                ],
            )
    assert e.value.hresult == errors.ERROR_FILE_NOT_FOUND
    assert "dir\\gone" in str(e.value)
    assert os.listdir(d) == []


def write_tar(path, entries) -> None:
    """A PAX tar: (name, data or None for a directory, pax headers)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, pax in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            ti.pax_headers = dict(pax)
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))


@pytest.mark.parametrize("kind", ["posix", "windows-layer"])
def test_cli_create_from_a_tar_is_consistent(tmp_path, kind):
    if kind == "posix":  # no entry for the root or for "a": implied, with no time of their own
        entries = [("a/b/file.txt", b"x" * 100, {}), ("a/b/large.bin", bytes(range(256)) * 200, {}), ("c", None, {})]
    else:
        attr = {"MSWINDOWS.fileattr": "32"}
        entries = [
            ("Files", None, {"MSWINDOWS.fileattr": "16"}),
            ("Hives", None, {"MSWINDOWS.fileattr": "16"}),
            ("Files/f.txt", b"hello", attr),
            ("Files/big.bin", bytes(range(256)) * 200, attr),
        ]
    write_tar(tmp_path / "in.tar", entries)
    results = []
    for n in ("one", "two"):
        (tmp_path / n).mkdir()
        run_cli("create", "--format", kind, tmp_path / "in.tar", tmp_path / n / "a.cim")
        results.append(image_files(tmp_path / n))
    assert results[0] == results[1]
    if kind == "posix":
        with cimfs.open(tmp_path / "one" / "a.cim") as im:
            newest = cimfs.filetime_from_ns(1_700_000_000 * 10**9)
            assert im.stat("").last_write_time == im.stat("a").last_write_time == newest


def test_local_files_after_stats_stay_consistent(tmp_path):
    """stats() waits for the copies; a large file added after it is copied by
    the caller (never by a data thread whose region numbers follow timing)."""
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 400)
    results = []
    for n, dp in (("a", False), ("b", 2)):
        d = tmp_path / n
        d.mkdir()
        with cimfs.create(d, "x.cim", consistent=True, sync=False, data_process=dp) as w:
            w.add_file("one", big)
            assert w.stats()["bytes_logical"] == 102400
            w.add_file("two", big)
            w.add_file("three", b"bytes" * 10000)
        results.append(image_files(d))
        with cimfs.open(d / "x.cim") as im:
            assert im.read_bytes("two") == big.read_bytes()
    assert results[0] == results[1]


def test_consistent_fork_of_a_plain_parent_keeps_its_unchanged_entries(tmp_path):
    src = tmp_path / "src"
    make_source(str(src))
    d = tmp_path / "img"
    d.mkdir()
    run_cli("create", "--no-consistent", src, d / "base.cim")
    (src / "dir0" / "small0.txt").write_bytes(b"changed")
    run_cli("create", src, d / "v2.cim", "--fork-from", d / "base.cim")
    with cimfs.open(d / "base.cim") as base, cimfs.open(d / "v2.cim") as v2:
        assert v2.stat("dir1/small4.txt") == base.stat("dir1/small4.txt")  # kept: its record, its atime
        assert v2.read_bytes("dir0/small0.txt") == b"changed"
        st = v2.stat("dir0/small0.txt")
        assert st.last_access_time == st.last_write_time  # written by the consistent import
        own = v2.header.region_set.id
    own_bytes = sum(os.path.getsize(d / n) for n in os.listdir(d) if str(own) in n)
    base_bytes = sum(os.path.getsize(d / n) for n in os.listdir(d) if n.startswith("region_") and str(own) not in n)
    assert own_bytes < base_bytes // 4  # only what changed, not every record again
