"""gc and rm: nothing an image in the directory refers to is ever removed,
whatever the image's name; what no image refers to is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cimfs
from cimfs import tools
from cimfs.errors import ERROR_INVALID_NAME, CimError, CimFormatError
from cimfs.layout import cim


def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "cimfs.cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def region_files(d) -> set[str]:
    return {n for n in os.listdir(d) if cim.REGION_FILE_NAME.match(n)}


def own_set(path) -> str:
    with cimfs.open(path) as img:
        return img.info()["region_set"]["id"].lower()


def files_of(d, set_id) -> set[str]:
    return {n for n in region_files(d) if set_id in n.lower()}


def write(d, name, files: dict, base=None):
    with cimfs.create(str(d), name, base=base) as w:
        for path, data in files.items():
            w.add_file(path, data)


def read_all(path) -> dict:
    with cimfs.open(path) as img:
        return {p: img.read_bytes(p) for p in ("a", "b", "c") if img.exists(p)}


@pytest.fixture
def family(tmp_path):
    """base.img <- child (fork), plus other.cim: three images, two without .cim."""
    d = tmp_path / "images"
    d.mkdir()
    write(d, "base.img", {"a": b"A" * 50000, "b": b"bee"})
    write(d, "child", {"c": b"C" * 40000}, base="base.img")
    write(d, "other.cim", {"a": b"other"})
    return d


def test_gc_keeps_every_image_whatever_its_name(family):
    d = family
    before = set(os.listdir(d))
    expected = {n: read_all(d / n) for n in ("base.img", "child", "other.cim")}
    assert tools.gc(str(d)) == []
    assert set(os.listdir(d)) == before
    for n, content in expected.items():
        assert read_all(d / n) == content
    # an orphan set (a killed writer's) goes, and only it
    orphan = ["region_01234567-89ab-cdef-0123-456789abcdef_0", "objectid_01234567-89ab-cdef-0123-456789abcdef_0"]
    for n in orphan:
        (d / n).write_bytes(b"")
    removed = {os.path.basename(p) for p, _ in tools.gc(str(d))}
    assert removed == set(orphan) and set(os.listdir(d)) == before


def test_rm_keeps_what_images_with_other_names_need(family):
    d = family
    base_set, child_set, other_set = (own_set(d / n) for n in ("base.img", "child", "other.cim"))
    expected_child = read_all(d / "child")
    # the parent goes, its region files stay: "child" refers to them
    removed = {os.path.basename(p) for p, _ in tools.rm_image(str(d / "base.img"))}
    assert removed == {"base.img"}
    assert files_of(d, base_set) and read_all(d / "child") == expected_child
    # then the child: its own and its parent's sets are free now
    removed = {os.path.basename(p) for p, _ in tools.rm_image(str(d / "child"))}
    assert removed == {"child"} | files_of_removed(base_set, child_set, removed)
    assert region_files(d) == files_of(d, other_set) and read_all(d / "other.cim") == {"a": b"other"}
    assert not any(base_set in n or child_set in n for n in os.listdir(d))


def files_of_removed(base_set, child_set, removed):
    return {n for n in removed if base_set in n or child_set in n}


def test_cli_rm_of_a_region_file_or_a_non_image_is_refused(family):
    d = family
    before = set(os.listdir(d))
    region = sorted(region_files(d))[0]
    (d / "notes.txt").write_text("not an image")
    for victim in (region, "notes.txt"):
        p = cli("rm", d / victim, check=False)
        assert p.returncode == 1 and "not a CIM image" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert set(os.listdir(d)) == before | {"notes.txt"}


def test_an_image_with_an_unreadable_header_keeps_every_region_file(family):
    d = family
    before = set(os.listdir(d))
    # starts like an image, but its parent list is cut off
    head = (d / "child").read_bytes()[: cim.FILESYSTEM_HEADER.size + 3]
    (d / "broken").write_bytes(head)
    with pytest.raises(CimError, match="cannot be read; nothing removed"):
        tools.gc(str(d))
    p = cli("gc", d, check=False)
    assert p.returncode == 1
    # rm of another image removes only that image's file
    removed = {os.path.basename(p) for p, _ in tools.rm_image(str(d / "other.cim"))}
    assert removed == {"other.cim"}
    assert set(os.listdir(d)) == before - {"other.cim"} | {"broken"}
    with pytest.raises(CimFormatError):
        tools.image_region_sets(str(d / "broken"))


def test_gc_removes_a_killed_commits_temporary_file(family):
    d = family
    write(d, "gone.cim", {"b": b"gone" * 3000})
    gone_set = own_set(d / "gone.cim")
    # what a writer killed between writing and renaming its .cim leaves
    os.rename(d / "gone.cim", d / ".gone.cim.0123456789ab.tmp")
    removed = {os.path.basename(p) for p, _ in tools.gc(str(d))}
    assert removed == {".gone.cim.0123456789ab.tmp"} | files_of_removed(gone_set, gone_set, removed)
    assert any(gone_set in n for n in removed) and not files_of(d, gone_set)


def test_reserved_names_cannot_name_an_image(tmp_path):
    for name in (
        "region_01234567-89ab-cdef-0123-456789abcdef_0",
        ".x.cim.0123456789ab.tmp",
        "objectid_01234567-89AB-cdef-0123-456789abcdef_12",
    ):
        with pytest.raises(CimError) as e:
            cimfs.create(str(tmp_path), name)
        assert e.value.hresult == ERROR_INVALID_NAME
    assert os.listdir(tmp_path) == []


def test_gc_never_opens_a_fifo_for_long(family):
    d = family
    os.mkfifo(d / "pipe")
    os.mkdir(d / "sub")
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock"))
    try:
        assert tools.gc(str(d)) == []  # would block forever on a blocking open
    finally:
        sock.close()
    assert (d / "pipe").exists() and (d / "sock").exists()
