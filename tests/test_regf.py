"""cimfs.regf: Windows' upcase, the writer's hives checked byte by byte against the rules (regf_check) and read
back by cimfs.regf, hivex and regipy."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from regf_check import (
    HIVEX,
    as_hivexml,
    check_structure,
    hivexml_tree,
    hivexregedit_values,
    our_tree,
    regipy_tree,
)

import cimfs
from cimfs.regf import (
    REG_BINARY,
    REG_DWORD,
    REG_MULTI_SZ,
    REG_QWORD,
    REG_SZ,
    SUPERSEDE_TREE,
    TOMBSTONE,
    HiveFormatError,
    NewKey,
    NewValue,
    open_hive,
    upcase,
    write_hive,
)
from cimfs.regf import layout as L

needs_hivex = pytest.mark.skipif(not HIVEX, reason="hivex tools (libhivex-bin, libwin-hivex-perl) not installed")
K, V = NewKey, NewValue
SIZES = [0, 1, 3, 4, 5, 8, 100, 4060, 4100, 16343, 16344, 16345, 16352, 40000, 100_000]


def _sz(s: str) -> bytes:
    return (s + "\0").encode("utf-16-le")


def sample_tree(n_many: int = 10_000) -> NewKey:
    """Every feature the writer has: data sizes around each boundary, Latin-1 and UTF-16 names differing
    only in case, classes, several SDs, a 10 000-key list (ri splits), a deep chain."""
    sd2 = L.default_security_descriptor()[:-4] + b"\x01\x02\x03\x04"
    values = [V(f"bin{n}", REG_BINARY, bytes((i * 7 + n) & 0xFF for i in range(n))) for n in SIZES]
    values += [
        V("", REG_SZ, _sz("default")),
        V("dw", REG_DWORD, (0xDEADBEEF).to_bytes(4, "little")),
        V("qw", REG_QWORD, (1 << 40).to_bytes(8, "little")),
        V("multi", REG_MULTI_SZ, _sz("a") + _sz("b") + b"\0\0"),
        V("odd type", 0x12345, b"xyz12"),
        V("Ëlan", REG_SZ, _sz("latin")),
        V("ΣΑΣ", REG_SZ, _sz("greek")),
        V("σας", REG_SZ, _sz("ς is not upper-cased by Windows")),
    ]
    chain = K("leaf", values=[V("bottom", REG_DWORD, b"\1\0\0\0")])
    for i in range(100):
        chain = K(f"level{99 - i}", subkeys=[chain])
    return K(
        "ROOT",
        subkeys=[
            K("Values", values=values, class_name="ValueClass", last_written=132_000_000_000_000_000),
            K(
                "Names",
                subkeys=[
                    K("ëigenaardig"),
                    K("Ärger", class_name="Ä"),
                    K("ΣΑΣ"),
                    K("σας"),
                    K("日本語"),
                    K("Mixed ÿ"),
                    K("zz\U0001f600"),
                    K("zz\uffee"),
                ],
            ),
            K(
                "Many",
                subkeys=[
                    K(f"k{i:05d}", values=[V("i", REG_DWORD, i.to_bytes(4, "little"))] if i % 1000 == 0 else [])
                    for i in range(n_many)
                ],
            ),
            K("Secure", security=sd2, subkeys=[K("a", security=sd2), K("b")]),
            chain,
        ],
    )


def expected_tree(key: NewKey, prefix: str = "", out=None) -> dict:
    out = {} if out is None else out
    path = prefix
    out[path] = {v.name: ((None, b"") if v.tombstone else (v.type, bytes(v.data))) for v in key.values}
    for sub in key.subkeys:
        expected_tree(sub, f"{prefix}\\{sub.name}" if prefix else sub.name, out)
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    tree = sample_tree()
    data = write_hive(tree, file_name=r"C:\Windows\System32\config\SOFTWARE")
    path = tmp_path_factory.mktemp("regf") / "SOFTWARE"
    path.write_bytes(data)
    return tree, data, path


# ---- upcase ---------------------------------------------------------------------------------------------------


def test_upcase_is_windows_table():
    tsv = os.path.join(os.path.dirname(__file__), "..", "tools", "windows-upcase.tsv")
    rows = [line.split("\t") for line in open(tsv) if line[0] != "#"]
    assert len(rows) == 244
    table = open(os.path.join(os.path.dirname(cimfs.__file__), "layout", "upcase.bin"), "rb").read()
    for cu, windows, rule_up in rows:
        assert upcase(chr(int(cu, 16))) == chr(int(windows, 16)), cu
        # hives and new CIM images share Windows' table
        assert int.from_bytes(table[2 * int(cu, 16) : 2 * int(cu, 16) + 2], "little") == int(windows, 16)
    assert upcase("abcz\xe0\xfe\xff\xf7") == "ABCZ\xc0\xde\u0178\xf7"
    assert upcase("µıſǅςß") == "µıſǅςß"  # Windows leaves these alone (Python would not)
    assert upcase("\ud83d\ude00\U0001f600x") == "\ud83d\ude00\U0001f600X"  # surrogates map to themselves
    assert len(upcase("ﬀ")) == 1


def test_import_builds_no_table():
    code = "import cimfs.regf, cimfs.regf.names as n; assert n._table is None; cimfs.regf.upcase('a'); assert n._table"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---- the writer's hives -----------------------------------------------------------------------------------------


def test_written_hive_follows_the_rules(sample):
    tree, data, _ = sample
    counts = check_structure(data)
    assert counts["keys"] == len(expected_tree(tree)) and counts["sk"] == 2
    assert len(data) % 4096 == 0


def test_reader_reads_back_what_was_written(sample):
    tree, data, path = sample
    with open_hive(path) as h:
        assert (h.major, h.minor, h.layered, h.notes) == (1, 5, False, [])
        assert our_tree(h) == expected_tree(tree)
        v = h.key(r"values")
        assert v.class_name == "ValueClass" and v.last_written == 132_000_000_000_000_000
        assert [x.name for x in v.values()] == [x.name for x in tree.subkeys[0].values]  # stored order
        assert h.key(r"NAMES\ärger").class_name == "Ä"
        assert h.key(r"Names\σας").name == "σας" and h.key(r"Names\ΣΑΣ").name == "ΣΑΣ"
        assert h.key(r"Many\K09999").value_count == 0 and h.key(r"many\k09000").value("I").data == (9000).to_bytes(
            4, "little"
        )
        assert h.key("Secure").security != h.key(r"Secure\b").security
        assert h.key(r"Secure\a").security == h.key("Secure").security
        assert h.root.flags == 0x2C and h.root.name == "ROOT"
        with pytest.raises(KeyError):
            h.key(r"Names\nope")
        with pytest.raises(cimfs.CimError) as e:
            h.key(r"Values\bin0\x")
        assert e.value.hresult == cimfs.errors.ERROR_FILE_NOT_FOUND
        depth = max(p.count("\\") for p, _ in h.walk())
        assert depth == 100  # level0 .. level99, leaf
        sub = [p for p, _ in h.walk(r"level0\LEVEL1")]
        assert sub[0] == "level0\\level1" and len(sub) == 100 and sub[-1].endswith("\\leaf")
        assert [p for p, _ in h.walk("names")][:2] == ["Names", "Names\\Mixed ÿ"]


@needs_hivex
def test_hivex_reads_the_writers_hive(sample):
    tree, _, path = sample
    want = {p: {n: as_hivexml(*tv) for n, tv in vals.items()} for p, vals in expected_tree(tree).items()}
    assert hivexml_tree(path) == want
    # exact bytes; hivexregedit garbles compressed non-ASCII names (it prints their Latin-1 bytes as UTF-8)
    got = hivexregedit_values(path, "\\Values")["Values"]
    exp = expected_tree(tree)["Values"]
    latin1 = [n for n in exp if not n.isascii() and max(n) <= "\xff"]
    assert {n: tv for n, tv in got.items() if "\ufffd" not in n} == {n: tv for n, tv in exp.items() if n not in latin1}
    assert len(got) == len(exp)
    out = subprocess.run(["hivexget", str(path), "\\Many\\k09000", "i"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "9000"
    out = subprocess.run(
        ["hivexsh", str(path)], input="cd \\Names\nls\n", capture_output=True, text=True, check=True, timeout=60
    )
    assert sorted(out.stdout.splitlines()) == sorted(k.name for k in tree.subkeys[1].subkeys)


def test_regipy_reads_the_writers_hive(sample):
    tree, _, path = sample
    got = regipy_tree(path)
    # regipy decodes compressed (Latin-1) names as ASCII (notes §5): compare through the same lens
    lens = lambda s: s.encode("latin-1").decode("ascii", "replace") if max(s, default="a") < "\u0100" else s
    want = {
        "\\".join(lens(part) for part in p.split("\\")) if p else p: sorted(lens(n) for n in vals)
        for p, vals in expected_tree(tree).items()
    }
    assert {p: sorted(v) for p, v in got.items()} == want


@pytest.mark.parametrize("minor,leaf", [(3, None), (3, "li"), (4, None), (6, None), (5, "lf")])
def test_other_versions_and_list_kinds(tmp_path, minor, leaf):
    tree = K(
        "$$$PROTO.HIV",
        subkeys=[
            K("Many", subkeys=[K(f"n{i}") for i in range(2100)]),
            K("Big", values=[V("v", REG_BINARY, bytes(range(256)) * 200)]),
        ],
    )
    data = write_hive(tree, minor=minor, leaf=leaf)
    check_structure(data)
    with open_hive(data) as h:
        assert h.minor == minor and our_tree(h) == expected_tree(tree)
        lists = {bytes(h._buf[h.key("Many")._f[L.NKF_SUBLIST] + 4 :][:2])}
        assert lists == {b"ri"}
    if HIVEX:  # 1.3 keeps big data in one cell (no db), 1.4+ uses db
        path = tmp_path / "h"
        path.write_bytes(data)
        assert hivexml_tree(path)["Big"]["v"] == (3, bytes(range(256)) * 200)
        assert len([p for p in hivexml_tree(path) if p.startswith("Many\\")]) == 2100


def test_layered_hive_keeps_layer_bits():
    tree = K(
        "ROOT",
        inherit_class=True,
        subkeys=[
            K("gone", layer_semantics=TOMBSTONE),
            K(
                "svc",
                layer_semantics=SUPERSEDE_TREE,
                inherit_class=True,
                subkeys=[K("sub", layer_semantics=SUPERSEDE_TREE)],
            ),
            K("vals", values=[V("dead", 0, b"", tombstone=True), V("live", REG_DWORD, b"\1\0\0\0")]),
        ],
    )
    data = write_hive(tree, layered=True, minor=6)
    check_structure(data)
    with open_hive(data) as h:
        assert h.layered and h.minor == 6
        assert h.key("gone").layer_semantics == TOMBSTONE and h.root.inherit_class
        svc = h.key("svc")
        assert (svc.layer_semantics, svc.inherit_class, svc.subkeys()[0].layer_semantics) == (3, True, 3)
        dead = h.key("vals").value("DEAD")
        assert dead.tombstone and dead.type == 0 and dead.size == 0 and dead.data == b""
        raw = h.vk(dead.offset)[0]
        assert (raw[L.VKF_SIZE], raw[L.VKF_DATA], raw[L.VKF_FLAGS]) == (0, 0xFFFFFFFF, 3)


@pytest.mark.parametrize(
    "tree,message",
    [
        (K("R", subkeys=[K("Abc"), K("aBC")]), "duplicate subkey name"),
        (K("R", subkeys=[K("Ärger"), K("äRGER")]), "duplicate subkey name"),
        (K("R", values=[V("x", 1, b""), V("X", 1, b"")]), "duplicate value name"),
        (K("R", subkeys=[K("a\\b")]), "backslash"),
        (K("R", subkeys=[K("")]), "empty"),
        (K("R", subkeys=[K("x" * 256)]), "longer than 255"),
        (K("R", subkeys=[K("t", layer_semantics=TOMBSTONE)]), "layered=True"),
        (K("R", values=[V("t", 0, b"", tombstone=True)]), "layered=True"),
    ],
)
def test_writer_refuses_bad_trees(tree, message):
    with pytest.raises(cimfs.CimError, match=message):
        write_hive(tree)


def test_writer_refuses_a_tombstone_with_content_and_depth():
    with pytest.raises(cimfs.CimError, match="no subkeys, values or class"):
        write_hive(K("R", subkeys=[K("t", layer_semantics=TOMBSTONE, values=[V("a", 1, b"")])]), layered=True)
    deep = K("x")
    for _ in range(520):
        deep = K("x", subkeys=[deep])
    with pytest.raises(cimfs.CimError, match="deeper than 512"):
        write_hive(deep)
    assert issubclass(HiveFormatError, cimfs.CimFormatError)


def test_siblings_beyond_the_bmp_sort_by_code_unit():
    # U+1F600 is D83D DE00 in UTF-16: it sorts before U+FFEE although its code point is larger
    data = write_hive(K("R", subkeys=[K("\uffee"), K("\U0001f600"), K("\ue000")]))
    check_structure(data)
    with open_hive(data) as h:
        assert [k.name for k in h.root.subkeys()] == ["\U0001f600", "\ue000", "\uffee"]


def test_open_hive_sources(sample, tmp_path):
    tree, data, path = sample
    want = [(p, k.offset) for p, k in open_hive(data).walk()][:50]
    with open(path, "rb") as f, open_hive(f) as h:  # a binary file: mapped, unmapped on close
        assert [(p, k.offset) for p, k in h.walk()][:50] == want and h.name == str(path)
    for source in (bytearray(data), memoryview(data), io.BytesIO(data)):
        with open_hive(source, "label") as h:
            assert [(p, k.offset) for p, k in h.walk()][:50] == want and h.name == "label"
    with pytest.raises(cimfs.CimError) as e:
        open_hive(tmp_path / "missing")
    assert e.value.hresult == cimfs.errors.ERROR_FILE_NOT_FOUND and "missing" in str(e.value)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(HiveFormatError, match="empty: truncated"):
        open_hive(tmp_path / "empty")
    h = open_hive(path)
    keys = [k for _, k in h.walk()]
    assert [k.path for k in keys[:3]] == ["", "level0", "level0\\level1"]  # depth first, in stored (sorted) order
    h.close()
