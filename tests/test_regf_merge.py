"""cimfs.regf.merge: flattening differencing hives built with the writer, checked key by key against
results written out by hand (every layer semantic, inherit class, tombstone values, ...) and against a small
dict model of the rules on random layers; chains; the output read by hivex and regipy; merge_files."""

from __future__ import annotations

import os
import random

import pytest
from regf_check import (
    HIVEX,
    as_hivexml,
    check_structure,
    hivexml_tree,
    our_tree,
    regipy_tree,
)

import cimfs
from cimfs.regf import (
    MERGE,
    REG_BINARY,
    REG_DWORD,
    REG_SZ,
    SUPERSEDE_LOCAL,
    SUPERSEDE_TREE,
    TOMBSTONE,
    HiveFormatError,
    NewKey,
    NewValue,
    merge,
    merge_files,
    open_hive,
    upcase,
    write_hive,
)

K, V = NewKey, NewValue
TOMB = dict(layer_semantics=TOMBSTONE)


def dw(n: int) -> bytes:
    return n.to_bytes(4, "little")


def sz(s: str) -> bytes:
    return (s + "\0").encode("utf-16-le")


def gone(name):
    return V(name, 0, b"", tombstone=True)


BIG1, BIG2, BIG3 = bytes(range(256)) * 79, os.urandom(40_000), b"g" * 20_000  # 20224, 40000, 20000 bytes

BASE = K(
    "ROOT",
    class_name="RootClass",
    subkeys=[
        K(
            "Keep",
            class_name="KeepClass",
            last_written=100,
            values=[V("a", REG_DWORD, dw(1)), V("b", REG_SZ, sz("x"))],
            subkeys=[K("Child", values=[V("v", REG_DWORD, dw(1))])],
        ),
        K(
            "Gone",
            values=[V("g", REG_DWORD, dw(1))],
            subkeys=[K("L1", subkeys=[K("L2", subkeys=[K("L3", values=[V("deep", REG_BINARY, BIG1)])])]), K("M1")],
        ),
        K(
            "Tree",
            class_name="TreeClass",
            values=[V("old", REG_DWORD, dw(1))],
            subkeys=[K("T1", values=[V("x", REG_DWORD, dw(1))]), K("T2")],
        ),
        K(
            "Local",
            class_name="LocalClass",
            last_written=300,
            values=[V("lv", REG_DWORD, dw(1))],
            subkeys=[K("L1", values=[V("y", REG_DWORD, dw(1))])],
        ),
        K("Ärger", values=[V("ä", REG_DWORD, dw(1))]),
        K("ΣΑΣ", values=[V("s", REG_DWORD, dw(1))]),
        K(
            "Vals",
            values=[
                V("keep", REG_DWORD, dw(1)),
                V("del", REG_DWORD, dw(2)),
                V("chg", REG_DWORD, dw(3)),
                V("big", REG_BINARY, BIG1),
                V("grow", REG_BINARY, b"0123456789"),
            ],
        ),
    ],
)

D1 = K(
    "ROOT",
    inherit_class=True,
    subkeys=[
        K("Keep", inherit_class=True, last_written=50, values=[V("a", REG_SZ, sz("new")), V("c", REG_DWORD, dw(3))]),
        K("Gone", **TOMB),
        K(
            "Tree",
            layer_semantics=SUPERSEDE_TREE,
            inherit_class=True,
            values=[V("new", REG_DWORD, dw(1))],
            subkeys=[K("T3", layer_semantics=SUPERSEDE_TREE, values=[V("z", REG_DWORD, dw(1))])],
        ),
        K(
            "Local",
            layer_semantics=SUPERSEDE_LOCAL,
            class_name="NewLocal",
            last_written=200,
            values=[V("nl", REG_DWORD, dw(1))],
            subkeys=[K("L2")],
        ),
        K("ärger", inherit_class=True, values=[V("Ä", REG_DWORD, dw(2))]),
        K("σας", values=[V("s", REG_DWORD, dw(2))]),
        K(
            "Vals",
            inherit_class=True,
            values=[
                gone("del"),
                V("chg", REG_BINARY, BIG2),
                V("big", REG_BINARY, b"small"),
                V("grow", REG_BINARY, BIG3),
                gone("ghost"),
            ],
        ),
        K("New", class_name="NewClass", values=[V("n", REG_DWORD, dw(1))], subkeys=[K("NewSub")]),
        K("NewTomb", **TOMB),
    ],
)

D2 = K(
    "ROOT",
    inherit_class=True,
    subkeys=[
        K("Gone", last_written=5, values=[V("back", REG_DWORD, dw(1))]),
        K("Keep", **TOMB),
        K("Local", inherit_class=True, values=[V("lv2", REG_DWORD, dw(1))]),
        K("Tree", inherit_class=True, subkeys=[K("T3", inherit_class=True, values=[V("z2", REG_DWORD, dw(2))])]),
    ],
)

# what the rules (and the [choice]s in merge.py) say the flattened base+D1 is: path -> (class, values in order)
AFTER_D1 = {
    "": ("RootClass", []),
    "Keep": ("KeepClass", [("a", REG_SZ, sz("new")), ("b", REG_SZ, sz("x")), ("c", REG_DWORD, dw(3))]),
    "Keep\\Child": (None, [("v", REG_DWORD, dw(1))]),
    "Tree": ("TreeClass", [("new", REG_DWORD, dw(1))]),
    "Tree\\T3": (None, [("z", REG_DWORD, dw(1))]),
    "Local": ("NewLocal", [("nl", REG_DWORD, dw(1))]),
    "Local\\L1": (None, [("y", REG_DWORD, dw(1))]),
    "Local\\L2": (None, []),
    "ärger": (None, [("Ä", REG_DWORD, dw(2))]),
    "ΣΑΣ": (None, [("s", REG_DWORD, dw(1))]),
    "σας": (None, [("s", REG_DWORD, dw(2))]),
    "Vals": (
        None,
        [
            ("keep", REG_DWORD, dw(1)),
            ("chg", REG_BINARY, BIG2),
            ("big", REG_BINARY, b"small"),
            ("grow", REG_BINARY, BIG3),
        ],
    ),
    "New": ("NewClass", [("n", REG_DWORD, dw(1))]),
    "New\\NewSub": (None, []),
}
AFTER_D2 = {p: v for p, v in AFTER_D1.items() if not p.startswith("Keep")}
AFTER_D2.update(
    {
        "Gone": (None, [("back", REG_DWORD, dw(1))]),
        "Local": ("NewLocal", [("nl", REG_DWORD, dw(1)), ("lv2", REG_DWORD, dw(1))]),
        "Tree\\T3": (None, [("z", REG_DWORD, dw(1)), ("z2", REG_DWORD, dw(2))]),
    }
)


def dump(data: bytes) -> dict:
    """path -> (class, [(value name, type, data)] in stored order) of a plain hive."""
    with open_hive(data) as h:
        return {p: (k.class_name, [(v.name, v.type, v.data) for v in k.values()]) for p, k in h.walk()}


@pytest.fixture(scope="module")
def layers():
    return [write_hive(BASE, minor=5), write_hive(D1, layered=True, minor=6), write_hive(D2, layered=True, minor=6)]


def test_merge_follows_the_rules(layers):
    base, d1, _ = layers
    out = merge(base, [d1])
    check_structure(out)
    assert dump(out) == AFTER_D1
    with open_hive(out) as h:
        assert (h.major, h.minor, h.layered, h.flags) == (1, 5, False, 0)  # [choice] the base's version
        assert h.root.name == "ROOT" and h.root.flags & 0x2C == 0x2C
        for _, k in h.walk():
            assert (k.layer_semantics, k.inherit_class) == (0, False)
            assert not any(v.tombstone for v in k.values())
        assert h.key("Keep").last_written == 100  # newest of the contributing nodes
        assert h.key("Local").last_written == 200  # supersede-local: the base node does not contribute
        assert [k.name for k in h.root.subkeys()] == ["Keep", "Local", "New", "Tree", "Vals", "ärger", "ΣΑΣ", "σας"]


def test_n_way_merge_and_chains_agree(layers):
    base, d1, d2 = layers
    n_way = merge(base, [d1, d2])
    check_structure(n_way)
    assert dump(n_way) == AFTER_D2
    chained = merge(merge(base, [d1]), [d2])
    assert dump(chained) == dump(n_way)
    with open_hive(n_way) as a, open_hive(chained) as b:
        assert [(p, k.last_written, k.security, k.flags) for p, k in a.walk()] == [
            (p, k.last_written, k.security, k.flags) for p, k in b.walk()
        ]
    assert dump(merge(base, [])) == dump(base)


def test_merged_hive_read_by_hivex_and_regipy(layers, tmp_path):
    base, d1, d2 = layers
    path = tmp_path / "merged"
    path.write_bytes(merge(base, [d1, d2]))
    want = {p: {n: as_hivexml(t, d) for n, t, d in vals} for p, (_, vals) in AFTER_D2.items()}
    if HIVEX:
        assert hivexml_tree(path) == want
    lens = lambda s: s.encode("latin-1").decode("ascii", "replace") if max(s, default="a") < "\u0100" else s
    got = regipy_tree(path)
    assert {p: sorted(v) for p, v in got.items()} == {
        "\\".join(lens(x) for x in p.split("\\")) if p else p: sorted(lens(n) for n, _, _ in vals)
        for p, (_, vals) in AFTER_D2.items()
    }


def test_wide_keys_and_ri_splits(tmp_path):
    base = K(
        "R", subkeys=[K("Many", subkeys=[K(f"k{i:05d}", values=[V("i", REG_DWORD, dw(i))]) for i in range(10_000)])]
    )
    delta = K(
        "R",
        inherit_class=True,
        subkeys=[
            K(
                "Many",
                inherit_class=True,
                subkeys=[
                    *(K(f"K{i:05d}", **TOMB) for i in range(0, 10_000, 7)),
                    *(
                        K(f"k{i:05d}", inherit_class=True, values=[V("i", REG_DWORD, dw(-i & 0xFFFFFFFF))])
                        for i in range(3, 10_000, 7)
                    ),
                    *(K(f"new{i:05d}") for i in range(2000)),
                ],
            )
        ],
    )
    out = merge(write_hive(base), [write_hive(delta, layered=True)])
    check_structure(out)
    want = {
        f"Many\\k{i:05d}": {"i": (REG_DWORD, dw(-i & 0xFFFFFFFF) if i % 7 == 3 else dw(i))}
        for i in range(10_000)
        if i % 7
    }
    want.update({f"Many\\new{i:05d}": {} for i in range(2000)})
    want.update({"": {}, "Many": {}})
    with open_hive(out) as h:
        assert our_tree(h) == want
        assert h.key("Many").subkey_count == len(want) - 2
    if HIVEX:
        path = tmp_path / "m"
        path.write_bytes(out)
        assert hivexml_tree(path) == {p: {n: as_hivexml(*tv) for n, tv in vals.items()} for p, vals in want.items()}


def test_merge_files_is_atomic(layers, tmp_path):
    base, d1, d2 = layers
    paths = []
    for i, data in enumerate(layers):
        paths.append(tmp_path / f"h{i}")
        paths[-1].write_bytes(data)
    out = tmp_path / "out" / "SOFTWARE_BASE"
    out.parent.mkdir()
    merge_files(paths[0], paths[1:], out)
    assert dump(out.read_bytes()) == AFTER_D2
    bad = tmp_path / "bad"
    bad.write_bytes(d1[:5000])
    out2 = tmp_path / "out" / "OTHER"
    with pytest.raises(HiveFormatError) as e:
        merge_files(paths[0], [bad], out2)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(out.parent)) == ["SOFTWARE_BASE"]
    with pytest.raises(cimfs.CimError):
        merge_files(paths[0], [tmp_path / "missing"], out2)
    assert sorted(os.listdir(out.parent)) == ["SOFTWARE_BASE"]
    with pytest.raises(cimfs.CimError) as e:  # an output directory that does not exist
        merge_files(paths[0], paths[1:], tmp_path / "nowhere" / "out")
    assert "nowhere" in str(e.value) and e.value.hresult == cimfs.errors.ERROR_FILE_NOT_FOUND


def test_root_tombstone_is_refused(layers):
    with pytest.raises(HiveFormatError, match="root key is a tombstone"):
        merge(layers[0], [write_hive(K("ROOT", **TOMB), layered=True)])


# ---- random layers against a dict model of the rules ------------------------------------------------------------


def model_flatten(layers: list[dict]) -> dict:
    """The rules of regf-notes §3.3 with merge.py's [choice]s over plain dicts: a node is
    {"sem", "inh", "cls", "vals": [(name, type, data, tomb)], "kids": {name: node}}; returns
    {path: (class, [(name, type, data)])} with Windows' case-insensitive matching."""
    out = {}

    def find(kids: dict, up: str):
        return next((n for name, n in kids.items() if upcase(name) == up), None)

    def rec(path: str, stack: list, lo: int):
        own, closed, cut, floor = [], False, lo, lo
        for i in range(len(stack) - 1, lo - 1, -1):
            n = stack[i]
            if n is None:
                continue
            if n["sem"] == TOMBSTONE:
                cut = floor = i + 1
                break
            if not closed:
                own.append(i)
            if n["sem"] == SUPERSEDE_TREE:
                cut = i
                break
            closed = closed or n["sem"] == SUPERSEDE_LOCAL
        if not own:
            return
        cls = None
        below = [i for i in range(own[-1] - 1, floor - 1, -1) if stack[i] is not None]
        for i in own + below:
            if stack[i]["sem"] == TOMBSTONE:
                break
            if not stack[i]["inh"]:
                cls = stack[i]["cls"]
                break
        slots = {}
        for i in reversed(own):
            for name, typ, data, tomb in stack[i]["vals"]:
                slots[upcase(name)] = None if tomb else (name, typ, data)
        out[path] = (cls, [v for v in slots.values() if v])
        names = {}
        for i in range(cut, len(stack)):
            if stack[i] is not None:
                for name in stack[i]["kids"]:
                    names.setdefault(upcase(name), name)
        for up in names:
            sub = [find(stack[i]["kids"], up) if i >= cut and stack[i] is not None else None for i in range(len(stack))]
            top = next(sub[i] for i in range(len(sub) - 1, -1, -1) if sub[i] is not None and i >= cut)
            own_top = next(
                (
                    sub[i]["name"]
                    for i in range(len(sub) - 1, -1, -1)
                    if sub[i] is not None and sub[i]["sem"] != TOMBSTONE
                ),
                top["name"],
            )
            rec(f"{path}\\{own_top}" if path else own_top, sub, cut)

    rec("", layers, 0)
    return out


NAMES = ["alpha", "Alpha", "beta", "ÄRGER", "ärger", "ΣΑΣ", "σας", "gamma", "δ", "Ω"]


def random_layer(rng: random.Random, depth: int, layered: bool) -> dict:
    kids = {}
    for name in rng.sample(NAMES, rng.randrange(0, 5 if depth < 3 else 1)):
        if any(upcase(n) == upcase(name) for n in kids):
            continue
        sem = rng.choice([MERGE, MERGE, TOMBSTONE, SUPERSEDE_LOCAL, SUPERSEDE_TREE]) if layered else MERGE
        node = random_layer(rng, depth + 1, layered) if sem != TOMBSTONE else {"kids": {}, "vals": []}
        node.update(
            name=name,
            sem=sem,
            inh=layered and sem != TOMBSTONE and rng.random() < 0.5,
            cls=None if sem == TOMBSTONE or rng.random() < 0.5 else f"c{rng.randrange(9)}",
        )
        kids[name] = node
    vals, seen = [], set()
    for _ in range(rng.randrange(4)):
        name = rng.choice(["v", "V", "w", "", "ä", "Ä", "big"])
        if upcase(name) in seen:
            continue
        seen.add(upcase(name))
        if layered and rng.random() < 0.3:
            vals.append((name, 0, b"", True))
        else:
            size = rng.choice([0, 3, 4, 9, 16344, 16345, 30000])
            vals.append((name, rng.choice([REG_BINARY, REG_SZ, REG_DWORD, 77]), rng.randbytes(size), False))
    return {"sem": MERGE, "inh": layered, "cls": None, "name": "ROOT", "kids": kids, "vals": vals}


def to_newkey(n: dict) -> NewKey:
    return K(
        n["name"],
        layer_semantics=n["sem"],
        inherit_class=n["inh"],
        class_name=n["cls"],
        values=[V(a, t, d, tomb) for a, t, d, tomb in n["vals"]],
        subkeys=[to_newkey(c) for c in n["kids"].values()],
    )


@pytest.mark.parametrize("seed", range(12))
def test_random_layers_match_the_model(seed):
    rng = random.Random(seed)
    models = [random_layer(rng, 0, i > 0) for i in range(3)]
    models[0]["inh"] = False
    hives = [write_hive(to_newkey(m), layered=i > 0) for i, m in enumerate(models)]
    n_way = merge(hives[0], hives[1:])
    check_structure(n_way)
    assert dump(n_way) == model_flatten(models)
    assert dump(merge(merge(hives[0], [hives[1]]), [hives[2]])) == dump(n_way)
