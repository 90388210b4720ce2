"""Registry hives of non-base Windows layers (issue 21): each ``Hives\\<X>_DELTA``
a layer brings becomes ``Hives\\<X>_BASE`` = merge(the parent's base, delta) in
the layer's image, wherever a layer is imported (the winlayer API, ``cimfs
create --fork-from``, ``cimfs import-image`` in both modes); exports leave the
generated base out; and the ``cimfs hive`` commands.

The hives are built with the regf writer; the expected base hives are made
by running ``cimfs hive merge`` by hand on files, and the .reg text and the
merged hives are checked against hivex (``hivexregedit --export``).
"""

from __future__ import annotations

import datetime
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

import cimfs
from cimfs import regf, winlayer
from cimfs.errors import CimError, CimFormatError
from cimfs.regf import NewKey, NewValue

sys.path.insert(0, os.path.dirname(__file__))
from ocihelp import layer_tar, write_layout  # noqa: E402
from remote_servers import RangeHTTPServer, stop_fsspec_io  # noqa: E402
from test_winlayer import D, F, build_tar  # noqa: E402

HIVEXREGEDIT = shutil.which("hivexregedit")
CONFIG = "Files/Windows/System32/config"
NORMAL = 0x80


def sz(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def dw(n: int) -> bytes:
    return n.to_bytes(4, "little")


def cli(*args, check=True, input=None):
    p = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", *map(str, args)], capture_output=True, input=input, timeout=120
    )
    if check and p.returncode != 0:
        raise AssertionError(f"cimfs {args} failed: {p.stderr.decode()}")
    return p


def one_line_error(p) -> str:
    assert p.returncode != 0
    err = p.stderr.decode()
    assert err.startswith("cimfs: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def tree_snapshot(directory) -> dict:
    """Every file under ``directory`` with its bytes: a failed import must leave it as it was."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for n in dirs + files:
            p = os.path.join(root, n)
            out[os.path.relpath(p, directory)] = None if os.path.isdir(p) else open(p, "rb").read()
    return out


# ------------------------------------------------------------------ hives
def base_system() -> bytes:
    return regf.write_hive(
        NewKey(
            "ROOT",
            subkeys=[
                NewKey(
                    "ControlSet001",
                    subkeys=[
                        NewKey(
                            "Services",
                            subkeys=[
                                NewKey(
                                    "svcA",
                                    values=[
                                        NewValue("Start", regf.REG_DWORD, dw(2)),
                                        NewValue("ImagePath", regf.REG_EXPAND_SZ, sz("%SystemRoot%\\a.sys")),
                                    ],
                                ),
                                NewKey(
                                    "svcB", subkeys=[NewKey("Parameters", values=[NewValue("x", regf.REG_SZ, sz("b"))])]
                                ),
                            ],
                        )
                    ],
                ),
                NewKey("Setup", values=[NewValue("SystemSetupInProgress", regf.REG_DWORD, dw(0))]),
            ],
        )
    )


def base_software() -> bytes:
    return regf.write_hive(
        NewKey(
            "ROOT",
            subkeys=[
                NewKey(
                    "Microsoft",
                    subkeys=[
                        NewKey(
                            "Windows NT",
                            subkeys=[
                                NewKey(
                                    "CurrentVersion",
                                    values=[
                                        NewValue("CurrentBuild", regf.REG_SZ, sz("20348")),
                                        NewValue("UBR", regf.REG_DWORD, dw(1)),
                                        NewValue("DigitalProductId", regf.REG_BINARY, bytes(range(164))),
                                    ],
                                )
                            ],
                        )
                    ],
                )
            ],
        )
    )


def small_hive(tag: str) -> bytes:
    return regf.write_hive(NewKey("ROOT", subkeys=[NewKey(tag, values=[NewValue("v", regf.REG_SZ, sz(tag))])]))


def placeholder(name, subkeys=(), values=()):
    """A key of a delta that only leads to changes below it (merge + inherit class, as Windows writes)."""
    return NewKey(name, subkeys=subkeys, values=values, inherit_class=True)


def system_delta(n: int) -> bytes:
    services = {
        1: [
            placeholder(
                "svcA", values=[NewValue("Start", regf.REG_DWORD, dw(4)), NewValue("ImagePath", 0, b"", tombstone=True)]
            ),
            NewKey("svcB", layer_semantics=regf.TOMBSTONE),
            NewKey("svcC", values=[NewValue("Start", regf.REG_DWORD, dw(3))]),
        ],
        2: [
            NewKey(
                "svcC",
                layer_semantics=regf.SUPERSEDE_TREE,
                inherit_class=True,
                values=[NewValue("Type", regf.REG_DWORD, dw(16))],
            )
        ],
        3: [NewKey("svcD", values=[NewValue("Description", regf.REG_SZ, sz("layer 3"))])],
    }[n]
    return regf.write_hive(
        placeholder(
            "ROOT", subkeys=[placeholder("ControlSet001", subkeys=[placeholder("Services", subkeys=services)])]
        ),
        layered=True,
    )


def software_delta() -> bytes:
    return regf.write_hive(
        placeholder(
            "ROOT",
            subkeys=[
                placeholder(
                    "Microsoft",
                    subkeys=[
                        NewKey("App", values=[NewValue("Version", regf.REG_SZ, sz("1.0"))]),
                        placeholder(
                            "Windows NT",
                            subkeys=[placeholder("CurrentVersion", values=[NewValue("UBR", regf.REG_DWORD, dw(2))])],
                        ),
                    ],
                )
            ],
        ),
        layered=True,
    )


BASE_HIVES = {
    "SYSTEM": base_system,
    "SOFTWARE": base_software,
    "SAM": lambda: small_hive("SAM"),
    "SECURITY": lambda: small_hive("SECURITY"),
    "DEFAULT": lambda: small_hive("DEFAULT"),
}


def hand_merge(tmp_path, base: bytes, delta: bytes, tag: str) -> bytes:
    """``cimfs hive merge`` run by hand on files."""
    b, d, out = tmp_path / f"{tag}.base", tmp_path / f"{tag}.delta", tmp_path / f"{tag}.merged"
    b.write_bytes(base)
    d.write_bytes(delta)
    cli("hive", "merge", b, d, "-o", out)
    return out.read_bytes()


# ------------------------------------------------------------------ layers
def api_base_entries(omit=()):
    """A base layer for the winlayer API (which does no base-layer processing):
    the hives under config and, as the processing would link them, Hives\\<X>_BASE."""
    entries = [D("Files"), D("Files/Windows"), D("Files/Windows/System32"), D(CONFIG), D("Hives")]
    for name, make in BASE_HIVES.items():
        if name in omit:
            continue
        data = make()
        entries.append(F(f"{CONFIG}/{name}", data))
        entries.append(F(f"Hives/{'DEFAULTUSER' if name == 'DEFAULT' else name}_BASE", data))
    return entries


def delta_layers():
    """Three non-base layers with the deltas in real layers' spellings."""
    return [
        [D("Files"), F("Files/one.txt", b"1"), D("Hives"), F("Hives/System_Delta", system_delta(1))],
        [
            F("Files/two.txt", b"2"),
            D("Hives"),
            F("Hives/system_Delta", system_delta(2)),
            F("Hives/SOFTWARE_DELTA", software_delta()),
        ],
        [F("Files/three.txt", b"3"), D("Hives"), F("Hives/SYSTEM_DELTA", system_delta(3))],
    ]


def expected_bases(tmp_path) -> list[dict[str, bytes]]:
    """The SYSTEM and SOFTWARE base hive of each of the three layers, by hand."""
    system, software = base_system(), base_software()
    out = []
    for i, layer in enumerate(delta_layers(), 1):
        system = hand_merge(tmp_path, system, system_delta(i), f"system{i}")
        if i == 2:
            software = hand_merge(tmp_path, software, software_delta(), "software2")
        out.append({"SYSTEM": system, "SOFTWARE": software})
    return out


def test_fork_chain_gives_the_hand_merged_base_hives(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    tars = [io.BytesIO(build_tar(e)) for e in [api_base_entries()] + delta_layers()]
    paths = winlayer.import_layers(tars, d, ["l0.cim", "l1.cim", "l2.cim", "l3.cim"])
    want = expected_bases(tmp_path)
    for i, path in enumerate(paths[1:]):
        with cimfs.open(path) as img:
            for hive in ("SYSTEM", "SOFTWARE"):
                assert img.read_bytes(f"Hives\\{hive}_BASE") == want[i][hive], (path, hive)
            st = img.stat("Hives\\SYSTEM_BASE")
            assert st.attributes == NORMAL and st.last_write_time == 0 and st.creation_time == 0
            # the delta stays, as the layer spells it
            assert img.read_bytes(f"Hives\\{['System_Delta', 'system_Delta', 'SYSTEM_DELTA'][i]}") == system_delta(
                i + 1
            )
            # hives without a delta keep the parent's base
            assert img.read_bytes("Hives\\SAM_BASE") == small_hive("SAM")
    with cimfs.open(paths[0]) as img:
        assert img.read_bytes("Hives\\SYSTEM_BASE") == base_system()  # the parent is untouched
    # the flattened hive reads as the rules say (hivex, an independent reader, where present)
    top = regf.open_hive(want[2]["SYSTEM"])
    svc = top.key("ControlSet001\\Services")
    assert [k.name for k in svc.subkeys()] == ["svcA", "svcC", "svcD"]
    assert top.key("ControlSet001\\Services\\svcA").value("Start").data == dw(4)
    assert top.key("ControlSet001\\Services\\svcA").value("ImagePath") is None
    assert [(v.name, v.data) for v in top.key("ControlSet001\\Services\\svcC").values()] == [("Type", dw(16))]
    assert not top.layered


def test_cli_create_fork_from_merges_and_a_bad_delta_leaves_nothing(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    (tmp_path / "base.tar").write_bytes(build_tar(api_base_entries()))
    (tmp_path / "l1.tar").write_bytes(build_tar(delta_layers()[0]))
    cli("create", "--format", "windows-layer", tmp_path / "base.tar", d / "base.cim")
    cli("create", "--format", "windows-layer", "--fork-from", d / "base.cim", tmp_path / "l1.tar", d / "l1.cim")
    with cimfs.open(d / "l1.cim") as img:
        assert img.read_bytes("Hives\\SYSTEM_BASE") == hand_merge(tmp_path, base_system(), system_delta(1), "s")
    before = tree_snapshot(d)
    (tmp_path / "bad.tar").write_bytes(build_tar([D("Hives"), F("Hives/Software_Delta", b"regf" + b"\0" * 600)]))
    p = cli(
        "create",
        "--format",
        "windows-layer",
        "--fork-from",
        d / "base.cim",
        tmp_path / "bad.tar",
        d / "bad.cim",
        check=False,
    )
    err = one_line_error(p)
    assert "bad.tar" in err and "SOFTWARE" in err and "not a valid hive" in err
    assert tree_snapshot(d) == before


def test_missing_parent_base_hive_fails_and_leaves_nothing(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    winlayer.import_layer(io.BytesIO(build_tar(api_base_entries(omit=("SAM",)))), d, "base.cim")
    before = tree_snapshot(d)
    tar = tmp_path / "sam.tar"
    tar.write_bytes(build_tar([D("Hives"), F("Hives/Sam_Delta", system_delta(1))]))
    with pytest.raises(CimError) as e:
        winlayer.import_layer(str(tar), d, "l1.cim", parent="base.cim")
    text = str(e.value)
    assert "\n" not in text and "sam.tar" in text and "SAM" in text and "SAM_BASE" in text
    assert tree_snapshot(d) == before
    bad = tmp_path / "bad.tar"
    bad.write_bytes(build_tar([D("Hives"), F("Hives/SYSTEM_DELTA", b"regf" + b"\xff" * 8000)]))
    with pytest.raises(CimFormatError, match="SYSTEM.*not a valid hive"):  # damage in a hive: a CimFormatError
        winlayer.import_layer(str(bad), d, "l1.cim", parent="base.cim")
    assert tree_snapshot(d) == before
    # import_layers removes what it made before the failing layer
    layers = [
        io.BytesIO(build_tar(delta_layers()[0])),
        io.BytesIO(build_tar([D("Hives"), F("Hives/sam_delta", system_delta(1))])),
    ]
    with pytest.raises(CimError, match="SAM"):
        winlayer.import_layers(layers, d, ["a.cim", "b.cim"], base="base.cim")
    assert tree_snapshot(d) == before


def test_big_hives_go_through_temporary_files(tmp_path, monkeypatch):
    from cimfs.winlayer import hives

    monkeypatch.setattr(hives, "SPOOL_IN_MEMORY", 4096)  # every hive here is larger: mapped from a temporary file
    d = tmp_path / "img"
    d.mkdir()
    tars = [io.BytesIO(build_tar(e)) for e in [api_base_entries()] + delta_layers()[:2]]
    paths = winlayer.import_layers(tars, d, ["l0.cim", "l1.cim", "l2.cim"])
    want = expected_bases(tmp_path)
    with cimfs.open(paths[2]) as img:
        assert img.read_bytes("Hives\\SYSTEM_BASE") == want[1]["SYSTEM"]
        assert img.read_bytes("Hives\\SOFTWARE_BASE") == want[1]["SOFTWARE"]


def test_whiteout_of_a_delta_in_the_same_layer_means_no_merge(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    winlayer.import_layer(io.BytesIO(build_tar(api_base_entries())), d, "base.cim")
    tar = build_tar([D("Hives"), F("Hives/System_Delta", b"not a hive"), F("Hives/System_Delta", system_delta(3))])
    path = winlayer.import_layer(io.BytesIO(tar), d, "l.cim", parent="base.cim")  # the later entry wins
    with cimfs.open(path) as img:
        assert img.read_bytes("Hives\\SYSTEM_BASE") == hand_merge(tmp_path, base_system(), system_delta(3), "w")


# ------------------------------------------------------------------ export and re-import
def tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getnames()


def test_export_leaves_the_generated_base_out_and_reimport_gives_the_same_bytes(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    tars = [io.BytesIO(build_tar(e)) for e in [api_base_entries()] + delta_layers()[:2]]
    l0, l1, l2 = winlayer.import_layers(tars, d, ["l0.cim", "l1.cim", "l2.cim"])
    buf = io.BytesIO()
    winlayer.export_layer(l2, buf, parent=l1)
    names = tar_names(buf.getvalue())
    assert "Hives/system_Delta" in names and "Hives/SOFTWARE_DELTA" in names
    assert not any(n.upper().endswith("_BASE") for n in names), names
    again = winlayer.import_layer(io.BytesIO(buf.getvalue()), d, "again.cim", parent="l1.cim")
    with cimfs.open(l2) as a, cimfs.open(again) as b:
        for hive in ("SYSTEM", "SOFTWARE", "SAM"):
            assert a.read_bytes(f"Hives\\{hive}_BASE") == b.read_bytes(f"Hives\\{hive}_BASE")
    # a base layer's export keeps its Hives\<X>_BASE (no delta beside them)
    base_names = tar_names(_export(l0))
    assert "Hives/SYSTEM_BASE" in base_names
    # a whole-image export of a non-base fork keeps every file ([choice]: it is the flattened image)
    assert "Hives/SYSTEM_BASE" in tar_names(_export(l2))


def _export(path, **how) -> bytes:
    buf = io.BytesIO()
    winlayer.export_layer(path, buf, **how)
    return buf.getvalue()


def test_export_writes_an_unchanged_delta_when_the_base_it_made_changed(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    winlayer.import_layer(io.BytesIO(build_tar(api_base_entries())), d, "l0.cim")
    winlayer.import_layer(io.BytesIO(build_tar(delta_layers()[0])), d, "l1.cim", parent="l0.cim")
    # the same delta bytes again: the fork inherits the file, but the base hive is merged once more
    winlayer.import_layer(
        io.BytesIO(build_tar([D("Hives"), F("Hives/System_Delta", system_delta(1))])), d, "l2.cim", parent="l1.cim"
    )
    with cimfs.open(d / "l1.cim") as a, cimfs.open(d / "l2.cim") as b:
        changed = a.read_bytes("Hives\\SYSTEM_BASE") != b.read_bytes("Hives\\SYSTEM_BASE")
    names = tar_names(_export(d / "l2.cim", parent=d / "l1.cim"))
    assert ("Hives/System_Delta" in names) == changed
    assert "Hives/SYSTEM_BASE" not in names


# ------------------------------------------------------------------ the layer store
def store_layers():
    base = [("dir", "Files"), ("dir", "Files/Windows"), ("dir", "Files/Windows/System32"), ("dir", CONFIG)]
    base += [("file", f"{CONFIG}/{name}", make()) for name, make in BASE_HIVES.items()]
    layers = [layer_tar(base)]
    for entries in delta_layers():
        layers.append(
            layer_tar([("dir", e.name) if e.type == tarfile.DIRTYPE else ("file", e.name, e.data) for e in entries])
        )
    return layers


def store_images(store, ref, independent=False):
    refs = json.load(open(os.path.join(store, "refs.json")))
    rec = next(r for r in refs["images"].values() if ref is None or ref in r["refs"])
    if independent:
        return [os.path.join(store, "layers", n) for n in rec["independent_layers"]], os.path.join(
            store, "layers", rec["top"]
        )
    return [os.path.join(store, "layers", c[7:] + ".cim") for c in rec["layers"]], None


def test_import_image_both_modes_and_export_image_round_trip(tmp_path):
    write_layout(tmp_path / "lay", store_layers(), compression="none")
    want = expected_bases(tmp_path)
    report = json.loads(cli("import-image", tmp_path / "lay", tmp_path / "store", "--json").stdout)
    assert not report["warnings"]
    assert report["layers"][1]["hive_bases"] == ["Hives\\SYSTEM_BASE"]
    assert report["layers"][2]["hive_bases"] == ["Hives\\SYSTEM_BASE", "Hives\\SOFTWARE_BASE"]
    chain, _ = store_images(tmp_path / "store", "test:1.0")
    for i, image in enumerate(chain[1:]):
        with cimfs.open(image) as img:
            for hive in ("SYSTEM", "SOFTWARE"):
                assert img.read_bytes(f"Hives\\{hive}_BASE") == want[i][hive]
    record = json.load(open(chain[2][:-4] + ".json"))
    assert record["hive_bases"] == ["Hives\\SYSTEM_BASE", "Hives\\SOFTWARE_BASE"]

    # --independent: the parent's base hive comes from the layer image below that has one
    cli("import-image", "--independent", tmp_path / "lay", tmp_path / "istore")
    own, merged = store_images(tmp_path / "istore", "test:1.0", independent=True)
    with cimfs.open(own[3]) as img:
        assert img.read_bytes("Hives\\SYSTEM_BASE") == want[2]["SYSTEM"]
        assert not img.exists("Hives\\SOFTWARE_BASE")  # layer 3 has no SOFTWARE delta
    with cimfs.open(merged) as img:
        assert img.read_bytes("Hives\\SYSTEM_BASE") == want[2]["SYSTEM"]
        assert img.read_bytes("Hives\\SOFTWARE_BASE") == want[2]["SOFTWARE"]

    # export-image leaves the generated bases out; importing the export makes them again
    for store, out in ((tmp_path / "store", tmp_path / "out"), (tmp_path / "istore", tmp_path / "iout")):
        cli("export-image", store, "test:1.0", out, "--compress", "none")
        manifest = json.load(
            open(out / "blobs" / "sha256" / json.load(open(out / "index.json"))["manifests"][0]["digest"][7:])
        )
        for i, desc in enumerate(manifest["layers"][1:]):
            names = tar_names((out / "blobs" / "sha256" / desc["digest"][7:]).read_bytes())
            assert not any(n.upper().startswith("HIVES/") and n.upper().endswith("_BASE") for n in names), (i, names)
        cli("import-image", out, tmp_path / f"again-{out.name}")
        again, _ = store_images(tmp_path / f"again-{out.name}", None)  # the only image there
        for i, image in enumerate(again[1:]):
            with cimfs.open(image) as img:
                assert img.read_bytes("Hives\\SYSTEM_BASE") == want[i]["SYSTEM"]


def test_import_image_with_a_bad_delta_leaves_the_store_as_it_was(tmp_path):
    write_layout(tmp_path / "good", store_layers()[:2], compression="none")
    cli("import-image", tmp_path / "good", tmp_path / "store")
    before = tree_snapshot(tmp_path / "store")
    bad = store_layers()[:2] + [layer_tar([("dir", "Hives"), ("file", "Hives/System_Delta", b"regf broken")])]
    write_layout(tmp_path / "bad", bad, compression="none", ref="bad:1")
    for extra in ((), ("--independent",)):
        err = one_line_error(cli("import-image", *extra, tmp_path / "bad", tmp_path / "store", check=False))
        assert "layer 3/3" in err and "SYSTEM" in err and "not a valid hive" in err
        assert tree_snapshot(tmp_path / "store") == before


# ------------------------------------------------------------------ cimfs hive
def parse_reg(text: str) -> dict:
    """A .reg file as {key path: {value name: (type, bytes)}}, by the format's rules."""
    lines = text.replace("\r\n", "\n").split("\n")
    assert lines[0] == "Windows Registry Editor Version 5.00" and lines[1] == ""
    keys: dict = {}
    cur = None
    i = 2
    while i < len(lines):
        line = lines[i]
        while line.endswith("\\") and not line.endswith('\\\\"') and "=hex" in line:
            i += 1
            line = line[:-1] + lines[i].lstrip(" ")
        i += 1
        if not line:
            continue
        if line.startswith("["):
            cur = keys.setdefault(line[1:-1].rstrip("\\"), {})
            continue
        if line.startswith("@="):
            name, rest = "", line[2:]
        else:
            assert line.startswith('"')
            j, chars = 1, []
            while line[j] != '"':
                if line[j] == "\\":
                    j += 1
                chars.append(line[j])
                j += 1
            name, rest = "".join(chars), line[j + 2 :]
        if rest.startswith("dword:"):
            cur[name] = (4, int(rest[6:], 16).to_bytes(4, "little"))
        elif rest.startswith('"'):
            cur[name] = (1, rest[1:-1].replace('\\"', '"').replace("\\\\", "\\").encode("utf-16-le") + b"\0\0")
        else:
            kind, _, hexes = rest.partition(":")
            t = 3 if kind == "hex" else int(kind[4:-1], 16)
            cur[name] = (t, bytes.fromhex(hexes.replace(",", "")))
    return keys


def reg_text(data: bytes) -> str:
    assert data[:2] == b"\xff\xfe"
    text = data[2:].decode("utf-16-le")
    assert "\n" not in text.replace("\r\n", "")  # CRLF line ends only
    return text


def cli_hive() -> bytes:
    """A hive with every value type, big data (> 16 344 bytes), classes, names needing escapes."""
    return regf.write_hive(
        NewKey(
            "ROOT",
            subkeys=[
                NewKey(
                    "Microsoft",
                    class_name="MSClass",
                    last_written=133_000_000_000_000_000,
                    subkeys=[
                        NewKey(
                            "Windows NT",
                            subkeys=[
                                NewKey(
                                    "CurrentVersion",
                                    values=[
                                        NewValue("CurrentBuild", regf.REG_SZ, sz("20348")),
                                        NewValue("", regf.REG_SZ, sz('default "quoted" \\ value')),
                                        NewValue("Path", regf.REG_EXPAND_SZ, sz("%SystemRoot%\\system32")),
                                        NewValue("Multi", regf.REG_MULTI_SZ, sz("a") + sz("bc") + b"\0\0"),
                                        NewValue("UBR", regf.REG_DWORD, dw(0x1234)),
                                        NewValue("Q", regf.REG_QWORD, (2**40 + 5).to_bytes(8, "little")),
                                        NewValue("BE", regf.REG_DWORD_BIG_ENDIAN, dw(7)),
                                        NewValue("None", regf.REG_NONE, b"\x01\x02"),
                                        NewValue("Odd", regf.REG_SZ, b"abc"),
                                        NewValue("Big", regf.REG_BINARY, bytes(i % 251 for i in range(20000))),
                                        NewValue('we"ird\\name', regf.REG_BINARY, b""),
                                        NewValue("Short", regf.REG_DWORD, b"\x01\x02"),
                                    ],
                                )
                            ],
                        ),
                    ],
                ),
                NewKey("\u00c9t\u00e9 \u65e5\u672c", values=[NewValue("x", regf.REG_DWORD, dw(1))]),
            ],
        )
    )


@pytest.fixture
def hive_file(tmp_path):
    p = tmp_path / "SOFTWARE"
    p.write_bytes(cli_hive())
    return p


def test_hive_export_is_regedit_text_and_matches_hivex(tmp_path, hive_file):
    data = cli("hive", "export", hive_file).stdout
    text = reg_text(data)
    lines = text.split("\r\n")
    assert lines[:3] == ["Windows Registry Editor Version 5.00", "", "[HKEY_LOCAL_MACHINE\\SOFTWARE]"]
    assert "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion]" in lines
    assert '"CurrentBuild"="20348"' in lines
    assert '@="default \\"quoted\\" \\\\ value"' in lines
    assert '"UBR"=dword:00001234' in lines
    assert '"Q"=hex(b):05,00,00,00,00,01,00,00' in lines
    assert '"Odd"=hex(1):61,62,63' in lines  # [choice] not clean UTF-16 text: the exact bytes
    assert '"Short"=hex(4):01,02' in lines
    assert all(len(line) <= 80 for line in lines)
    big = [i for i, line in enumerate(lines) if line.startswith('"Big"=hex:')][0]
    assert len(lines[big]) == 80 and lines[big + 1].startswith("  ") and len(lines[big + 1]) == 78
    ours = parse_reg(text)
    # everything under the root, as the hive holds it
    h = regf.open_hive(cli_hive())
    expect = {
        "HKEY_LOCAL_MACHINE\\SOFTWARE" + ("\\" + p if p else ""): {v.name: (v.type, v.data) for v in k.values()}
        for p, k in h.walk()
    }
    assert ours == expect
    if HIVEXREGEDIT:
        p = subprocess.run(
            [HIVEXREGEDIT, "--export", "--prefix", "HKEY_LOCAL_MACHINE\\SOFTWARE", str(hive_file), "\\"],
            capture_output=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        theirs = parse_reg(p.stdout.decode("utf-8"))
        # hivex writes REG_SZ as hex(1): with its terminator, like ours after parsing
        assert theirs == ours
    # a key and -o, UTF-8
    out = tmp_path / "cv.reg"
    cli(
        "hive",
        "export",
        hive_file,
        "Microsoft\\Windows NT\\CurrentVersion",
        "-o",
        out,
        "--encoding",
        "utf-8",
        "--prefix",
        "HKLM\\X",
    )
    sub = out.read_bytes().decode("utf-8")
    assert sub.startswith(
        "Windows Registry Editor Version 5.00\r\n\r\n[HKLM\\X\\Microsoft\\Windows NT\\CurrentVersion]\r\n"
    )


def test_hive_ls_text_and_json(hive_file):
    out = cli("hive", "ls", hive_file, "Microsoft/Windows NT/CurrentVersion").stdout.decode().splitlines()
    assert '"CurrentBuild"  REG_SZ  12  "20348"' in out
    assert (
        "(default)  REG_SZ  " + str(len(sz('default "quoted" \\ value'))) + '  "default \\"quoted\\" \\\\ value"' in out
    )
    assert '"UBR"  REG_DWORD  4  0x00001234 (4660)' in out
    assert '"Multi"  REG_MULTI_SZ  12  ["a", "bc"]' in out
    assert any(line.startswith('"Big"  REG_BINARY  20000  000102') and line.endswith("...") for line in out)
    top = cli("hive", "ls", hive_file, "-l").stdout.decode().splitlines()
    when = datetime.datetime(1601, 1, 1) + datetime.timedelta(microseconds=133_000_000_000_000_000 // 10)
    assert top == [
        f'{when:%Y-%m-%d %H:%M:%S}  class="MSClass"  Microsoft\\',
        "1601-01-01 00:00:00  \u00c9t\u00e9 \u65e5\u672c\\",
    ]
    rows = json.loads(cli("hive", "ls", hive_file, "-R", "--json").stdout)
    h = regf.open_hive(cli_hive())
    keys = {r["path"] for r in rows if r["kind"] == "key"}
    assert keys == {p for p, _ in h.walk() if p}
    values = {(r["key"], r["name"]): r for r in rows if r["kind"] == "value"}
    assert len(values) == sum(len(k.values()) for _, k in h.walk())
    cv = "Microsoft\\Windows NT\\CurrentVersion"
    assert values[(cv, "UBR")]["data"] == 0x1234 and values[(cv, "Multi")]["data"] == ["a", "bc"]
    assert values[(cv, "Big")]["size"] == 20000 and bytes.fromhex(values[(cv, "Big")]["data"]) == bytes(
        i % 251 for i in range(20000)
    )
    micro = next(r for r in rows if r["kind"] == "key" and r["path"] == "Microsoft")
    assert micro["class"] == "MSClass" and micro["last_written_filetime"] == 133_000_000_000_000_000


def test_hive_ls_of_a_differencing_hive_shows_layers_with_l(tmp_path):
    p = tmp_path / "System_Delta"
    p.write_bytes(system_delta(1))
    plain = cli("hive", "ls", p, "ControlSet001\\Services").stdout.decode().splitlines()
    assert plain == ["svcA\\", "svcC\\"]  # the tombstone key is a deletion: shown with -l
    long = cli("hive", "ls", p, "ControlSet001\\Services", "-l").stdout.decode().splitlines()
    assert long == [
        "1601-01-01 00:00:00  [merge,inherit-class]  svcA\\",
        "1601-01-01 00:00:00  [tombstone]  svcB\\",
        "1601-01-01 00:00:00  [merge]  svcC\\",
    ]
    vals = cli("hive", "ls", p, "ControlSet001\\Services\\svcA", "-l").stdout.decode().splitlines()
    assert vals == ['"Start"  REG_DWORD  4  0x00000004 (4)', '"ImagePath"  [tombstone]']
    reg = reg_text(cli("hive", "export", p, "--prefix", "HKLM\\S").stdout)
    assert '"ImagePath"=-' in reg and "[-HKLM\\S\\ControlSet001\\Services\\svcB]" in reg


def test_hive_merge_matches_the_rules_and_hivex_reads_it(tmp_path):
    base, delta, out = tmp_path / "SYSTEM_BASE", tmp_path / "System_Delta", tmp_path / "SYSTEM"
    base.write_bytes(base_system())
    delta.write_bytes(system_delta(1))
    d2 = tmp_path / "d2"
    d2.write_bytes(system_delta(2))
    cli("hive", "merge", base, delta, d2, "-o", out)
    keys = parse_reg(reg_text(cli("hive", "export", out, "--prefix", "R").stdout))
    svc = "R\\ControlSet001\\Services"
    assert keys[f"{svc}\\svcA"] == {"Start": (4, dw(4))}  # changed; ImagePath tombstoned
    assert f"{svc}\\svcB" not in keys and f"{svc}\\svcB\\Parameters" not in keys  # tombstone over a subtree
    assert keys[f"{svc}\\svcC"] == {"Type": (4, dw(16))}  # supersede-tree replaced layer 1's svcC
    assert keys["R\\Setup"] == {"SystemSetupInProgress": (4, dw(0))}
    if HIVEXREGEDIT:
        p = subprocess.run([HIVEXREGEDIT, "--export", "--prefix", "R", str(out), "\\"], capture_output=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert parse_reg(p.stdout.decode()) == keys
    # the N-way merge equals the chain of pairwise merges
    step = tmp_path / "step"
    cli("hive", "merge", base, delta, "-o", step)
    cli("hive", "merge", step, d2, "-o", tmp_path / "chained")
    assert (tmp_path / "chained").read_bytes() == out.read_bytes()


def test_hive_commands_read_inside_an_image_and_from_a_url(tmp_path, hive_file):
    d = tmp_path / "img"
    d.mkdir()
    winlayer.import_layer(
        io.BytesIO(
            build_tar(
                [
                    D("Hives"),
                    F("Hives/SOFTWARE_BASE", cli_hive()),
                    F("Hives/SYSTEM_BASE", base_system()),
                    F("Hives/System_Delta", system_delta(1)),
                ]
            )
        ),
        d,
        "app.cim",
    )
    cli("hive", "merge", "--image", d / "app.cim", "Hives/SYSTEM_BASE", "hives\\system_delta", "-o", tmp_path / "m")
    assert (tmp_path / "m").read_bytes() == hand_merge(tmp_path, base_system(), system_delta(1), "im")
    key = "Microsoft\\Windows NT\\CurrentVersion"
    local = cli("hive", "ls", hive_file, key, "-l").stdout
    assert cli("hive", "ls", "--image", d / "app.cim", "Hives/SOFTWARE_BASE", key, "-l").stdout == local
    assert (
        cli("hive", "export", "--image", d / "app.cim", "Hives\\SOFTWARE_BASE").stdout
        == cli("hive", "export", hive_file).stdout
    )
    try:
        with RangeHTTPServer(tmp_path) as server:
            assert cli("hive", "ls", f"{server.url}/SOFTWARE", key, "-l").stdout == local
            assert (
                cli("hive", "ls", "--image", f"{server.url}/img/app.cim", "Hives/SOFTWARE_BASE", key, "-l").stdout
                == local
            )
            err = one_line_error(cli("hive", "ls", f"{server.url}/nothere", check=False))
            assert "nothere" in err
    finally:
        stop_fsspec_io()


def test_hive_command_errors_are_one_line(tmp_path, hive_file):
    junk = tmp_path / "junk"
    junk.write_bytes(b"regf" + b"\xff" * 5000)
    assert "junk" in one_line_error(cli("hive", "ls", junk, check=False))
    assert "Nope" in one_line_error(cli("hive", "ls", hive_file, "Nope", check=False))
    assert "no such" in one_line_error(cli("hive", "export", tmp_path / "missing", check=False))
    out = tmp_path / "merged"
    assert "junk" in one_line_error(cli("hive", "merge", hive_file, junk, "-o", out, check=False))
    assert not any(n.startswith(".merged") or n.startswith("merged") for n in os.listdir(tmp_path))
    d = tmp_path / "img"
    d.mkdir()
    winlayer.import_layer(io.BytesIO(build_tar([D("Hives"), F("Hives/x", b"x")])), d, "a.cim")
    assert "Hives" in one_line_error(cli("hive", "ls", "--image", d / "a.cim", "Hives", check=False))
    assert "SYSTEM_BASE" in one_line_error(cli("hive", "ls", "--image", d / "a.cim", "Hives/SYSTEM_BASE", check=False))
