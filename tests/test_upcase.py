"""The upcase table of new images is Windows' own (RtlUpcaseUnicodeChar):
names sort, collide and look up as Windows' CimFS sorts them, while an image
carrying another table is still read (and forked) through its own."""

from __future__ import annotations

import array
import pathlib

import pytest

import cimfs
from cimfs import CimError
from cimfs.layout import cim

TSV = pathlib.Path(__file__).resolve().parents[1] / "tools" / "windows-upcase.tsv"


def windows_differences() -> dict[int, tuple[int, int]]:
    """code unit -> (Windows' upper case, the str.upper() rule's), as listed."""
    out = {}
    for line in TSV.read_text(encoding="ascii").splitlines():
        if line.strip() and not line.startswith("#"):
            cu, win, rule = (int(f, 16) for f in line.split("\t"))
            out[cu] = (win, rule)
    return out


def units(table: bytes) -> array.array:
    a = array.array("H")
    a.frombytes(table)
    return a


def test_the_table_new_images_carry_is_windows_own(tmp_path):
    with cimfs.create(tmp_path, "t.cim") as w:
        w.add_file("f", b"")
    with cimfs.open(tmp_path / "t.cim") as im:
        table = units(im.upcase_table)
    assert im.upcase_table == cim.load_upcase_table()
    diffs = windows_differences()
    assert len(diffs) == 244
    for cu, (win, _rule) in diffs.items():
        assert table[cu] == win, f"U+{cu:04X}"
    # the notes' own examples, and the parts every table agrees on
    for cu in (0x00B5, 0x0131, 0x017F, 0x01C5, 0x03C2):
        assert table[cu] == cu
    assert table[0x1F80] == 0x1F88  # Windows maps it; Python's upper case is two characters
    assert [table[c] for c in range(ord("a"), ord("z") + 1)] == list(range(ord("A"), ord("Z") + 1))
    assert all(table[c] == c - 0x20 for c in range(0xE0, 0xFF) if c != 0xF7) and table[0xF7] == 0xF7
    assert table[0xFF] == 0x178 and all(table[c] == c for c in range(0xD800, 0xE000))


def test_names_windows_does_not_fold_sort_and_look_up_as_windows_does(tmp_path):
    # Windows' keys: J=004A z->005A µ=00B5 ı=0131 ſ=017F ǅ=01C5 Μ=039C Σ=03A3 ς=03C2 (Python's rule would
    # fold µ and Μ, ſ and S, ς and Σ together and put ı with I)
    names = ["Σ", "ς", "Μ", "µ", "ǅ", "Ǆ", "ſ", "S", "ı", "J", "z"]
    with cimfs.create(tmp_path, "n.cim") as w:
        w.mkdir("d")
        for n in names:
            w.add_file(f"d\\{n}", n.encode())
    expected = sorted(names, key=lambda n: [_windows_key(ord(c)) for c in n])
    assert expected == ["J", "S", "z", "µ", "ı", "ſ", "Ǆ", "ǅ", "Μ", "Σ", "ς"]
    with cimfs.open(tmp_path / "n.cim") as im:
        assert im.listdir("d") == expected  # stored in the link table's order
        for n in names:
            assert im.read_bytes(f"d\\{n}") == n.encode()
        # other case forms find the name Windows folds them to
        assert im.read_bytes("d\\μ") == "Μ".encode()  # U+03BC GREEK SMALL MU -> U+039C
        assert im.read_bytes("d\\σ") == "Σ".encode()
        assert im.read_bytes("d\\s") == b"S" and im.read_bytes("d\\j") == b"J"
        assert im.read_bytes("d\\ǆ") == "Ǆ".encode()  # U+01C6 -> U+01C4 in both tables
        assert not im.exists("d\\i")  # ı is not I's lower case to Windows
        assert im.check() == []
    assert cimfs.fold_name("µ") == "µ" and cimfs.fold_name("ᾀ") == "ᾈ"


def _windows_key(cu: int) -> int:
    diffs = windows_differences()
    if cu in diffs:
        return diffs[cu][0]
    up = chr(cu).upper()
    return ord(up) if len(up) == 1 and ord(up) < 0x10000 and not 0xD800 <= cu < 0xE000 else cu


def test_names_only_windows_folds_together_collide(tmp_path):
    with cimfs.create(tmp_path, "c.cim") as w:
        w.add_file("ᾈ", b"upper")
        with pytest.raises(CimError):
            w.mkdir("ᾀ")  # U+1F80 folds to U+1F88 in Windows' table: the same name
    with cimfs.open(tmp_path / "c.cim") as im:
        assert im.listdir("") == ["ᾈ"] and im.read_bytes("ᾀ") == b"upper"


def _rule_table() -> bytes:
    """The table cimfs wrote before (str.upper() where it is one BMP character)."""
    t = array.array("H", range(65536))
    for cu in range(65536):
        if not 0xD800 <= cu <= 0xDFFF:
            up = chr(cu).upper()
            if len(up) == 1 and ord(up) < 0x10000:
                t[cu] = ord(up)
    return t.tobytes()


def test_an_image_with_another_table_is_read_and_forked_through_its_own(tmp_path, monkeypatch):
    old = _rule_table()
    assert old != cim.load_upcase_table()
    with monkeypatch.context() as m:  # an image as cimfs wrote them before
        m.setattr(cim, "load_upcase_table", lambda: old)
        with cimfs.create(tmp_path, "old.cim") as w:
            for n in ("µ", "ı", "ſ", "J", "z"):
                w.add_file(n, n.encode())
    with cimfs.open(tmp_path / "old.cim") as im:
        assert im.upcase_table == old
        assert im.listdir("") == ["ı", "J", "ſ", "z", "µ"]  # sorted by that table: I, J, S, Z, Μ
        assert im.read_bytes("Μ") == "µ".encode() and im.read_bytes("i") == "ı".encode()
        assert im.read_bytes("S") == "ſ".encode() and im.check() == []
    with cimfs.create(tmp_path, "fork.cim", base="old.cim") as w:
        w.add_file("σ", b"new")  # placed by the parent's table
        w.add_file("μ", b"replaces mu")  # U+03BC: the same name as µ under that table
    with cimfs.open(tmp_path / "fork.cim") as im:
        assert im.upcase_table == old
        assert im.listdir("") == ["ı", "J", "ſ", "z", "μ", "σ"]
        assert im.read_bytes("µ") == b"replaces mu" and im.read_bytes("Σ") == b"new" and im.check() == []


def test_the_committed_table_is_what_the_generator_makes():
    import subprocess
    import sys
    import unicodedata

    if unicodedata.unidata_version != "14.0.0":
        pytest.skip("tools/gen_upcase.py builds its rule with Unicode 14.0 (CPython 3.11)")
    gen = pathlib.Path(__file__).resolve().parents[1] / "tools" / "gen_upcase.py"
    p = subprocess.run([sys.executable, str(gen), "--check"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
