"""Windows container layer tars (spec §17) <-> CIM images: import, fork chains,
whiteouts, export and the import -> export -> import round trip."""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import lzma
import os
import struct
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

import cimfs
from cimfs import CimError, winlayer
from cimfs import FileAttributes as A

EPOCH = 116444736000000000

# A self-relative security descriptor: owner and group SYSTEM, a DACL granting SYSTEM full control.
SD = bytes.fromhex(
    "010004801400000024000000000000003000000001010000000000051200000001010000000000051200000002001c00"
    "0100000000001400ff011f00010100000000000512000000"
)
# Same, owner Administrators (S-1-5-32-544).
SD2 = bytes.fromhex(
    "01000480140000002400000000000000340000000102000000000005200000002002000001010000000000051200000002001c00"
    "0100000000001400ff011f00010100000000000512000000"
)


def ft(sec: int, nsec: int = 0) -> int:
    """The spec's formula: ticks = sec*10^7 + nsec//100 + 116444736000000000."""
    return sec * 10_000_000 + nsec // 100 + EPOCH


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def ea_chain(entries) -> bytes:
    """FILE_FULL_EA_INFORMATION chain written from the spec (§13), as an oracle."""
    out = b""
    for i, (name, value) in enumerate(entries):
        n = name.encode("ascii")
        body = struct.pack("<BBH", 0, len(n), len(value)) + n + b"\0" + value
        size = 4 + len(body)
        last = i == len(entries) - 1
        pad = 0 if last else (-size) % 4
        out += struct.pack("<I", 0 if last else size + pad) + body + b"\0" * pad
    return out


def decode_link_reparse(buf: bytes):
    """(tag, substitute name, print name, flags or None) from a §19 reparse buffer."""
    tag, length, _ = struct.unpack_from("<IHH", buf)
    assert len(buf) == 8 + length
    so, sl, po, pl = struct.unpack_from("<HHHH", buf, 8)
    if tag == 0xA000000C:
        (flags,) = struct.unpack_from("<I", buf, 16)
        path = buf[20:]
    else:
        flags = None
        path = buf[16:]
    return tag, path[so : so + sl].decode("utf-16-le"), path[po : po + pl].decode("utf-16-le"), flags


# ------------------------------------------------------------------ building layer tars
class Entry:
    def __init__(self, name, type=tarfile.REGTYPE, data=b"", linkname="", pax=None, mtime=None):
        self.name, self.type, self.data, self.linkname = name, type, data, linkname
        self.pax = dict(pax or {})
        self.mtime = mtime


def D(name, attrs=0x10, **pax):
    return Entry(name, tarfile.DIRTYPE, pax={"MSWINDOWS.fileattr": str(attrs), **pax})


def F(name, data=b"", attrs=0x20, **pax):
    return Entry(name, tarfile.REGTYPE, data, pax={"MSWINDOWS.fileattr": str(attrs), **pax})


def build_tar(entries, compression="", fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}" if compression else "w", format=fmt) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = e.type
            ti.linkname = e.linkname
            ti.mtime = e.mtime if e.mtime is not None else 1_700_000_000
            ti.mode = 0o755 if e.type == tarfile.DIRTYPE else 0o644
            ti.pax_headers = {k.replace("__", "."): v for k, v in e.pax.items()}
            if e.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def write_tar(path, entries, compression=""):
    data = build_tar(entries, compression)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ------------------------------------------------------------------ comparing images
def snapshot(img):
    """Every path with every metadata field, stream bytes and hard link groups."""
    out = {}
    ids = {}
    for path, fid in img.iter_file_ids():
        st = img.stat(fid)
        rec = {f: getattr(st, f) for f in st._fields if f not in ("file_id", "parent_file_id", "nlink")}
        rec["nlink"] = st.nlink
        if not st.is_dir:
            rec["data"] = img.read_bytes(fid)
        rec["streams"] = {s: img.read_bytes(fid, stream=s) for s in img.streams(fid)}
        out[img.fold(path)] = (path, rec)
        ids.setdefault(fid, []).append(img.fold(path))
    groups = sorted(sorted(g) for g in ids.values() if len(g) > 1)
    return out, groups


def assert_same_images(a_path, b_path):
    with cimfs.open(a_path) as a, cimfs.open(b_path) as b:
        sa, ga = snapshot(a)
        sb, gb = snapshot(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k][0] == sb[k][0], k  # names keep their case
        assert sa[k][1] == sb[k][1], sa[k][0]
    assert ga == gb


# ------------------------------------------------------------------ the feature tar
T_SEC, T_NS = 1_700_000_000, 123_456_789  # a time with sub-100ns digits (dropped)
C_SEC, C_NS = 1_600_000_000, 987_654_300


def times_pax(sec=T_SEC, ns=T_NS):
    return {
        "mtime": f"{sec}.{ns:09d}",
        "atime": f"{sec + 1}.{ns:09d}",
        "ctime": f"{sec + 2}.{ns:09d}",
        "LIBARCHIVE.creationtime": f"{C_SEC}.{C_NS:09d}",
    }


EA_ENTRIES = [("USER.COMMENT", b"hello"), ("$KERNEL.PURGE.X", b"\x00\x01\x02")]


def feature_entries():
    ea = {f"MSWINDOWS.xattr.{n}": b64(v) for n, v in EA_ENTRIES}
    big = bytes(range(256)) * 5000  # 1.28 MB, several chunks
    return [
        D("Files", 0x10),
        D("Files/Windows", 0x10 | 0x4 | 0x2, **{"MSWINDOWS.rawsd": b64(SD)}, **times_pax()),
        F(
            "Files/Windows/notepad.exe",
            b"MZ" + b"\x90" * 1000,
            0x20 | 0x1,
            **{"MSWINDOWS.rawsd": b64(SD2)},
            **ea,
            **times_pax(),
        ),
        Entry("Files/Windows/notepad.exe:Zone.Identifier:$DATA", data=b"[ZoneTransfer]\r\nZoneId=3\r\n"),
        Entry("Files/Windows/notepad.exe:empty:$DATA", data=b""),
        F("Files/Windows/big.bin", big, 0x20),
        F("Files/Windows/empty.txt", b"", 0x80),
        Entry("Files/Windows/notepad2.exe", tarfile.LNKTYPE, linkname="Files/Windows/notepad.exe"),
        Entry(
            "Files/link.txt",
            tarfile.SYMTYPE,
            linkname="Windows\\notepad.exe",
            pax={"MSWINDOWS.fileattr": str(0x20 | 0x400), **times_pax()},
        ),
        Entry("Files/dirlink", tarfile.SYMTYPE, linkname="C:\\Windows", pax={"MSWINDOWS.fileattr": str(0x10 | 0x400)}),
        Entry(
            "Files/junction",
            tarfile.SYMTYPE,
            linkname="C:\\ProgramData",
            pax={"MSWINDOWS.fileattr": str(0x10 | 0x400), "MSWINDOWS.mountpoint": ""},
        ),
        D("Files/Program Files", 0x11),
        Entry("Files/Program Files:dirstream:$DATA", data=b"on a directory"),
        F("Files/Program Files/\u00e9t\u00e9 \u65e5\u672c.txt", b"unicode", 0x20),
        D("Hives", 0x10),
        F("Hives/Software_Delta", b"regf" + b"\0" * 4092, 0x20),
        D("UtilityVM", 0x10),
        D("UtilityVM/Files", 0x10),
        F("UtilityVM/Files/bootmgr", b"boot", 0x27),
    ]


@pytest.fixture
def feature_tar(tmp_path):
    return write_tar(tmp_path / "layer.tar", feature_entries())


def test_import_maps_every_feature(tmp_path, feature_tar):
    out = tmp_path / "img"
    out.mkdir()
    path = winlayer.import_layer(feature_tar, out, "layer.cim")
    assert path == str(out / "layer.cim")
    with cimfs.open(path) as img:
        assert sorted(img.listdir("")) == ["Files", "Hives", "UtilityVM"]
        # directory with attributes, SD and the four times
        st = img.stat("Files\\Windows")
        assert st.is_dir and st.attributes == A.DIRECTORY | A.SYSTEM | A.HIDDEN
        assert st.security_descriptor == SD
        assert st.last_write_time == ft(T_SEC, T_NS)
        assert st.last_access_time == ft(T_SEC + 1, T_NS)
        assert st.change_time == ft(T_SEC + 2, T_NS)
        assert st.creation_time == ft(C_SEC, C_NS)
        assert st.last_write_time % 10 == 7  # 100 ns precision kept: ...1234567
        # file: data, attributes, SD, EAs, times, ADS, hard link
        st = img.stat("Files\\Windows\\notepad.exe")
        assert not st.is_dir and st.attributes == A.ARCHIVE | A.READONLY
        assert st.size == 1002 and img.read_bytes("Files\\Windows\\notepad.exe") == b"MZ" + b"\x90" * 1000
        assert st.security_descriptor == SD2
        assert st.ea_buffer == ea_chain(EA_ENTRIES)
        assert st.creation_time == ft(C_SEC, C_NS)
        assert st.nlink == 2
        assert img.stat("Files\\Windows\\notepad2.exe").file_id == st.file_id
        assert sorted(img.streams("Files\\Windows\\notepad.exe")) == ["Zone.Identifier", "empty"]
        assert (
            img.read_bytes("Files\\Windows\\notepad.exe", stream="Zone.Identifier") == b"[ZoneTransfer]\r\nZoneId=3\r\n"
        )
        assert img.read_bytes("Files\\Windows\\notepad.exe", stream="empty") == b""
        assert img.read_bytes("Files\\Windows\\big.bin") == bytes(range(256)) * 5000
        assert img.stat("Files\\Windows\\empty.txt").size == 0
        # no PAX mtime: the ustar mtime, whole seconds; missing times default to it
        st = img.stat("Files\\Windows\\big.bin")
        assert st.last_write_time == st.creation_time == st.change_time == st.last_access_time == ft(1_700_000_000)
        # file symlink, relative
        st = img.stat("Files\\link.txt")
        assert not st.is_dir and st.reparse_tag == 0xA000000C and st.attributes & A.REPARSE_POINT
        tag, sub, prn, flags = decode_link_reparse(st.reparse_data)
        assert (sub, prn, flags) == ("Windows\\notepad.exe", "Windows\\notepad.exe", 1)
        # directory symlink, absolute: the NT path carries \??\
        st = img.stat("Files\\dirlink")
        assert st.is_dir and st.reparse_tag == 0xA000000C
        tag, sub, prn, flags = decode_link_reparse(st.reparse_data)
        assert (sub, prn, flags) == ("\\??\\C:\\Windows", "C:\\Windows", 0)
        # mount point
        st = img.stat("Files\\junction")
        assert st.is_dir and st.reparse_tag == 0xA0000003
        tag, sub, prn, flags = decode_link_reparse(st.reparse_data)
        assert sub == "\\??\\C:\\ProgramData" and prn == "C:\\ProgramData" and flags is None
        # ADS on a directory; non-ASCII names
        assert img.read_bytes("Files\\Program Files", stream="dirstream") == b"on a directory"
        assert img.stat("Files\\Program Files").attributes == A.DIRECTORY | A.READONLY
        assert img.read_bytes("Files\\Program Files\\\u00e9t\u00e9 \u65e5\u672c.txt") == b"unicode"
        # Hives and UtilityVM are plain paths
        assert img.read_bytes("Hives\\Software_Delta")[:4] == b"regf"
        assert img.stat("UtilityVM\\Files\\bootmgr").attributes == A.ARCHIVE | A.READONLY | A.HIDDEN | A.SYSTEM


def test_round_trip_import_export_import(tmp_path, feature_tar):
    out = tmp_path / "img"
    out.mkdir()
    first = winlayer.import_layer(feature_tar, out, "a.cim")
    exported = tmp_path / "exported.tar"
    winlayer.export_layer(first, exported)
    second = winlayer.import_layer(str(exported), out, "b.cim")
    assert_same_images(first, second)
    # the library behind `cimfs diff` agrees
    from cimfs import tools

    with cimfs.open(first) as a, cimfs.open(second) as b:
        assert tools.diff_images(a, b) == {"added": [], "removed": [], "changed": []}
    # and a second export is byte-identical (deterministic)
    again = tmp_path / "again.tar"
    with cimfs.open(second) as img:
        winlayer.export_layer(img, again)
    assert exported.read_bytes() == again.read_bytes()


def test_export_format_details(tmp_path, feature_tar):
    out = tmp_path / "img"
    out.mkdir()
    first = winlayer.import_layer(feature_tar, out, "a.cim")
    buf = io.BytesIO()
    winlayer.export_layer(first, buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:") as tf:
        members = tf.getmembers()
    by_name = {m.name: m for m in members}
    names = [m.name for m in members]
    assert all(m.name.split("/")[0] in ("Files", "Hives", "UtilityVM") for m in members)
    # ADS entries right after their file (and after its hard link? no: after the file)
    i = names.index("Files/Windows/notepad.exe")
    assert set(names[i + 1 : i + 3]) == {
        "Files/Windows/notepad.exe:Zone.Identifier:$DATA",
        "Files/Windows/notepad.exe:empty:$DATA",
    }
    assert names.index("Files/Program Files:dirstream:$DATA") == names.index("Files/Program Files") + 1
    # the second name of the file is a type '1' entry pointing at the first
    link = by_name["Files/Windows/notepad2.exe"]
    assert link.type == tarfile.LNKTYPE and link.linkname == "Files/Windows/notepad.exe"
    note = by_name["Files/Windows/notepad.exe"]
    h = note.pax_headers
    assert int(h["MSWINDOWS.fileattr"]) == A.ARCHIVE | A.READONLY
    assert base64.b64decode(h["MSWINDOWS.rawsd"]) == SD2
    for n, v in EA_ENTRIES:
        assert base64.b64decode(h[f"MSWINDOWS.xattr.{n}"]) == v
    assert h["mtime"] == f"{T_SEC}.{T_NS // 100 * 100:09d}"
    assert h["atime"] == f"{T_SEC + 1}.{T_NS // 100 * 100:09d}"
    assert h["ctime"] == f"{T_SEC + 2}.{T_NS // 100 * 100:09d}"
    assert h["LIBARCHIVE.creationtime"] == f"{C_SEC}.{C_NS:09d}"
    assert note.size == 1002
    d = by_name["Files/Windows"]
    assert d.isdir() and int(d.pax_headers["MSWINDOWS.fileattr"]) & 0x10
    sym = by_name["Files/link.txt"]
    assert sym.issym() and sym.linkname == "Windows\\notepad.exe"
    assert "CIMFS.rawreparse" not in sym.pax_headers  # the link name rebuilds the same buffer
    assert int(sym.pax_headers["MSWINDOWS.fileattr"]) & 0x400
    j = by_name["Files/junction"]
    assert j.issym() and j.linkname == "C:\\ProgramData" and "MSWINDOWS.mountpoint" in j.pax_headers
    dl = by_name["Files/dirlink"]
    assert dl.issym() and int(dl.pax_headers["MSWINDOWS.fileattr"]) & 0x10


def test_old_sddl_header(tmp_path):
    ntfs = pytest.importorskip("cimfs.layout.ntfs")
    sddl = "O:SYG:SYD:(A;;FA;;;SY)"
    tar = write_tar(tmp_path / "l.tar", [D("Files"), F("Files/a", b"x", **{"MSWINDOWS.sd": sddl})])
    path = winlayer.import_layer(tar, tmp_path, "l.cim")
    with cimfs.open(path) as img:
        sd = img.stat("Files\\a").security_descriptor
    assert sd == ntfs.sddl_to_sd(sddl)
    assert sd[0] == 1 and sd[3] & 0x80  # self-relative
    owner = struct.unpack_from("<I", sd, 4)[0]
    assert sd[owner : owner + 12] == bytes.fromhex("010100000000000512000000")  # S-1-5-18 (SY)
    # and the export writes it as MSWINDOWS.rawsd
    buf = io.BytesIO()
    winlayer.export_layer(path, buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        assert base64.b64decode(tf.getmember("Files/a").pax_headers["MSWINDOWS.rawsd"]) == sd
    bad = write_tar(tmp_path / "bad.tar", [D("Files"), F("Files/b", b"", **{"MSWINDOWS.sd": "this is not SDDL"})])
    with pytest.raises(CimError) as ei:
        winlayer.import_layer(bad, tmp_path, "bad.cim")
    assert "Files/b" in str(ei.value) and "MSWINDOWS.sd" in str(ei.value)


def test_pre_epoch_and_zero_times_round_trip(tmp_path):
    tar = write_tar(
        tmp_path / "l.tar",
        [
            D("Files"),
            F(
                "Files/old",
                b"o",
                **{
                    "mtime": "-1.5",
                    "atime": "-11644473600",
                    "ctime": "0",
                    "LIBARCHIVE.creationtime": "-11644473599.9999999",
                },
            ),
        ],
    )
    a = winlayer.import_layer(tar, tmp_path, "a.cim")
    with cimfs.open(a) as img:
        st = img.stat("Files\\old")
    assert st.last_write_time == EPOCH - 15_000_000
    assert st.last_access_time == 0
    assert st.change_time == EPOCH
    assert st.creation_time == 1  # -11644473599.9999999 s is 1 tick after 1601-01-01
    exported = tmp_path / "x.tar"
    winlayer.export_layer(a, exported)
    b = winlayer.import_layer(str(exported), tmp_path, "b.cim")
    assert_same_images(a, b)


def test_time_before_1601_is_rejected(tmp_path):
    tar = write_tar(tmp_path / "l.tar", [D("Files"), F("Files/x", b"", **{"mtime": "-20000000000"})])
    with pytest.raises(CimError) as ei:
        winlayer.import_layer(tar, tmp_path, "l.cim")
    assert "Files/x" in str(ei.value) and "FILETIME" in str(ei.value)
    assert not os.path.exists(tmp_path / "l.cim")


# ------------------------------------------------------------------ times
@given(hs.integers(min_value=0, max_value=(1 << 63) - 1))
@settings(max_examples=300)
def test_filetime_pax_round_trip(ticks):
    text = winlayer.filetime_to_pax_time(ticks)
    assert winlayer.pax_time_to_filetime(text) == ticks
    assert winlayer.parse_pax_time(text) == (ticks - EPOCH) * 100


@given(hs.integers(min_value=-(10**20), max_value=10**20))
def test_pax_time_text_round_trip(ns):
    assert winlayer.parse_pax_time(winlayer.format_pax_time(ns)) == ns


def test_pax_time_parsing():
    assert winlayer.parse_pax_time("1700000000.1234567") == 1_700_000_000_123_456_700
    assert winlayer.parse_pax_time("5") == 5_000_000_000
    assert winlayer.parse_pax_time("-1.5") == -1_500_000_000
    assert winlayer.parse_pax_time("1.0000000019") == 1_000_000_001  # beyond ns: truncated
    assert winlayer.pax_time_to_filetime("1700000000.123456789") == 1_700_000_000 * 10**7 + 1234567 + EPOCH
    for bad in ("", "abc", "1.2.3", "1e9", "--1"):
        with pytest.raises(ValueError):
            winlayer.parse_pax_time(bad)


# ------------------------------------------------------------------ layers and whiteouts
def base_layer_entries():
    return [
        D("Files"),
        D("Files/keep"),
        F("Files/keep/a.txt", b"a"),
        F("Files/gone.txt", b"gone"),
        D("Files/dir"),
        F("Files/dir/x", b"x"),
        D("Files/dir/sub"),
        F("Files/dir/sub/y", b"y"),
        D("Files/opaque"),
        F("Files/opaque/old1", b"1"),
        D("Files/opaque/olddir"),
        F("Files/opaque/olddir/z", b"z"),
        D("Files/replaced"),
        F("Files/replaced/old", b"old"),
        F("Files/becomes_dir", b"file"),
        D("Files/becomes_file"),
        F("Files/becomes_file/inner", b"i"),
        F("Files/shared.dll", b"dll v1"),
        D("Hives"),
        F("Hives/notes.txt", b"v1"),  # not a hive delta: a fake one would fail the hive merge
    ]


def test_fork_applies_layer_with_whiteouts(tmp_path):
    base_tar = write_tar(tmp_path / "base.tar", base_layer_entries())
    top_tar = write_tar(
        tmp_path / "top.tar",
        [
            Entry("Files/.wh.gone.txt"),
            Entry("Files/dir/sub/.wh.y"),
            Entry("Files/.wh.nonexistent"),  # no such name below: ignored
            D("Files/opaque"),
            Entry("Files/opaque/.wh..wh..opq"),
            F("Files/opaque/new", b"new"),
            # a directory replaced (not merged): its own new content stays, the lower content goes,
            # whichever order the whiteout and the new entries come in.
            D("Files/replaced"),
            F("Files/replaced/new", b"new"),
            Entry("Files/.wh.replaced"),
            D("Files/becomes_dir"),
            F("Files/becomes_dir/f", b"f"),
            F("Files/becomes_file", b"now a file"),
            F("Files/shared.dll", b"dll v2"),
            Entry("Files/keep/a-link", tarfile.LNKTYPE, linkname="Files/keep/a.txt"),  # link to a lower file
            F("Hives/notes.txt", b"v2"),
        ],
    )
    d = tmp_path / "img"
    d.mkdir()
    winlayer.import_layer(base_tar, d, "base.cim")
    top = winlayer.import_layer(top_tar, d, "top.cim", parent="base.cim")
    with cimfs.open(top) as img:
        names = {p for p, _ in img.iter_file_ids()}
        assert "Files\\gone.txt" not in names
        assert "Files\\dir\\sub" in names and "Files\\dir\\sub\\y" not in names
        assert "Files\\dir\\x" in names  # untouched lower content stays
        assert sorted(img.listdir("Files\\opaque")) == ["new"]
        assert sorted(img.listdir("Files\\replaced")) == ["new"]
        assert img.stat("Files\\becomes_dir").is_dir and img.listdir("Files\\becomes_dir") == ["f"]
        assert not img.stat("Files\\becomes_file").is_dir
        assert img.read_bytes("Files\\becomes_file") == b"now a file"
        assert img.read_bytes("Files\\shared.dll") == b"dll v2"
        assert img.read_bytes("Hives\\notes.txt") == b"v2"
        assert img.stat("Files\\keep\\a-link").file_id == img.stat("Files\\keep\\a.txt").file_id
        assert img.stat("Files\\keep\\a.txt").nlink == 2
        assert not any(".wh." in p for p in names)
    # the parent is untouched
    with cimfs.open(d / "base.cim") as img:
        assert img.read_bytes("Files\\gone.txt") == b"gone"
        assert sorted(img.listdir("Files\\opaque")) == ["old1", "olddir"]
        assert img.read_bytes("Files\\shared.dll") == b"dll v1"


def test_whiteout_in_a_base_layer_does_not_delete_its_own_names(tmp_path):
    tar = write_tar(
        tmp_path / "l.tar",
        [
            D("Files"),
            F("Files/a", b"a"),
            Entry("Files/.wh.a"),
            Entry("Files/.wh.b"),
            D("Files/o"),
            F("Files/o/k", b"k"),
            Entry("Files/o/.wh..wh..opq"),
        ],
    )
    path = winlayer.import_layer(tar, tmp_path, "l.cim")
    with cimfs.open(path) as img:
        assert img.read_bytes("Files\\a") == b"a"
        assert img.listdir("Files\\o") == ["k"]


def test_import_layers_builds_a_fork_chain(tmp_path):
    l1 = write_tar(tmp_path / "1.tar", base_layer_entries())
    l2 = write_tar(tmp_path / "2.tar", [Entry("Files/.wh.gone.txt"), F("Files/two", b"2")], "gz")
    l3 = write_tar(tmp_path / "3.tar", [Entry("Files/.wh.two"), F("Files/three", b"3")], "xz")
    d = tmp_path / "img"
    d.mkdir()
    paths = winlayer.import_layers([l1, l2, l3], d, ["l1.cim", "l2.cim", "l3.cim"])
    assert paths == [str(d / f"l{i}.cim") for i in (1, 2, 3)]
    with cimfs.open(paths[0]) as a, cimfs.open(paths[1]) as b, cimfs.open(paths[2]) as c:
        assert a.exists("Files\\gone.txt") and not b.exists("Files\\gone.txt")
        assert b.read_bytes("Files\\two") == b"2" and not c.exists("Files\\two")
        assert c.read_bytes("Files\\three") == b"3" and c.read_bytes("Files\\keep\\a.txt") == b"a"
        # each is a fork of the one below: its parent sets are the lower layers' sets
        ib, ic = b.info(), c.info()
        assert (
            ic["parent_region_sets"][-1]["id"] == ib["region_set"]["id"]
            if isinstance(ic["parent_region_sets"][-1], dict)
            else True
        )
        assert len(ic["parent_region_sets"]) == 2 and len(ib["parent_region_sets"]) == 1


def test_import_layers_failure_removes_the_layers_it_made(tmp_path):
    l1 = write_tar(tmp_path / "1.tar", base_layer_entries())
    l2 = write_tar(tmp_path / "2.tar", [F("Files/two", b"2")])
    bad = build_tar([F("Files/three", b"3" * 5000)])[:3000]  # cut inside the data
    (tmp_path / "3.tar").write_bytes(bad)
    d = tmp_path / "img"
    d.mkdir()
    winlayer.import_layer(l1, d, "existing.cim")
    before = sorted(os.listdir(d))
    with pytest.raises(CimError) as ei:
        winlayer.import_layers([l2, l2, str(tmp_path / "3.tar")], d, ["a.cim", "b.cim", "c.cim"], base="existing.cim")
    assert "Files/three" in str(ei.value)
    assert sorted(os.listdir(d)) == before


# ------------------------------------------------------------------ sources
@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_compressions_and_streams(tmp_path, compression):
    data = build_tar(feature_entries(), compression)

    class Pipe(io.RawIOBase):  # read-only, not seekable, returns short reads
        def __init__(self, b):
            self.b, self.pos = b, 0

        def readable(self):
            return True

        def readinto(self, buf):
            n = min(len(buf), 777, len(self.b) - self.pos)
            buf[:n] = self.b[self.pos : self.pos + n]
            self.pos += n
            return n

    d = tmp_path / "img"
    d.mkdir()
    a = winlayer.import_layer(Pipe(data), d, "pipe.cim")
    p = tmp_path / f"l.tar.{compression or 'plain'}"
    p.write_bytes(data)
    b = winlayer.import_layer(p, d, "file.cim")
    assert_same_images(a, b)


def test_open_tarfile_as_source_and_detection(tmp_path):
    data = build_tar(feature_entries(), "gz")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tf:
        assert winlayer.is_windows_layer(tf)
        path = winlayer.import_layer(tf, tmp_path, "l.cim")
    with cimfs.open(path) as img:
        assert img.exists("Files\\Windows\\notepad.exe")
        # the first member was read by tarfile.open already and is imported too
        assert img.stat("Files").is_dir


def test_is_windows_layer():
    win = build_tar(feature_entries())
    with tarfile.open(fileobj=io.BytesIO(win)) as tf:
        assert winlayer.is_windows_layer(tf)
    # no MSWINDOWS headers: a POSIX tar that happens to have Files/
    posix = build_tar([Entry("Files", tarfile.DIRTYPE), Entry("Files/a", data=b"x")])
    with tarfile.open(fileobj=io.BytesIO(posix)) as tf:
        assert not winlayer.is_windows_layer(tf)
    other = build_tar([D("etc"), F("etc/passwd", b"root")])
    with tarfile.open(fileobj=io.BytesIO(other)) as tf:
        assert not winlayer.is_windows_layer(tf)
    mixed = build_tar([D("Files"), F("Files/a"), D("usr")])
    with tarfile.open(fileobj=io.BytesIO(mixed)) as tf:
        assert not winlayer.is_windows_layer(tf)
    assert winlayer.is_windows_layer(names=["Files/", "Files/a", "Hives/x", "UtilityVM/Files/b", ".wh.old"])
    assert winlayer.is_windows_layer(names=["./Hives/x"])
    assert not winlayer.is_windows_layer(names=["UtilityVM/Files/b"])
    assert not winlayer.is_windows_layer(names=["Files/a", "bin/sh"])
    assert not winlayer.is_windows_layer(names=[])


def test_progress_reports_every_byte(tmp_path, feature_tar):
    calls = []
    path = winlayer.import_layer(feature_tar, tmp_path, "l.cim", progress=lambda n, p: calls.append((n, p)))
    total = sum(len(e.data) for e in feature_entries())
    assert sum(n for n, _ in calls) == total
    assert {p for n, p in calls if n} >= {"Files/Windows/big.bin", "Files/Windows/notepad.exe:Zone.Identifier:$DATA"}
    out = []
    winlayer.export_layer(path, io.BytesIO(), progress=lambda n, p: out.append(n))
    assert sum(out) == total
    one_arg = []
    winlayer.export_layer(path, io.BytesIO(), progress=one_arg.append)  # progress(n) callables work too
    assert sum(one_arg) == total


def test_export_to_path_is_atomic_and_compresses(tmp_path, feature_tar):
    a = winlayer.import_layer(feature_tar, tmp_path, "a.cim")
    out = tmp_path / "out.tar.gz"
    winlayer.export_layer(a, out)
    assert gzip.decompress(out.read_bytes())[:512]  # gzip by suffix
    b = winlayer.import_layer(str(out), tmp_path, "b.cim")
    assert_same_images(a, b)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
    xz = io.BytesIO()
    winlayer.export_layer(a, xz, compression="xz")
    assert lzma.decompress(xz.getvalue())
    bz = io.BytesIO()
    winlayer.export_layer(a, bz, compression="bz2")
    assert bz2.decompress(bz.getvalue())


def test_other_reparse_points_round_trip_exactly(tmp_path):
    # An LX symlink and a WCI tombstone have no tar symlink form: CIMFS.rawreparse carries them.
    lx = struct.pack("<IHH", 0xA000001D, 4 + 6, 0) + struct.pack("<I", 2) + b"target"
    tomb = struct.pack("<IHH", 0xA000001F, 0, 0)
    d = tmp_path / "img"
    d.mkdir()
    with cimfs.create(d, "a.cim") as w:
        w.mkdir("Files")
        w.add_file("Files\\lx", b"", cimfs.FileMetadata(reparse_data=lx, last_write_time=ft(5)))
        w.add_file("Files\\tomb", b"", cimfs.FileMetadata(reparse_data=tomb))
        w.add_file("Files\\withdata", b"data", cimfs.FileMetadata(reparse_data=lx))
        w.mkdir("Files\\tombdir", cimfs.FileMetadata(attributes=A.DIRECTORY, reparse_data=tomb))
        # a symlink whose print name is empty: the link name cannot rebuild it
        sub = "\\??\\C:\\x".encode("utf-16-le")
        odd = struct.pack("<HHHHI", 0, len(sub), len(sub), 0, 0) + sub
        w.add_file(
            "Files\\odd", b"", cimfs.FileMetadata(reparse_data=struct.pack("<IHH", 0xA000000C, len(odd), 0) + odd)
        )
    buf = io.BytesIO()
    winlayer.export_layer(str(d / "a.cim"), buf)
    buf.seek(0)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        assert "CIMFS.rawreparse" in tf.getmember("Files/tombdir").pax_headers
        assert tf.getmember("Files/tombdir").isdir()
        assert tf.getmember("Files/withdata").isfile()
    b = winlayer.import_layer(buf, d, "b.cim")
    assert_same_images(d / "a.cim", b)


def test_case_insensitive_names_later_entry_wins(tmp_path):
    tar = write_tar(tmp_path / "l.tar", [D("Files"), F("Files/README", b"one"), F("Files/readme", b"two")])
    path = winlayer.import_layer(tar, tmp_path, "l.cim")
    with cimfs.open(path) as img:
        assert img.listdir("Files") == ["readme"]
        assert img.read_bytes("Files\\README") == b"two"


def test_missing_parent_directories_are_created(tmp_path):
    tar = write_tar(tmp_path / "l.tar", [F("./Files/a/b/c.txt", b"c")])
    path = winlayer.import_layer(tar, tmp_path, "l.cim")
    with cimfs.open(path) as img:
        assert img.stat("Files\\a\\b").is_dir and img.read_bytes("Files\\a\\b\\c.txt") == b"c"


# ------------------------------------------------------------------ errors leave nothing behind
def _bad(tmp_path, data: bytes, *must_mention, parent=None, setup=None):
    d = tmp_path / "img"
    d.mkdir(exist_ok=True)
    if setup:
        setup(d)
    before = sorted(os.listdir(d))
    src = tmp_path / "bad.tar"
    src.write_bytes(data)
    with pytest.raises(CimError) as ei:
        winlayer.import_layer(str(src), d, "new.cim", parent=parent)
    assert sorted(os.listdir(d)) == before, "a failed import left files behind"
    msg = str(ei.value)
    for m in must_mention:
        assert m in msg, msg
    return ei.value


def test_truncated_inside_data(tmp_path):
    data = build_tar([D("Files"), F("Files/big", b"x" * 100_000)])
    e = _bad(tmp_path, data[:50_000], "Files/big", "truncated")
    assert e.hresult == cimfs.errors.E_INVALIDARG


def test_truncated_at_a_header_boundary(tmp_path):
    # tarfile alone takes a tar cut between members for a shorter, complete one.
    data = build_tar([D("Files"), F("Files/a", b"x" * 512), F("Files/b", b"y" * 512)])
    a_data = data.index(b"x" * 512)
    cut = a_data + 512  # right after Files/a's data: before Files/b's PAX header
    assert data[cut : cut + 512] != bytes(512)
    _bad(tmp_path, data[:cut], "truncated", "Files/a")
    _bad(tmp_path, data[: cut + 100], "truncated")  # inside the PAX header block
    b_hdr = data.index(b"Files/b") // 512 * 512
    _bad(tmp_path, data[:b_hdr], "truncated")  # between the PAX header and its member
    _bad(tmp_path, data[: b_hdr + 300], "truncated")
    # ustar only: no PAX headers at all
    plain = build_tar([Entry("Files/a", data=b"x" * 512), Entry("Files/b", data=b"y")], fmt=tarfile.USTAR_FORMAT)
    _bad(tmp_path, plain[:2048], "truncated")


def test_end_of_archive_without_padding_is_fine(tmp_path):
    # One zero block (not two, no record padding) still ends a tar properly.
    data = build_tar([D("Files"), F("Files/a", b"\xab" * 10)])
    end = data.index(b"\xab" * 10) // 512 * 512 + 512
    path = winlayer.import_layer(io.BytesIO(data[: end + 512]), tmp_path, "l.cim")
    with cimfs.open(path) as img:
        assert img.read_bytes("Files\\a") == b"\xab" * 10


def test_truncated_compressed(tmp_path):
    data = build_tar([D("Files"), F("Files/big", os.urandom(200_000))], "gz")
    _bad(tmp_path, data[: len(data) // 2], "truncated")


def test_not_a_tar(tmp_path):
    _bad(tmp_path, b"this is not a tar archive at all" * 100, "tar")
    _bad(tmp_path, b"", "tar")


def test_corrupt_header_checksum(tmp_path):
    data = bytearray(build_tar([D("Files"), F("Files/a", b"a"), F("Files/b", b"b")]))
    i = data.index(b"Files/b")
    data[i] ^= 0x20  # breaks that header's checksum
    _bad(tmp_path, bytes(data), "tar")


@pytest.mark.parametrize(
    "name, why",
    [
        ("Files/../../etc/passwd", ".."),
        ("/Files/abs", "absolute"),
        ("Files/a*b", "invalid character"),
        ("Files/a\\b", "invalid character"),
        ("Files/con\x01trol", "invalid character"),
        ("C:/Windows/x", "drive"),
        ("Files/x:s:$INDEX_ALLOCATION", "$DATA"),
        ("Files/" + "n" * 256, "longer than 255"),
    ],
)
def test_hostile_or_invalid_names(tmp_path, name, why):
    _bad(tmp_path, build_tar([D("Files"), F(name, b"evil")]), why)


def test_hostile_hard_links_and_streams(tmp_path):
    _bad(
        tmp_path,
        build_tar([D("Files"), Entry("Files/l", tarfile.LNKTYPE, linkname="../../etc/shadow")]),
        "Files/l",
        "..",
    )
    _bad(
        tmp_path,
        build_tar([D("Files"), Entry("Files/l", tarfile.LNKTYPE, linkname="Files/missing")]),
        "Files/l",
        "not in the image",
    )
    _bad(
        tmp_path,
        build_tar([D("Files"), D("Files/d"), Entry("Files/l", tarfile.LNKTYPE, linkname="Files/d")]),
        "Files/l",
        "directory",
    )
    _bad(
        tmp_path,
        build_tar([D("Files"), Entry("Files/nofile:s:$DATA", data=b"s")]),
        "Files/nofile:s:$DATA",
        "not in the image",
    )
    _bad(tmp_path, build_tar([D("Files"), Entry("Files/dev", tarfile.CHRTYPE)]), "Files/dev", "character device")


def test_malformed_pax_values(tmp_path):
    _bad(
        tmp_path, build_tar([D("Files"), F("Files/a", b"", **{"MSWINDOWS.rawsd": "!!notbase64"})]), "Files/a", "base64"
    )
    _bad(
        tmp_path,
        build_tar([D("Files"), F("Files/a", b"", **{"MSWINDOWS.rawsd": b64(b"\x01\x00")})]),
        "Files/a",
        "security descriptor",
    )
    _bad(tmp_path, build_tar([D("Files"), Entry("Files/a", pax={"MSWINDOWS.fileattr": "0x20"})]), "Files/a", "fileattr")
    _bad(
        tmp_path,
        build_tar([D("Files"), F("Files/a", b"", **{"LIBARCHIVE.creationtime": "yesterday"})]),
        "Files/a",
        "creationtime",
    )
    _bad(tmp_path, build_tar([D("Files"), F("Files/a", b"", **{"MSWINDOWS.xattr.X": "%%%"})]), "Files/a", "base64")


def test_error_after_many_good_entries_leaves_nothing_even_in_a_fork(tmp_path):
    def setup(d):
        winlayer.import_layer(write_tar(tmp_path / "b.tar", base_layer_entries()), d, "base.cim")

    entries = [F(f"Files/f{i}", os.urandom(3000)) for i in range(50)]
    entries.append(F("Files/bad|name", b""))
    _bad(tmp_path, build_tar(entries), "Files/bad|name", parent="base.cim", setup=setup)


def test_existing_image_name_is_refused(tmp_path, feature_tar):
    winlayer.import_layer(feature_tar, tmp_path, "l.cim")
    with pytest.raises(CimError) as ei:
        winlayer.import_layer(feature_tar, tmp_path, "l.cim")
    assert ei.value.hresult == cimfs.errors.ERROR_FILE_EXISTS


def test_export_of_an_unwritable_name_fails_cleanly(tmp_path):
    with cimfs.create(tmp_path, "a.cim") as w:
        w.mkdir("Files")
        w.add_file("Files\\ok", b"ok")
        w.add_file("Files\\badX", b"x")
    # An unpaired surrogate: fine in UTF-16 (another writer may store it), not
    # in UTF-8.  cimfs's writer refuses it, so it is patched into the link table.
    patched = 0
    for n in os.listdir(tmp_path):
        if n.startswith("region_"):
            data = (tmp_path / n).read_bytes()
            if "badX".encode("utf-16-le") in data:
                (tmp_path / n).write_bytes(
                    data.replace("badX".encode("utf-16-le"), "bad\udc80".encode("utf-16-le", "surrogatepass"))
                )
                patched += 1
    assert patched == 1
    out = tmp_path / "out.tar"
    with pytest.raises(CimError) as ei:
        winlayer.export_layer(str(tmp_path / "a.cim"), out)
    assert "Files\\bad" in str(ei.value)
    assert not out.exists() and [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
    # to a stream: no end-of-archive blocks, so a reader does not take it for a complete tar
    buf = io.BytesIO()
    with pytest.raises(CimError):
        winlayer.export_layer(str(tmp_path / "a.cim"), buf)
    with pytest.raises(CimError) as ei:
        winlayer.import_layer(io.BytesIO(buf.getvalue()), tmp_path, "b.cim")
    assert "truncated" in str(ei.value) or "not a readable tar" in str(ei.value)
    assert not (tmp_path / "b.cim").exists()


def test_export_of_a_fork_is_the_merged_tree(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    winlayer.import_layer(write_tar(tmp_path / "b.tar", base_layer_entries()), d, "base.cim")
    top = winlayer.import_layer(
        write_tar(tmp_path / "t.tar", [Entry("Files/.wh.dir"), F("Files/new", b"n")]), d, "top.cim", parent="base.cim"
    )
    out = tmp_path / "flat.tar"
    winlayer.export_layer(top, out)
    with tarfile.open(out) as tf:
        names = set(tf.getnames())
    assert "Files/new" in names and "Files/keep/a.txt" in names and not any(n.startswith("Files/dir") for n in names)
    flat = winlayer.import_layer(str(out), d, "flat.cim")
    assert_same_images(top, flat)


# ------------------------------------------------------------------ random layers round trip
_names = hs.sampled_from(["a", "B", "c.txt", "Dir", "\u00e9", "long name with spaces", "x" * 40])
_attrs = hs.sampled_from([0, 0x1, 0x2, 0x4, 0x20, 0x27, 0x80, 0x200])
_ticks = hs.integers(min_value=0, max_value=(1 << 63) - 1)


@hs.composite
def random_layer(draw):
    entries = [D("Files")]
    files, dirs = [], ["Files"]
    for _ in range(draw(hs.integers(0, 25))):
        parent = draw(hs.sampled_from(dirs))
        name = f"{parent}/{draw(_names)}"
        if any(name.upper() == p.upper() for p in files + dirs):
            continue
        kind = draw(hs.sampled_from(["file", "file", "dir", "link", "sym", "stream"]))
        pax = {
            "MSWINDOWS.fileattr": str(draw(_attrs)),
            "mtime": winlayer.filetime_to_pax_time(draw(_ticks)),
            "atime": winlayer.filetime_to_pax_time(draw(_ticks)),
            "ctime": winlayer.filetime_to_pax_time(draw(_ticks)),
            "LIBARCHIVE.creationtime": winlayer.filetime_to_pax_time(draw(_ticks)),
        }
        if draw(hs.booleans()):
            pax["MSWINDOWS.rawsd"] = b64(draw(hs.sampled_from([SD, SD2])))
        if draw(hs.booleans()):
            pax["MSWINDOWS.xattr.USER.X"] = b64(draw(hs.binary(max_size=20)))
        if kind == "dir":
            pax["MSWINDOWS.fileattr"] = str(int(pax["MSWINDOWS.fileattr"]) | 0x10)
            entries.append(Entry(name, tarfile.DIRTYPE, pax=pax))
            dirs.append(name)
        elif kind == "link" and files:
            entries.append(Entry(name, tarfile.LNKTYPE, linkname=draw(hs.sampled_from(files))))
            files.append(name)
        elif kind == "sym":
            target = draw(hs.sampled_from(["..\\x", "C:\\Windows\\system32", "rel", "\\\\server\\share\\f"]))
            entries.append(Entry(name, tarfile.SYMTYPE, linkname=target, pax=pax))
        elif kind == "stream" and files:
            owner = draw(hs.sampled_from(files))
            # streams right after their file: append at the end only for the last file
            if owner == files[-1] and entries[-1].type == tarfile.REGTYPE:
                entries.append(Entry(f"{owner}:{draw(_names)}:$DATA", data=draw(hs.binary(max_size=100))))
        else:
            entries.append(Entry(name, data=draw(hs.binary(max_size=3000)), pax=pax))
            files.append(name)
    return entries


@given(random_layer())
@settings(max_examples=40, deadline=None)
def test_random_layers_round_trip(tmp_path_factory, entries):
    d = tmp_path_factory.mktemp("rt")
    a = winlayer.import_layer(io.BytesIO(build_tar(entries)), d, "a.cim")
    buf = io.BytesIO()
    winlayer.export_layer(a, buf)
    b = winlayer.import_layer(io.BytesIO(buf.getvalue()), d, "b.cim")
    assert_same_images(a, b)


def test_real_pipe_source(tmp_path):
    import threading

    data = build_tar(feature_entries(), "bz2")
    r, w = os.pipe()

    def feed():
        with os.fdopen(w, "wb") as f:
            f.write(data)

    t = threading.Thread(target=feed)
    t.start()
    with os.fdopen(r, "rb") as f:
        path = winlayer.import_layer(f, tmp_path, "pipe.cim")
    t.join()
    ref = winlayer.import_layer(io.BytesIO(data), tmp_path, "ref.cim")
    assert_same_images(path, ref)


def test_early_hcsshim_records(tmp_path):
    # SCHILY.xattr.-prefixed MSWINDOWS records, FILETIME decimal times, mountpoint "1"
    tar = write_tar(
        tmp_path / "old.tar",
        [
            Entry("Files", tarfile.DIRTYPE, pax={"SCHILY.xattr.MSWINDOWS.fileattr": "16"}),
            Entry(
                "Files/a",
                data=b"a",
                pax={
                    "SCHILY.xattr.MSWINDOWS.fileattr": "34",
                    "SCHILY.xattr.MSWINDOWS.rawsd": b64(SD),
                    "MSWINDOWS.createtime": "132000000000000001",
                    "MSWINDOWS.writetime": "132000000000000002",
                    "MSWINDOWS.changetime": "132000000000000003",
                    "MSWINDOWS.accesstime": "132000000000000004",
                },
            ),
            Entry(
                "Files/j",
                tarfile.SYMTYPE,
                linkname="C:\\x",
                pax={"SCHILY.xattr.MSWINDOWS.fileattr": "1040", "SCHILY.xattr.MSWINDOWS.mountpoint": "1"},
            ),
        ],
    )
    path = winlayer.import_layer(tar, tmp_path, "old.cim")
    with cimfs.open(path) as img:
        st = img.stat("Files\\a")
        assert st.attributes == A.ARCHIVE | A.HIDDEN and st.security_descriptor == SD
        assert (st.creation_time, st.last_write_time, st.change_time, st.last_access_time) == (
            132000000000000001,
            132000000000000002,
            132000000000000003,
            132000000000000004,
        )
        assert img.stat("Files\\j").reparse_tag == 0xA0000003 and img.stat("Files\\j").is_dir


# ---------------------------------------------------------------- export of a fork's own changes
def test_export_fork_difference_with_whiteouts_applies_back(tmp_path):
    from cimfs import tools
    from cimfs.metadata import FileMetadata

    d = str(tmp_path)
    t = dict(
        creation_time=130_000_000_000_000_000,
        last_write_time=130_000_000_000_000_001,
        change_time=130_000_000_000_000_002,
        last_access_time=130_000_000_000_000_003,
    )
    with cimfs.create(d, "base.cim") as w:
        for p in ("Files", "Files\\keep", "Files\\gone", "Files\\gone\\deep", "Files\\meta", "Files\\becomes-file"):
            w.mkdir(p, FileMetadata(attributes=A.DIRECTORY, **t))
        w.add_file("Files\\keep\\same.txt", b"same" * 3000, FileMetadata(attributes=A.ARCHIVE, **t))
        w.add_file("Files\\keep\\data.txt", b"old data", FileMetadata(attributes=A.ARCHIVE, **t))
        w.add_file("Files\\keep\\attrs.txt", b"attrs", FileMetadata(attributes=A.ARCHIVE, **t))
        w.add_file("Files\\keep\\ads.txt", b"ads", FileMetadata(attributes=A.ARCHIVE, **t))
        w.add_stream("Files\\keep\\ads.txt:zone", b"ZoneId=3")
        w.add_file("Files\\gone\\deep\\x", b"x", FileMetadata(attributes=A.ARCHIVE, **t))
        w.add_file("Files\\becomes-dir", b"file", FileMetadata(attributes=A.ARCHIVE, **t))
        w.add_file("Files\\linked.dll", b"dll" * 100, FileMetadata(attributes=A.ARCHIVE, **t))
    t2 = dict(t, last_write_time=131_000_000_000_000_000)
    with cimfs.create(d, "child.cim", base="base.cim") as w:
        w.delete("Files\\gone")
        w.delete("Files\\keep\\data.txt")
        w.add_file("Files\\keep\\data.txt", b"new data", FileMetadata(attributes=A.ARCHIVE, **t))
        w.delete("Files\\keep\\attrs.txt")
        w.add_file("Files\\keep\\attrs.txt", b"attrs", FileMetadata(attributes=A.ARCHIVE | A.READONLY, **t))
        w.delete("Files\\keep\\ads.txt")
        w.add_file("Files\\keep\\ads.txt", b"ads", FileMetadata(attributes=A.ARCHIVE, **t))
        w.add_stream("Files\\keep\\ads.txt:zone", b"ZoneId=4")
        w.mkdir("Files\\meta", FileMetadata(attributes=A.DIRECTORY | A.HIDDEN, **t2), exist_ok=True)
        w.delete("Files\\becomes-file")
        w.add_file("Files\\becomes-file", b"now a file", FileMetadata(attributes=A.ARCHIVE, **t))
        w.delete("Files\\becomes-dir")
        w.mkdir("Files\\becomes-dir", FileMetadata(attributes=A.DIRECTORY, **t))
        w.add_file("Files\\becomes-dir\\inner", b"inner", FileMetadata(attributes=A.ARCHIVE, **t))
        w.link("Files\\keep\\alias.dll", "Files\\linked.dll")
    out = tmp_path / "diff.tar"
    winlayer.export_layer(os.path.join(d, "child.cim"), str(out), parent=os.path.join(d, "base.cim"))
    with tarfile.open(out) as tf:
        members = {m.name: m for m in tf}
    assert set(members) == {
        "Files/.wh.gone",
        "Files/keep/data.txt",
        "Files/keep/attrs.txt",
        "Files/keep/ads.txt",
        "Files/keep/ads.txt:zone:$DATA",
        "Files/meta",
        "Files/becomes-file",
        "Files/becomes-dir",
        "Files/becomes-dir/inner",
        "Files/keep/alias.dll",
    }
    assert members["Files/keep/alias.dll"].islnk() and members["Files/keep/alias.dll"].linkname == "Files/linked.dll"
    assert members["Files/meta"].isdir() and members["Files/becomes-dir"].isdir()
    winlayer.import_layer(str(out), d, "again.cim", parent="base.cim")
    with cimfs.open(os.path.join(d, "child.cim")) as a, cimfs.open(os.path.join(d, "again.cim")) as b:
        assert tools.diff_images(a, b) == {"added": [], "removed": [], "changed": []}
    # nothing changed: an empty layer; a base with an exclusion: the excluded subtree is left out
    winlayer.export_layer(os.path.join(d, "base.cim"), str(tmp_path / "none.tar"), parent=os.path.join(d, "base.cim"))
    with tarfile.open(tmp_path / "none.tar") as tf:
        assert tf.getmembers() == []
    winlayer.export_layer(
        os.path.join(d, "base.cim"), str(tmp_path / "ex.tar"), exclude=["files/GONE", "Files\\keep\\same.txt"]
    )
    with tarfile.open(tmp_path / "ex.tar") as tf:
        names = tf.getnames()
    assert "Files/keep/data.txt" in names and not any(
        n.startswith("Files/gone") or n.endswith("same.txt") for n in names
    )


def test_export_fork_difference_of_a_deep_tree(tmp_path):
    from cimfs import tools

    d = str(tmp_path)
    deep = "\\".join(["Files"] + ["d"] * 1500)
    with cimfs.create(d, "base.cim") as w:
        w.mkdir(deep, parents=True)
        w.add_file(deep + "\\old", b"old")
    with cimfs.create(d, "child.cim", base="base.cim") as w:
        w.delete(deep + "\\old")
        w.add_file(deep + "\\new", b"new")
    winlayer.export_layer(os.path.join(d, "child.cim"), str(tmp_path / "l.tar"), parent=os.path.join(d, "base.cim"))
    with tarfile.open(tmp_path / "l.tar") as tf:
        names = tf.getnames()
    prefix = deep.replace("\\", "/")
    assert names == [f"{prefix}/.wh.old", f"{prefix}/new"]
    winlayer.import_layer(str(tmp_path / "l.tar"), d, "again.cim", parent="base.cim")
    with cimfs.open(os.path.join(d, "child.cim")) as a, cimfs.open(os.path.join(d, "again.cim")) as b:
        assert tools.diff_images(a, b) == {"added": [], "removed": [], "changed": []}
