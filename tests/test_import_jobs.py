"""``import-image --jobs 2`` (issue 23): the layers read ahead in a forked
reader process give the store ``--jobs 1`` gives, byte for byte, and a
failure in any layer leaves the store as it was, with the same message."""

from __future__ import annotations

import filecmp
import io
import json
import os
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ocihelp import layer_tar, sha, write_layout
from test_hive_import import (
    BASE_HIVES,
    CONFIG,
    cli,
    one_line_error,
    software_delta,
    system_delta,
    tree_snapshot,
)

import cimfs


def big(seed: int, size: int) -> bytes:
    """Several 1 MiB chunks, one of them zeros (a hole), the rest not."""
    block = bytes((seed * 31 + i * 7) & 0xFF for i in range(4096))
    data = bytearray(block * (size // 4096 + 1))[:size]
    data[1 << 20 : 2 << 20] = bytes(1 << 20)
    return bytes(data)


def three_layers() -> list[bytes]:
    base = [("dir", "Files"), ("dir", "Files/Windows"), ("dir", "Files/Windows/System32"), ("dir", CONFIG)]
    base += [("file", f"{CONFIG}/{name}", make()) for name, make in BASE_HIVES.items()]
    base += [
        ("dir", "Files/app"),
        ("file", "Files/app/a.txt", b"a" * 100),
        ("file", "Files/app/b.bin", big(1, 3 << 20)),
        ("dir", "Files/app/sub"),
        ("file", "Files/app/sub/c.txt", b"c"),
        ("file", "Files/keep.txt", b"k"),
    ]
    base += [("file", f"Files/many/f{i:03d}.txt", f"file {i}\n".encode() * (i + 1)) for i in range(200)]
    second = [
        ("dir", "Hives"),
        ("file", "Hives/System_Delta", system_delta(1)),
        ("whiteout", "Files/app/a.txt"),
        ("opaque", "Files/app/sub"),
        ("file", "Files/app/sub/d.txt", b"d"),
        ("link", "Files/keep2.txt", "Files/keep.txt"),
        ("file", "Files/app/b.bin", big(2, (2 << 20) + 5)),
        ("file", "Files/dup.bin", big(1, 3 << 20)),
    ]  # the base layer's contents again: stored once
    third = [
        ("dir", "Hives"),
        ("file", "Hives/SYSTEM_DELTA", system_delta(2)),
        ("file", "Hives/SOFTWARE_DELTA", software_delta()),
        ("whiteout", "Files/many"),
        ("file", "Files/three.txt", b"3" * 5000),
    ]
    return [layer_tar(base), layer_tar(second), layer_tar(third)]


def same_tree(a, b) -> None:
    """Both stores hold the same files with the same bytes."""
    names_a = sorted(os.path.relpath(os.path.join(r, n), a) for r, _, fs in os.walk(a) for n in fs)
    names_b = sorted(os.path.relpath(os.path.join(r, n), b) for r, _, fs in os.walk(b) for n in fs)
    assert names_a == names_b
    names = [n for n in names_a if n != "lock"]
    _same, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


@pytest.mark.parametrize("independent", [False, True])
def test_jobs_2_gives_the_store_jobs_1_gives(tmp_path, independent):
    write_layout(tmp_path / "lay", three_layers(), compression="gzip")
    extra = ["--independent"] if independent else []
    reports = {}
    for jobs in ("1", "2"):
        p = cli("import-image", *extra, tmp_path / "lay", tmp_path / f"s{jobs}", "--jobs", jobs, "--json")
        reports[jobs] = json.loads(p.stdout)
    same_tree(tmp_path / "s1", tmp_path / "s2")
    for a, b in zip(reports["1"]["layers"], reports["2"]["layers"]):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    assert [layer["status"] for layer in reports["2"]["layers"]] == ["new"] * 3
    assert reports["2"]["layers"][2]["hive_bases"] == ["Hives\\SYSTEM_BASE", "Hives\\SOFTWARE_BASE"]
    # what the layers say, read back from the top image
    top = reports["2"]["top"]
    with cimfs.open(top) as img:
        assert not img.exists("Files\\app\\a.txt") and not img.exists("Files\\many")
        assert img.read_bytes("Files\\app\\b.bin") == big(2, (2 << 20) + 5)
        assert img.read_bytes("Files\\dup.bin") == big(1, 3 << 20)
        assert img.read_bytes("Files\\keep2.txt") == b"k"
        assert sorted(e.name for e in img.scandir("Files\\app\\sub")) == ["d.txt"]
        assert img.read_bytes("Files\\three.txt") == b"3" * 5000
    # imported again with --jobs 2: every layer reused, nothing read
    again = json.loads(cli("import-image", *extra, tmp_path / "lay", tmp_path / "s2", "--jobs", "2", "--json").stdout)
    assert [layer["status"] for layer in again["layers"]] == ["reused"] * 3
    same_tree(tmp_path / "s1", tmp_path / "s2")


def damaged(layers: list[bytes], how: str) -> tuple[list, dict]:
    """The layout's third layer spoilt ``how``: (layer tars, write_layout keywords)."""
    if how == "diff-id":  # a tar that is not the one the config names
        return layers, {"diff_ids": [sha(t) for t in layers[:2]] + [sha(layers[2] + bytes(512))]}
    if how == "member":  # a member the import refuses (a device), after others were applied
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            ti = tarfile.TarInfo("Files/x.txt")
            ti.size = 3
            tf.addfile(ti, io.BytesIO(b"xyz"))
            ti = tarfile.TarInfo("Files/dev")
            ti.type = tarfile.CHRTYPE
            tf.addfile(ti)
        return layers[:2] + [buf.getvalue()], {}
    raise ValueError(how)


@pytest.mark.parametrize("how", ["diff-id", "member", "truncated-gzip", "blob-digest"])
def test_a_failure_in_layer_3_under_jobs_2_leaves_the_store_as_it_was(tmp_path, how):
    layers = three_layers()
    write_layout(tmp_path / "good", layers[:1], compression="gzip", ref="base:1")
    cli("import-image", tmp_path / "good", tmp_path / "store")
    before = tree_snapshot(tmp_path / "store")
    if how in ("truncated-gzip", "blob-digest"):
        _, descs = write_layout(tmp_path / "bad", layers, compression="gzip", ref="bad:1")
        blob = tmp_path / "bad" / "blobs" / "sha256" / descs[2]["digest"][7:]
        data = blob.read_bytes()
        if how == "truncated-gzip":  # cut in the middle: a damaged stream (and a short blob)
            blob.write_bytes(data[: len(data) // 2])
        else:  # same length, one byte changed near the end: the digest check fails after the tar was read
            blob.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    else:
        tars, kw = damaged(layers, how)
        write_layout(tmp_path / "bad", tars, compression="gzip", ref="bad:1", **kw)
    errors = {}
    for jobs in ("2", "1"):
        p = cli("import-image", tmp_path / "bad", tmp_path / "store", "--jobs", jobs, check=False)
        errors[jobs] = one_line_error(p)
        # a member's error names the member (as --jobs 1 always did), the others the layer
        assert ("Files/dev: a character device" if how == "member" else "layer 3/3") in errors[jobs]
        assert tree_snapshot(tmp_path / "store") == before
    assert errors["1"] == errors["2"]
    # and the store still takes the good image
    write_layout(tmp_path / "fine", layers, compression="gzip", ref="fine:1")
    cli("import-image", tmp_path / "fine", tmp_path / "store", "--jobs", "2")
    with open(tmp_path / "store" / "refs.json") as f:
        assert len(json.load(f)["images"]) == 2


def test_jobs_2_missing_blob_of_layer_2_fails_there(tmp_path):
    layers = three_layers()
    write_layout(tmp_path / "lay", layers, compression="gzip", skip_blob=1)
    err = one_line_error(cli("import-image", tmp_path / "lay", tmp_path / "store", "--jobs", "2", check=False))
    assert "layer 2 of 3" in err and "not in the source" in err
    assert not os.path.exists(tmp_path / "store" / "journal.json")
    assert [n for n in os.listdir(tmp_path / "store" / "layers") if n.endswith(".cim")] == []


def test_jobs_2_reads_an_archive_on_stdin_as_jobs_1(tmp_path):
    """A source spooled from stdin (the reader process reads its layers from the spool)."""
    write_layout(tmp_path / "lay", three_layers(), compression="gzip")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(tmp_path / "lay", arcname=".")
    for jobs in ("1", "2"):
        cli("import-image", "-", tmp_path / f"s{jobs}", "--jobs", jobs, input=buf.getvalue())
    same_tree(tmp_path / "s1", tmp_path / "s2")
    assert not [n for n in os.listdir(tmp_path / "s2") if n.startswith(".spool-")]
