"""Merged images, tombstones and merge links (issue 13): layers converted on
their own and merged give the tree a fork chain of the same layers gives."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tarfile

import pytest
from test_winlayer import D, Entry, F, assert_same_images, write_tar

import cimfs
from cimfs import CimError, FileMetadata, tools, winlayer

E_INVALIDARG = 0x80070057
E_NOTIMPL = 0x80004001
ERROR_FILE_NOT_FOUND = 0x80070002
WCI_TOMBSTONE = 0xA000001F
BIG = bytes(range(256)) * 4096  # 1 MiB of contents the merged image must not copy


def own_region_bytes(cim_path) -> tuple[int, int]:
    """(bytes of the image's own region files, bytes of all region files it lists)."""
    with cimfs.open(cim_path) as img:
        own = img.region_sets[-1]
        d = img.directory
        own_bytes = sum(os.path.getsize(os.path.join(d, own.file_name("region", i))) for i in range(own.count))
        listed = sum(
            os.path.getsize(os.path.join(d, rs.file_name("region", i)))
            for rs in img.region_sets[:-1]
            for i in range(rs.count)
        )
    return own_bytes, listed


# ------------------------------------------------------------------ the Win32 shape and the format
def test_tombstone_and_merge_link_read_alone_as_stored(tmp_path):
    h = cimfs.CimCreateImage(tmp_path, None, "layer.cim")
    cimfs.CimCloseStream(cimfs.CimCreateFile(h, "d", FileMetadata(attributes=0x10)))
    cimfs.CimTombstoneFile(h, "d\\deleted.txt")
    cimfs.CimTombstoneFile(h, "gone-dir")
    cimfs.CimCreateMergeLink(h, "d\\link", "lower\\file.txt")
    cimfs.CimCommitImage(h)
    cimfs.CimCloseImage(h)
    with cimfs.open(tmp_path / "layer.cim") as img:
        assert sorted(img.tombstones()) == ["d\\deleted.txt", "gone-dir"]
        assert img.merge_links() == [("d\\link", "lower\\file.txt")]
        st = img.stat("gone-dir")
        assert not st.is_dir and st.size == 0 and st.reparse_tag == WCI_TOMBSTONE
        assert st.reparse_data == struct.pack("<IHH", WCI_TOMBSTONE, 0, 0)
        link = img.stat("d\\link")
        assert link.size == 0 and link.reparse_tag & 0x80000000 == 0  # a non-Microsoft tag, with a GUID
    assert tools.fsck(str(tmp_path / "layer.cim")) == []


def test_tombstone_replaces_what_the_image_has_there(tmp_path):
    with cimfs.create(tmp_path, "l.cim") as w:
        w.mkdir("dir")
        w.add_file("dir\\f", b"f")
        w.tombstone("dir")
        with pytest.raises(CimError) as e:
            w.tombstone("")
        assert e.value.hresult == E_INVALIDARG
    with cimfs.open(tmp_path / "l.cim") as img:
        assert img.tombstones() == ["dir"] and img.listdir("") == ["dir"]


def _layers(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    with cimfs.create(d, "base.cim") as w:
        w.mkdir("a", FileMetadata(attributes=0x12, last_write_time=133_000_000_000_000_000))
        w.add_file("a\\x.txt", BIG)
        w.add_file("a\\y.txt", b"old y")
        w.mkdir("gone")
        w.add_file("gone\\f", b"f")
        w.add_file("s", b"with stream")
        w.add_stream("s:ads", b"ads bytes")
    with cimfs.create(d, "top.cim") as w:
        w.mkdir("a")
        w.add_file("a\\y.txt", b"new y")
        w.tombstone("gone")
        w.merge_link("a\\x-link", "a\\x.txt")
        w.mkdir("new")
    return d


def test_merged_image_win32(tmp_path):
    d = _layers(tmp_path)
    h = cimfs.CimCreateImage(d, None, "merged.cim")
    cimfs.CimAddFsToMergedImage(h, "top.cim")
    cimfs.CimAddFsToMergedImage2(h, str(d / "base.cim"), 0)
    with pytest.raises(CimError) as e:
        cimfs.CimCreateFile(h, "extra", FileMetadata())
    assert e.value.hresult == E_INVALIDARG
    cimfs.CimCommitImage(h)
    cimfs.CimCloseImage(h)
    with cimfs.open(d / "merged.cim") as img:
        assert sorted(img.listdir("")) == ["a", "new", "s"]
        assert sorted(img.listdir("a")) == ["x-link", "x.txt", "y.txt"]
        assert img.read_bytes("a\\y.txt") == b"new y"
        assert img.read_bytes("a\\x-link") == BIG
        assert img.stat("a\\x-link").file_id == img.stat("a\\x.txt").file_id and img.nlink("a\\x.txt") == 2
        assert img.read_bytes("s", stream="ads") == b"ads bytes"
        assert img.tombstones() == [] and img.merge_links() == []
        assert len(img.region_sets) == 3  # base's, top's and its own
    assert tools.fsck(str(d / "merged.cim")) == []
    own, sources = own_region_bytes(d / "merged.cim")
    assert own <= 0.03 * sources, (own, sources)


def test_merge_refusals(tmp_path):
    d = _layers(tmp_path)
    for flags, hr in ((1, E_NOTIMPL), (2, E_NOTIMPL), (4, E_NOTIMPL), (8, E_INVALIDARG), (-1, E_INVALIDARG)):
        h = cimfs.CimCreateImage(d, None, "m.cim")
        try:
            with pytest.raises(CimError) as e:
                cimfs.CimAddFsToMergedImage2(h, "base.cim", flags)
            assert e.value.hresult == hr, flags
        finally:
            cimfs.CimCloseImage(h)
    other = tmp_path / "other"
    other.mkdir()
    with cimfs.create(other, "o.cim") as w:
        w.add_file("f", b"f")
    h = cimfs.CimCreateImage(d, None, "m.cim")
    try:
        with pytest.raises(CimError) as e:
            cimfs.CimAddFsToMergedImage(h, str(other / "o.cim"))
        assert e.value.hresult == E_INVALIDARG
        with pytest.raises(CimError) as e:
            cimfs.CimAddFsToMergedImage(h, "missing.cim")
        assert e.value.hresult == ERROR_FILE_NOT_FOUND
        cimfs.CimAddFsToMergedImage(h, "base.cim")
        with pytest.raises(CimError) as e:
            cimfs.CimAddFsToMergedImage(h, "base.cim")
        assert e.value.hresult == E_INVALIDARG
    finally:
        cimfs.CimCloseImage(h)
    # a change first, then a source: refused
    h = cimfs.CimCreateImage(d, None, "m.cim")
    try:
        cimfs.CimCloseStream(cimfs.CimCreateFile(h, "f", FileMetadata()))
        with pytest.raises(CimError) as e:
            cimfs.CimAddFsToMergedImage(h, "base.cim")
        assert e.value.hresult == E_INVALIDARG
    finally:
        cimfs.CimCloseImage(h)
    # a merge link whose target no layer below has
    with cimfs.create(d, "dangling.cim") as w:
        w.merge_link("l", "no\\such")
    with pytest.raises(CimError) as e:
        cimfs.merge(d, "m.cim", ["dangling.cim", "base.cim"])
    assert e.value.hresult == ERROR_FILE_NOT_FOUND and "no\\such" in str(e.value)
    assert not (d / "m.cim").exists()
    assert sorted(p for p in os.listdir(d) if p.endswith(".cim")) == ["base.cim", "dangling.cim", "top.cim"]


def test_merging_a_fork_chain_gives_its_top(tmp_path):
    d = _layers(tmp_path)
    with cimfs.create(d, "f1.cim", base="base.cim") as w:
        w.add_file("a\\z", b"z")
        w.delete("gone")
    with cimfs.create(d, "f2.cim", base="f1.cim") as w:
        w.add_file("a\\y.txt", b"y2")
    cimfs.merge(d, "m.cim", ["f2.cim", "f1.cim", "base.cim"])
    assert_same_images(d / "m.cim", d / "f2.cim")
    with cimfs.open(d / "m.cim") as img:
        assert len(img.region_sets) == 4  # the chain's three sets once each, then its own


# ------------------------------------------------------------------ the acceptance test
def layer_tars(tmp_path):
    base = write_tar(
        tmp_path / "base.tar",
        [
            D("Files"),
            D("Files/keep"),
            F("Files/keep/a.txt", b"a"),
            F("Files/big.bin", BIG),
            F("Files/gone.txt", b"gone"),
            D("Files/dir", attrs=0x12),
            F("Files/dir/x", b"x"),
            D("Files/dir/sub"),
            F("Files/dir/sub/y", b"y"),
            D("Files/opaque"),
            F("Files/opaque/old1", b"1"),
            D("Files/replaced"),
            F("Files/replaced/old", b"old"),
            F("Files/shared.dll", b"dll v1"),
            F("Files/shared.dll:Zone.Identifier:$DATA", b"zone"),
            D("Files/whole"),
            D("Files/whole/deep"),
            F("Files/whole/deep/f", b"deep"),
            D("Files/cleared", attrs=0x14),
            F("Files/cleared/old", b"old"),
            D("Hives"),
            F("Hives/notes.txt", b"v1"),  # not a hive delta: a fake one would fail the hive merge
        ],
    )
    mid = write_tar(
        tmp_path / "mid.tar",
        [
            Entry("Files/.wh.gone.txt"),
            F("Files/shared.dll", b"dll v2"),
            Entry("Files/keep/a-link", tarfile.LNKTYPE, linkname="Files/keep/a.txt"),  # to a lower file
            Entry("Files/big-link", tarfile.LNKTYPE, linkname="Files/big.bin"),
            D("Files/opaque"),
            Entry("Files/opaque/.wh..wh..opq"),
            F("Files/opaque/new", b"new"),
            F("Files/dir/sub/z", b"z"),  # no entries for its parents: their metadata stays the lower one's
            Entry("Files/cleared/.wh..wh..opq"),  # opaque, not listed itself: emptied, its metadata stays
            F("Files/cleared/mine", b"mine"),
            Entry("Files/nothere/.wh.x"),  # below a directory no layer has: nothing
            Entry("Files/nothere2/.wh..wh..opq"),
            F("Files/implicit/deeper/f", b"f"),  # new directories the tar does not list
            D("Files/newdir"),
            F("Files/newdir/n", b"n"),
            F("Hives/notes.txt", b"v2"),
        ],
    )
    top = write_tar(
        tmp_path / "top.tar",
        [
            Entry("Files/.wh.whole"),  # a whole directory of the base
            Entry("Files/dir/sub/.wh.y"),
            D("Files/replaced"),
            F("Files/replaced/new", b"new"),
            Entry("Files/.wh.replaced"),
            F("Files/keep/a.txt", b"a modified"),  # a-link keeps the old file
            Entry("Files/newdir/n-link", tarfile.LNKTYPE, linkname="Files/newdir/n"),  # to the middle layer
            D("Files/newer"),
            F("Files/newer/t", b"t"),
            Entry("Files/.wh.nonexistent"),
        ],
    )
    return [base, mid, top]


def test_merged_independent_layers_equal_the_fork_chain(tmp_path):
    tars = layer_tars(tmp_path)
    d = tmp_path / "img"
    d.mkdir()
    winlayer.import_layers(tars, d, ["c0.cim", "c1.cim", "c2.cim"])
    for i, tar in enumerate(tars):
        run = subprocess.run(
            [sys.executable, "-m", "cimfs.cli", "create", "--independent", tar, str(d / f"i{i}.cim")],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
    with cimfs.open(d / "i1.cim") as img:
        assert sorted(img.tombstones()) == ["Files\\gone.txt", "Files\\nothere\\x"]
        assert sorted(img.merge_links()) == [
            ("Files\\big-link", "Files\\big.bin"),
            ("Files\\keep\\a-link", "Files\\keep\\a.txt"),
        ]
        assert sorted(img.opaque_dirs()) == ["Files\\cleared", "Files\\nothere2", "Files\\opaque"]
    with cimfs.open(d / "i2.cim") as img:
        assert sorted(img.tombstones()) == ["Files\\dir\\sub\\y", "Files\\nonexistent", "Files\\whole"]
        assert "Files\\replaced" in img.opaque_dirs()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cimfs.cli",
            "merge",
            str(d / "merged.cim"),
            str(d / "i2.cim"),
            str(d / "i1.cim"),
            str(d / "i0.cim"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "diff", str(d / "merged.cim"), str(d / "c2.cim")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and run.stdout == "" and run.stderr == "", (run.stdout, run.stderr)
    assert_same_images(d / "merged.cim", d / "c2.cim")  # every field, stream and hard link group
    with cimfs.open(d / "merged.cim") as img:
        assert img.read_bytes("Files\\keep\\a-link") == b"a"
        assert img.stat("Files\\newdir\\n-link").file_id == img.stat("Files\\newdir\\n").file_id
        assert img.stat("Files\\dir").attributes & 0x2  # the base's metadata (hidden) stays
        assert img.listdir("Files\\cleared") == ["mine"] and img.stat("Files\\cleared").attributes & 0x4
        assert not img.exists("Files\\nothere") and not img.exists("Files\\nothere2")
    run = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "fsck", str(d / "merged.cim")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    own, sources = own_region_bytes(d / "merged.cim")
    assert own <= 0.03 * sources, (own, sources)
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "extract", str(d / "merged.cim"), str(out)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert (out / "Files" / "big-link").read_bytes() == BIG
    assert os.stat(out / "Files" / "big-link").st_ino == os.stat(out / "Files" / "big.bin").st_ino
    assert not (out / "Files" / "whole").exists() and not (out / "Files" / "gone.txt").exists()


def test_cli_merge_refuses_sources_elsewhere(tmp_path):
    d = _layers(tmp_path)
    other = tmp_path / "o"
    other.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "merge", str(other / "m.cim"), str(d / "top.cim")],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and "directory" in run.stderr
    assert not (other / "m.cim").exists()


def test_merge_markers_are_recognised_only_with_the_cimfs_guid(tmp_path):
    from cimfs.layout import ntfs

    foreign = struct.pack("<IHH", ntfs.IO_REPARSE_TAG_CIMFS_MERGE, 24, 0) + bytes(16) + struct.pack("<II", 1, 0)
    bad_kind = (
        struct.pack("<IHH", ntfs.IO_REPARSE_TAG_CIMFS_MERGE, 20, 0) + ntfs.CIMFS_MERGE_GUID + struct.pack("<I", 7)
    )
    with cimfs.create(tmp_path, "base.cim") as w:
        w.add_file("t", b"target")
    with cimfs.create(tmp_path, "top.cim") as w:
        w.add_file("foreign", b"", FileMetadata(reparse_data=foreign))
    cimfs.merge(tmp_path, "m.cim", ["top.cim", "base.cim"])
    with cimfs.open(tmp_path / "m.cim") as img:
        st = img.stat("foreign")  # somebody else's reparse point with our tag: data, kept as it is
        assert st.reparse_data == foreign and img.merge_links() == []
    with cimfs.create(tmp_path, "bad.cim") as w:
        w.add_file("x", b"", FileMetadata(reparse_data=bad_kind))
    with pytest.raises(cimfs.CimFormatError) as e:
        cimfs.merge(tmp_path, "m2.cim", ["bad.cim", "base.cim"])
    assert "x" in str(e.value) and "kind 7" in str(e.value)
    assert not (tmp_path / "m2.cim").exists()
    with cimfs.open(tmp_path / "bad.cim") as img, pytest.raises(cimfs.CimFormatError):
        img.merge_links()


def test_windows_order_merged_image_first_gives_the_merged_image(tmp_path):
    d = _layers(tmp_path)
    cimfs.merge(d, "m.cim", ["top.cim", "base.cim"])
    cimfs.merge(d, "again.cim", ["m.cim", "top.cim", "base.cim"])
    assert_same_images(d / "again.cim", d / "m.cim")
    with cimfs.open(d / "again.cim") as img:
        assert not img.exists("gone")  # the tombstone's effect is not undone by the layers below


def test_merged_images_are_consistent(tmp_path):
    d = _layers(tmp_path)
    cimfs.merge(d, "m1.cim", ["top.cim", "base.cim"])
    cimfs.merge(d, "m2.cim", ["top.cim", "base.cim"])
    # the same sources give the same bytes, and so the same (shared) region set
    assert (d / "m1.cim").read_bytes() == (d / "m2.cim").read_bytes()
    h = cimfs.CimCreateImage2(d, cimfs.CimCreateFlags.CONSISTENT_CIM, None, "m3.cim")
    cimfs.CimAddFsToMergedImage(h, "top.cim")
    cimfs.CimAddFsToMergedImage(h, "base.cim")
    cimfs.CimCommitImage(h)
    cimfs.CimCloseImage(h)
    assert (d / "m3.cim").read_bytes() == (d / "m1.cim").read_bytes()
    cimfs.merge(d, "r.cim", ["top.cim", "base.cim"], consistent=False)
    assert (d / "r.cim").read_bytes() != (d / "m1.cim").read_bytes()  # a random region set id
    assert_same_images(d / "r.cim", d / "m1.cim")


def test_tombstone_and_merge_link_errors(tmp_path):
    ERROR_PATH_NOT_FOUND, ERROR_ALREADY_EXISTS, E_HANDLE = 0x80070003, 0x800700B7, 0x80070006
    ERROR_INVALID_NAME = 0x8007007B
    h = cimfs.CimCreateImage(tmp_path, None, "l.cim")
    try:
        cimfs.CimCloseStream(cimfs.CimCreateFile(h, "f", FileMetadata()))
        for call, args, hr in (
            (cimfs.CimTombstoneFile, ("f\\x",), ERROR_PATH_NOT_FOUND),
            (cimfs.CimTombstoneFile, ("f:stream",), ERROR_INVALID_NAME),
            (cimfs.CimTombstoneFile, ("a*b",), ERROR_INVALID_NAME),
            (cimfs.CimCreateMergeLink, ("f", "lower\\x"), ERROR_ALREADY_EXISTS),
            (cimfs.CimCreateMergeLink, ("f\\y", "lower\\x"), ERROR_PATH_NOT_FOUND),
            (cimfs.CimCreateMergeLink, ("l", "lower\\x:s"), ERROR_INVALID_NAME),
            (cimfs.CimCreateMergeLink, ("l", ""), 0x80070005),
        ):
            with pytest.raises(CimError) as e:
                call(h, *args)
            assert e.value.hresult == hr, (call.__name__, args, hex(e.value.hresult))
        cimfs.CimCommitImage(h)
        with pytest.raises(CimError) as e:
            cimfs.CimTombstoneFile(h, "g")
        assert e.value.hresult == E_INVALIDARG  # after commit
    finally:
        cimfs.CimCloseImage(h)
    for call, args in (
        (cimfs.CimTombstoneFile, ("g",)),
        (cimfs.CimCreateMergeLink, ("a", "b")),
        (cimfs.CimAddFsToMergedImage, ("l.cim",)),
        (cimfs.CimAddFsToMergedImage2, ("l.cim", 0)),
    ):
        with pytest.raises(CimError) as e:
            call(h, *args)
        assert e.value.hresult == E_HANDLE


def test_independent_layers_export_back_to_the_same_tars(tmp_path):
    """Tombstones go out as whiteouts, merge links as hard link entries and marked
    directories as they came in, so exporting and importing again changes nothing."""
    tars = layer_tars(tmp_path)
    d = tmp_path / "img"
    d.mkdir()
    winlayer.import_layers(tars, d, ["c0.cim", "c1.cim", "c2.cim"])
    for i, tar in enumerate(tars):
        winlayer.import_layer(tar, d, f"i{i}.cim", independent=True)
        out = tmp_path / f"again{i}.tar"
        winlayer.export_layer(str(d / f"i{i}.cim"), str(out), independent=True)
        winlayer.import_layer(str(out), d, f"j{i}.cim", independent=True)
        assert_same_images(d / f"j{i}.cim", d / f"i{i}.cim")
    with tarfile.open(tmp_path / "again1.tar") as tf:
        links = {m.name: m.linkname for m in tf if m.islnk()}
        assert links == {"Files/keep/a-link": "Files/keep/a.txt", "Files/big-link": "Files/big.bin"}
        assert "Files/.wh.gone.txt" in tf.getnames() and "Files/opaque/.wh..wh..opq" in tf.getnames()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cimfs.cli",
            "export",
            str(d / "i2.cim"),
            str(tmp_path / "cli.tar"),
            "--format",
            "windows-layer",
            "--independent",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "cli.tar").read_bytes() == (tmp_path / "again2.tar").read_bytes()
    # the exported tars also import as a fork chain to the same tree
    winlayer.import_layers([str(tmp_path / f"again{i}.tar") for i in range(3)], d, ["k0.cim", "k1.cim", "k2.cim"])
    assert_same_images(d / "k2.cim", d / "c2.cim")


def test_missing_parents_of_tombstones_and_merge_links_change_nothing_below(tmp_path):
    d = _layers(tmp_path)
    with cimfs.create(d, "thin.cim") as w:  # no directory entries of its own
        w.tombstone("a\\y.txt")
        w.merge_link("a\\deep\\x-again", "a\\x.txt")
        w.tombstone("nowhere\\below\\z")
    with cimfs.open(d / "thin.cim") as img:
        assert sorted(img.tombstones()) == ["a\\y.txt", "nowhere\\below\\z"]
    cimfs.merge(d, "m.cim", ["thin.cim", "base.cim"])
    with cimfs.open(d / "m.cim") as img, cimfs.open(d / "base.cim") as base:
        assert sorted(img.listdir("")) == ["a", "gone", "s"]  # no "nowhere"
        assert sorted(img.listdir("a")) == ["deep", "x.txt"]
        assert img.stat("a\\deep\\x-again").file_id == img.stat("a\\x.txt").file_id
        a, b = img.stat("a"), base.stat("a")
        assert b.attributes & 0x2 and b.last_write_time
        assert (a.attributes, a.last_write_time, a.security_descriptor) == (
            b.attributes,
            b.last_write_time,
            b.security_descriptor,
        )


def test_merged_view_refusals_before_anything_is_made(tmp_path, monkeypatch):
    from cimfs import mount as cmount

    monkeypatch.setenv("CIMFS_RUNTIME_DIR", str(tmp_path / "registry"))
    d = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for paths, kw in (
        ([d / "top.cim", d / "base.cim"], {"engine": "warp"}),
        (["https://example.invalid/top.cim", d / "base.cim"], {}),
    ):
        with pytest.raises(CimError) as e:
            cmount.mount_merged([str(p) for p in paths], str(mnt), **kw)
        assert e.value.hresult == E_INVALIDARG
    with pytest.raises(CimError) as e:
        cmount.mount_merged([str(d / "top.cim"), str(d / "missing.cim")], str(mnt))
    assert e.value.hresult == ERROR_FILE_NOT_FOUND
    assert not [n for n in os.listdir(tmp_path / "registry") if n.startswith("merged-")]
    assert os.listdir(mnt) == []


def test_failed_merged_view_names_the_users_source(tmp_path, monkeypatch):
    """Issue 22 item 17: a source damaged where the merge reads it is named
    by the path the user gave, never by the private (and already removed)
    ``merged-XXXX/layerN.cim`` that stood for it."""
    from test_hostile import Patch

    from cimfs import mount as cmount

    registry = tmp_path / "registry"
    monkeypatch.setenv("CIMFS_RUNTIME_DIR", str(registry))
    d = _layers(tmp_path)
    lower = tmp_path / "lower"
    lower.mkdir()
    with cimfs.open(d / "base.cim") as img:
        own = str(img.region_sets[-1].id).lower()
    for p in d.glob("*"):  # the base in a directory of its own
        if p.name == "base.cim" or own in p.name.lower():
            os.rename(p, lower / p.name)
    with cimfs.open(lower / "base.cim") as img:
        a = img.lookup("a")
    patch = Patch(lower / "base.cim")
    ro, table = patch.link_table(a)
    patch.write(ro + 8, struct.pack("<I", 99_999))  # a's first entry names a FileID no table holds
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(cimfs.CimFormatError) as e:
        cmount.mount_merged([str(d / "top.cim"), str(lower / "base.cim")], str(mnt))
    assert e.value.filename == str(lower / "base.cim") and "FileID 99999" in e.value.strerror
    assert "merged-" not in str(e.value)
    assert not [n for n in os.listdir(registry) if n.startswith("merged-")] and os.listdir(mnt) == []
    p = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "mount", d / "top.cim", lower / "base.cim", mnt],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CIMFS_RUNTIME_DIR": str(registry)},
    )
    assert p.returncode == 1 and p.stderr.strip() == f"cimfs: {lower / 'base.cim'}: {e.value.strerror}", p.stderr
