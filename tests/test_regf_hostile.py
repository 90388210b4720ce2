"""Hostile and damaged hives: every one gives a one-line HiveFormatError naming the hive and the cell, in
bounded time and memory (the memory cases run under prlimit in a child process), never another exception."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest

from cimfs.regf import (
    REG_BINARY,
    REG_DWORD,
    HiveFormatError,
    NewKey,
    NewValue,
    merge,
    open_hive,
    write_hive,
)
from cimfs.regf import layout as L
from cimfs.regf.writer import HiveBuilder

K, V = NewKey, NewValue
NK_NSUB, NK_SUBLIST, NK_NVAL, NK_VALLIST = 4 + 20, 4 + 28, 4 + 36, 4 + 40  # from the cell start


def small_hive() -> bytes:
    return write_hive(
        K(
            "ROOT",
            subkeys=[
                K(
                    "A",
                    values=[
                        V("x", REG_DWORD, b"\1\0\0\0"),
                        V("blob", REG_BINARY, b"b" * 100),
                        V("big", REG_BINARY, bytes(range(256)) * 100),
                    ],
                    subkeys=[K("A1", subkeys=[K("A2")]), K("A3")],
                ),
                K("B", subkeys=[K(f"b{i}") for i in range(600)]),
            ],
        )
    )


def patch(data: bytes, rel: int, fmt: str, *values) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, 4096 + rel, *values)
    return bytes(out)


def offsets(data: bytes) -> dict:
    with open_hive(data) as h:
        a, b = h.key("A"), h.key("B")
        return {
            "root": h.root_offset,
            "A": a.offset,
            "A1": h.key(r"A\A1").offset,
            "B": b.offset,
            "A.list": a._f[L.NKF_SUBLIST],
            "B.list": b._f[L.NKF_SUBLIST],
            "root.list": h.root._f[L.NKF_SUBLIST],
            "A.vals": a._f[L.NKF_VALLIST],
            "blob": a.value("blob").offset,
            "big": a.value("big").offset,
            "big.db": h.vk(a.value("big").offset)[0][L.VKF_DATA],
        }


def read_everything(data: bytes, name: str = "hostile") -> None:
    with open_hive(data, name) as h:
        for _, k in h.walk():
            assert k.class_name is None or isinstance(k.class_name, str)
            assert k.security
            for v in k.values():
                assert len(v.data) == v.size or v.tombstone
        merge(h, [])


def assert_refused(data: bytes, *fragments: str) -> HiveFormatError:
    with pytest.raises(HiveFormatError) as e:
        read_everything(data)
    msg = str(e.value)
    assert msg.startswith("hostile: ") and "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return e.value


@pytest.fixture(scope="module")
def hive():
    data = small_hive()
    read_everything(data)  # the untouched hive is fine
    return data, offsets(data)


@pytest.mark.parametrize("cut", [0, 3, 100, 4095, 4096, 4200, 8192, -4096, -1])
def test_truncated(hive, cut):
    data, _ = hive
    e = assert_refused(data[:cut], "truncated" if cut not in (4096,) else "")
    assert e.hive == "hostile"


def test_headers(hive):
    data, _ = hive
    assert_refused(b"REGF" + data[4:], "not a registry hive")
    assert_refused(data[:24] + struct.pack("<I", 9) + data[28:], "version 1.9")
    assert_refused(data[:28] + struct.pack("<I", 1) + data[32:], "transaction log")
    assert_refused(data[:40] + struct.pack("<I", 4097) + data[44:], "multiple of 4096")
    assert_refused(data[:4096] + b"hbix" + data[4100:], "no 'hbin'")
    assert_refused(data[: 4096 + 4] + struct.pack("<I", 4096) + data[4104:], "says it is at")
    assert_refused(data[: 4096 + 8] + struct.pack("<I", 1 << 30) + data[4108:], "bad size")


def test_dirty_hive_is_read_with_a_note(hive):
    data, _ = hive
    dirty = data[:4] + struct.pack("<I", 7) + data[8:]  # sequence numbers differ, and the checksum is now wrong
    with open_hive(dirty) as h:
        assert len(h.notes) == 2 and "checksum" in h.notes[0] and "dirty" in h.notes[1]
        assert len(list(h.walk())) == 606


def test_cells_out_of_bounds_and_free(hive):
    data, o = hive
    assert_refused(patch(data, o["A"] + NK_SUBLIST, "<I", 0x7FFFFFF0), "outside the hive's cells")
    assert_refused(patch(data, o["A"] + NK_SUBLIST, "<I", 0x10), "outside the hive's cells")  # inside a bin header
    assert_refused(patch(data, o["A.list"], "<i", 64), f"cell 0x{o['A.list']:x}", "free cell")
    assert_refused(patch(data, o["A.list"], "<i", -0x100000), "crosses the end of its bin")
    assert_refused(patch(data, o["A"] + NK_SUBLIST, "<I", o["blob"]), "expected a subkey list")
    assert_refused(patch(data, o["A"] + 4 + L.NK_HEAD.size - 4, "<H", 60000), "key name of 60000 bytes")


def test_list_cycles(hive):
    data, o = hive
    # a leaf whose entry points at the leaf itself, or at an ancestor (the root)
    assert_refused(patch(data, o["A.list"] + 8, "<I", o["A.list"]), f"cell 0x{o['A.list']:x}", "reached twice")
    assert_refused(patch(data, o["A.list"] + 8, "<I", o["root"]), "reached twice")
    # A1's list pointing back at A's list: A1 -> A1 -> ...
    with open_hive(data) as h:
        a1 = h.key(r"A\A1")
        a1_list = a1._f[L.NKF_SUBLIST]
    looped = patch(data, o["A1"] + NK_SUBLIST, "<I", o["A.list"])
    looped = patch(looped, o["A1"] + NK_NSUB, "<I", 2)
    assert_refused(looped, "reached twice")
    # an ri pointing at itself, an ri pointing at an ri, an ri naming one leaf twice
    ri = patch(data, o["A.list"] + 4, "<2sHI", b"ri", 1, o["A.list"])
    ri = patch(ri, o["A"] + NK_NSUB, "<I", 1)
    assert_refused(ri, "reached twice")
    with open_hive(ri, "lazy") as h, pytest.raises(HiveFormatError, match="ri points to another ri"):
        h.key("A").subkeys()
    twice = patch(data, o["A.list"] + 4, "<2sHII", b"ri", 2, a1_list, a1_list)
    assert_refused(patch(twice, o["A"] + NK_NSUB, "<I", 2), "same leaf twice")
    same = patch(data, o["A.list"] + 8, "<II", o["A1"], 0)
    assert_refused(patch(same, o["A.list"] + 16, "<I", o["A1"]), "same key twice")


def test_counts(hive):
    data, o = hive
    assert_refused(patch(data, o["A"] + NK_NSUB, "<I", 1 << 31), "more than the hive can hold")
    assert_refused(patch(data, o["A"] + NK_NVAL, "<I", 0xFFFFFFFF), "more than the hive can hold")
    assert_refused(patch(data, o["A"] + NK_NSUB, "<I", 300), "says 300 subkeys")
    assert_refused(patch(data, o["A"] + NK_NVAL, "<I", 1000), "value list cell holds")
    assert_refused(patch(data, o["B.list"] + 4, "<2sH", b"lh", 0xFFFF), "overruns its cell")


def test_values(hive):
    data, o = hive
    gib = patch(data, o["blob"] + 4 + 4, "<I", 1 << 30)
    e = assert_refused(gib, "claims 1073741824 bytes")
    assert e.cell == o["blob"]
    assert_refused(patch(data, o["blob"] + 4 + 4, "<I", 5000), "overruns its 100-byte cell")
    assert_refused(patch(data, o["blob"] + 4 + 4, "<I", 0x80000005), "inline data of 5 bytes")
    assert_refused(patch(data, o["big.db"] + 4 + 2, "<H", 1), "in 1 segments")
    with open_hive(data) as h:
        segs = h._buf[h.cell(o["big.db"], "")[0] + 4 :][:4].cast("I")[0]
        first = struct.unpack_from("<I", h._buf, h.cell(segs, "")[0])[0]
    assert_refused(patch(data, segs + 8, "<I", first), "same segment twice")
    assert_refused(patch(data, o["A.vals"] + 8, "<I", o["A.vals"]), "value: cell too small")
    assert_refused(patch(data, o["A.vals"] + 8, "<I", o["A1"]), "expected a value ('vk'), found b'nk'")


def test_shared_data_cells_are_refused(hive):
    data, o = hive
    # "x" and "blob" share blob's data cell: a value list of such values would multiply the output
    with open_hive(data) as h:
        blob_data = h.vk(o["blob"])[0][L.VKF_DATA]
        big_vk = o["big"]
    shared = patch(data, big_vk + 4 + 4, "<II", 100, blob_data)
    assert_refused(shared, "reached twice")


def deep_hive(depth: int) -> bytes:
    """A chain of ``depth`` nested keys (the writer itself refuses more than 512)."""
    b = HiveBuilder()
    sd = L.default_security_descriptor()
    root = b.alloc(b.key_size(4))
    child = None
    for level in range(depth, 0, -1):
        off = b.alloc(b.key_size(1))
        entries = [(child, "X", b"x", True)] if child is not None else []
        b.key(
            off,
            b"x",
            True,
            flags=0,
            last_written=0,
            layer=0,
            parent=L.NONE,
            nsub=len(entries),
            sublist=b.subkey_list(entries),
            nval=0,
            vallist=L.NONE,
            sk=b.sk(sd),
            class_off=L.NONE,
            class_len=0,
            maxname=2 if entries else 0,
            user_flags=0,
            maxclass=0,
            maxvalname=0,
            maxvaldata=0,
        )
        child = off
    b.key(
        root,
        b"ROOT",
        True,
        flags=0x2C,
        last_written=0,
        layer=0,
        parent=L.NONE,
        nsub=1,
        sublist=b.subkey_list([(child, "X", b"x", True)]),
        nval=0,
        vallist=L.NONE,
        sk=b.sk(sd),
        class_off=L.NONE,
        class_len=0,
        maxname=2,
        user_flags=0,
        maxclass=0,
        maxvalname=0,
        maxvaldata=0,
    )
    return bytes(b.finish(root))


def test_depth_bomb():
    read_everything(deep_hive(511))
    assert_refused(deep_hive(700), "deeper than 512")
    with pytest.raises(HiveFormatError, match="deeper than 512"):
        merge(deep_hive(100), [deep_hive(700)])


@pytest.mark.skipif(not shutil.which("prlimit"), reason="prlimit (util-linux) not installed")
def test_bounded_memory(hive, tmp_path):
    data, o = hive
    cases = {
        "gib": patch(data, o["blob"] + 4 + 4, "<I", 1 << 30),
        "deep": deep_hive(2000),
        "count": patch(data, o["A"] + NK_NSUB, "<I", (1 << 31) - 1),
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    code = textwrap.dedent(f"""
        import sys
        from cimfs.regf import merge_files, HiveFormatError
        for name in {sorted(cases)!r}:
            try:
                merge_files({str(tmp_path)!r} + "/" + name, [], {str(tmp_path)!r} + "/out")
            except HiveFormatError as e:
                print(e)
    """)
    r = subprocess.run(
        ["prlimit", "--as=400000000", sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all("HiveFormatError" not in x and ": cell 0x" in x for x in lines), lines


def test_fuzzed_hives_fail_cleanly(hive):
    data, _ = hive
    rng = random.Random(21)
    refused = 0
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            at = rng.randrange(4096, len(data) if rng.random() < 0.3 else min(len(data), 4096 + 16384))
            mutated[at] = rng.randrange(256)
        try:
            read_everything(bytes(mutated))
        except HiveFormatError as e:
            assert "\n" not in str(e)
            refused += 1
    assert refused > 30
