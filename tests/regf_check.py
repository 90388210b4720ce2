"""Independent checks of registry hives for the cimfs.regf tests: a byte-level checker of the rules in
regf-notes §2 (written from the notes with plain struct, not with cimfs.regf's reader), and the trees that
hivex (hivexml, hivexregedit) and regipy read, to compare with what a test expects."""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET

from cimfs.regf import upcase

HIVEX = shutil.which("hivexml") and shutil.which("hivexregedit") and shutil.which("hivexget")


def _u32(b, o):
    return struct.unpack_from("<I", b, o)[0]


def check_structure(data: bytes) -> dict:
    """Assert every writer rule on ``data``; returns counts (keys, values, sk cells)."""
    assert data[:4] == b"regf"
    seq1, seq2 = struct.unpack_from("<II", data, 4)
    assert seq1 == seq2
    major, minor, ftype, fmt, root, length, cluster = struct.unpack_from("<7I", data, 20)
    assert (major, ftype, fmt, cluster) == (1, 0, 1, 1) and minor in (3, 4, 5, 6)
    x = 0
    for i in range(127):
        x ^= _u32(data, 4 * i)
    x = 0xFFFFFFFE if x == 0xFFFFFFFF else (x or 1)
    assert _u32(data, 508) == x, "checksum"
    assert root == 0x20 and length % 4096 == 0 and len(data) >= 4096 + length
    bins = data[4096 : 4096 + length]
    cells = {}  # rel offset -> allocated size
    off = 0
    while off < length:
        assert bins[off : off + 4] == b"hbin" and _u32(bins, off + 4) == off
        size = _u32(bins, off + 8)
        assert size and size % 4096 == 0
        c = off + 32
        while c < off + size:
            s = struct.unpack_from("<i", bins, c)[0]
            assert s != 0 and abs(s) % 8 == 0 and c + abs(s) <= off + size, f"cell at {c:#x}"
            if s < 0:
                cells[c] = -s
            c += abs(s)
        assert c == off + size, "cells tile the bin"
        off += size
    used = {}

    def use(o, sig=None):
        assert o in cells, f"offset {o:#x} is not an allocated cell"
        if sig:
            assert bins[o + 4 : o + 6] == sig, f"{o:#x} is not {sig}"
        used[o] = used.get(o, 0) + 1
        return o + 4, cells[o] - 4

    sk_users: dict[int, int] = {}
    counts = {"keys": 0, "values": 0}

    def name_of(start, n, compressed):
        raw = bins[start : start + n]
        return raw.decode("latin-1") if compressed else raw.decode("utf-16-le", "surrogatepass")

    def u16len(s):
        return len(s.encode("utf-16-le", "surrogatepass"))

    def lh(s):
        h = 0
        for cu in struct.unpack(f"<{u16len(s) // 2}H", s.encode("utf-16-le", "surrogatepass")):
            h = (h * 37 + cu) & 0xFFFFFFFF
        return h

    stack = [(root, None)]
    while stack:
        o, parent = stack.pop()
        start, n = use(o, b"nk")
        (
            flags,
            _ts,
            _acc,
            _layer,
            _sp,
            par,
            nsub,
            nvol,
            sublist,
            vollist,
            nval,
            vallist,
            sk,
            cls,
            maxname,
            maxclass,
            maxvname,
            maxvdata,
            _wv,
            namelen,
            classlen,
        ) = struct.unpack_from("<HQBBHIIIIIIIIIIIIIIHH", bins, start + 2)
        counts["keys"] += 1
        name = name_of(start + 76, namelen, flags & 0x20)
        if not flags & 0x20 and name:
            assert any(ord(ch) > 255 for ch in name), "a Latin-1 name is stored compressed"
        if parent is None:
            assert flags & 0x2C == 0x2C
        else:
            assert par == parent and not flags & 0x4
        assert nvol == 0 and vollist == 0xFFFFFFFF
        use(sk, b"sk")
        used[sk] -= 1
        sk_users[sk] = sk_users.get(sk, 0) + 1
        if cls != 0xFFFFFFFF:
            cs, cn = use(cls)
            assert classlen <= cn
        kids = []
        if nsub:
            ls, ln = use(sublist)
            sig, cnt = struct.unpack_from("<2sH", bins, ls)
            leaves = []
            if sig == b"ri":
                for i in range(cnt):
                    leaves.append(_u32(bins, ls + 4 + 4 * i))
            else:
                leaves.append(None)
            for leaf in leaves:
                if leaf is not None:
                    ls2, _ = use(leaf)
                else:
                    ls2 = ls
                lsig, lcnt = struct.unpack_from("<2sH", bins, ls2)
                assert lsig in (b"lf", b"lh", b"li")
                assert lsig != b"lh" or minor >= 5
                assert lcnt <= (1012 if lsig == b"li" else 511), "leaf split"
                step = 4 if lsig == b"li" else 8
                for i in range(lcnt):
                    ko = _u32(bins, ls2 + 4 + step * i)
                    ks = ko + 4
                    kflags = struct.unpack_from("<H", bins, ks + 2)[0]
                    kname = name_of(ks + 76, struct.unpack_from("<H", bins, ks + 72)[0], kflags & 0x20)
                    if lsig == b"lh":
                        assert _u32(bins, ls2 + 8 + 8 * i) == lh(upcase(kname)), f"lh hash of {kname!r}"
                    elif lsig == b"lf":
                        hint = kname.encode("latin-1")[:4].ljust(4, b"\0") if kflags & 0x20 else bytes(4)
                        assert bins[ls2 + 8 + 8 * i : ls2 + 12 + 8 * i] == hint
                    kids.append((ko, kname))
            assert len(kids) == nsub
            ups = [upcase(k[1]).encode("utf-16-be", "surrogatepass") for k in kids]
            assert all(a < b for a, b in zip(ups, ups[1:])), "subkeys sorted, no duplicates"
        else:
            assert sublist == 0xFFFFFFFF
        assert maxname & 0xFFFF == max((u16len(k[1]) for k in kids), default=0), f"MaxNameLen of {name!r}"
        kid_classes = [struct.unpack_from("<H", bins, k[0] + 4 + 74)[0] for k in kids]
        assert maxclass == max(kid_classes, default=0)
        vnames, vsizes = [], []
        if nval:
            vs, vn = use(vallist)
            assert 4 * nval <= vn
            for i in range(nval):
                vo = _u32(bins, vs + 4 * i)
                s, _ = use(vo, b"vk")
                vnl, size, doff, _typ, vflags = struct.unpack_from("<HIIIH", bins, s + 2)
                vnames.append(name_of(s + 20, vnl, vflags & 1))
                counts["values"] += 1
                if vflags & 2:
                    assert size == 0 and doff == 0xFFFFFFFF
                    vsizes.append(0)
                    continue
                if size & 0x80000000:
                    assert size & 0x7FFFFFFF <= 4
                    vsizes.append(size & 0x7FFFFFFF)
                    continue
                assert size > 4, "data of 4 bytes or fewer is inline"
                vsizes.append(size)
                ds, dn = use(doff)
                if size > 16344 and minor >= 4:
                    assert bins[ds : ds + 2] == b"db"
                    nseg, segl = struct.unpack_from("<HI", bins, ds + 2)
                    assert nseg == -(-size // 16344)
                    ss, _ = use(segl)
                    for j in range(nseg):
                        _, sn = use(_u32(bins, ss + 4 * j))
                        assert sn >= min(16344, size - 16344 * j)
                else:
                    assert dn >= size
            assert len({upcase(v) for v in vnames}) == len(vnames), "value names unique"
        else:
            assert vallist == 0xFFFFFFFF
        assert maxvname == max((u16len(v) for v in vnames), default=0)
        assert maxvdata == max(vsizes, default=0)
        stack.extend((k[0], o) for k in kids)
    ring = []
    first = next(iter(sk_users))
    o = first
    while True:
        ring.append(o)
        flink = _u32(bins, o + 8)
        assert _u32(bins, flink + 12) == o, "sk blink"
        o = flink
        if o == first:
            break
        assert len(ring) <= len(cells)
    assert sorted(ring) == sorted(sk_users), "one ring holds every sk"
    for sk, users in sk_users.items():
        assert _u32(bins, sk + 16) == users, "sk reference count"
        used[sk] = 1
    descs = [bins[sk + 24 : sk + 24 + _u32(bins, sk + 20)] for sk in ring]
    assert len(set(descs)) == len(descs), "descriptors deduplicated"
    assert set(used) == set(cells), "no allocated cell left unreferenced"
    assert all(v == 1 for v in used.values()), "no cell referenced twice"
    counts["sk"] = len(ring)
    return counts


# ---- what independent readers see -----------------------------------------------------------------------------

_HIVEXML_TYPES = {
    "none": 0,
    "string": 1,
    "expand": 2,
    "binary": 3,
    "int32": 4,
    "int32-be": 5,
    "link": 6,
    "string-list": 7,
    "resource-list": 8,
    "full-resource-description": 9,
    "resource-requirements-list": 10,
    "int64": 11,
}


def hivexml_tree(path) -> dict:
    """{key path: {value name: (type, comparable data)}} as hivexml reads the hive."""
    out = subprocess.run(["hivexml", str(path)], capture_output=True, timeout=120, check=True).stdout
    tree: dict = {}

    def visit(node, prefix):
        name = node.get("name")
        path = "" if node.get("root") else (f"{prefix}\\{name}" if prefix else name)
        vals = {}
        for v in node.findall("value"):
            vname = "" if v.get("default") else v.get("key")
            typ = v.get("type")
            typ = _HIVEXML_TYPES.get(typ, typ)
            raw = v.get("value")
            if typ == 7:
                raw = tuple(s.text or "" for s in v.findall("string"))
            if v.get("encoding") == "base64":
                raw = base64.b64decode(raw)
            vals[vname] = (typ, raw)
        tree[path] = vals
        for child in node.findall("node"):
            visit(child, path)

    visit(ET.fromstring(out).find("node"), "")
    return tree


def as_hivexml(typ: int, data: bytes):
    """What hivexml shows for a value of ``typ`` holding ``data``."""
    if typ in (1, 2, 6):
        try:
            text = data.decode("utf-16-le")
        except UnicodeDecodeError:
            return (typ, data)
        return (typ, text.split("\0", 1)[0])
    if typ > 11:
        return ("unknown", data)
    if typ == 7:
        return (typ, tuple(data.decode("utf-16-le").split("\0")[:-1]))  # hivex keeps the list's empty terminator
    if typ in (4, 5) and len(data) == 4:
        return (typ, str(int.from_bytes(data, "little" if typ == 4 else "big", signed=True)))
    if typ == 11 and len(data) == 8:
        return (typ, str(int.from_bytes(data, "little", signed=True)))
    return (typ, data)


def hivexregedit_values(path, key: str = "\\") -> dict:
    """{key path: {value name: (type, bytes)}} from ``hivexregedit --export`` (ASCII names only)."""
    text = subprocess.run(
        ["hivexregedit", "--export", str(path), key], capture_output=True, timeout=120, check=True
    ).stdout.decode("utf-8", "replace")
    tree: dict = {}
    cur = None
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            cur = tree.setdefault(line[2:-1], {})
            continue
        if cur is None or "=" not in line:
            continue
        if line.startswith("@="):
            name, rest = "", line[2:]
        else:
            end = 1
            while line[end] != '"':
                end += 2 if line[end] == "\\" else 1
            name = line[1:end].replace('\\"', '"').replace("\\\\", "\\")
            rest = line[end + 2 :]
        if rest.startswith("dword:"):
            cur[name] = (4, int(rest[6:], 16).to_bytes(4, "little"))
        elif rest.startswith("hex("):
            typ, hexes = rest[4:].split("):", 1)
            cur[name] = (int(typ, 16), bytes.fromhex(hexes.replace(",", "")))
        elif rest.startswith("hex:"):
            cur[name] = (3, bytes.fromhex(rest[4:].replace(",", "")))
        elif rest.startswith('"'):
            cur[name] = (1, (rest[1:-1] + "\0").encode("utf-16-le"))
    return tree


def regipy_tree(path) -> dict:
    """{key path: {value name: type name}} as regipy reads the hive (its Latin-1 names come out mangled)."""
    from regipy.registry import RegistryHive

    hive = RegistryHive(str(path))
    tree: dict = {}

    def visit(nk, prefix):
        for sub in nk.iter_subkeys():
            p = f"{prefix}\\{sub.name}" if prefix else sub.name
            tree[p] = {
                ("" if v.name == "(default)" else v.name): v.value_type for v in sub.iter_values(trim_values=False)
            }
            visit(sub, p)

    tree[""] = {
        ("" if v.name == "(default)" else v.name): v.value_type for v in hive.root.iter_values(trim_values=False)
    }
    visit(hive.root, "")
    return tree


def our_tree(hive) -> dict:
    """{key path: {value name: (type, data)}} with cimfs.regf's reader (tombstones as type None)."""
    return {p: {v.name: ((None, b"") if v.tombstone else (v.type, v.data)) for v in k.values()} for p, k in hive.walk()}
