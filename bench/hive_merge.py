"""Hive merge benchmark (issue 21): flatten a synthetic ~100 MB base hive (>= 500 000 keys, >= 1 500 000
values, shaped like a Server Core SOFTWARE hive) with a ~1 MB differencing hive, and read the base alone (a
full walk reading every value: the floor).  Each operation runs in a fresh process under /usr/bin/time -v;
wall, CPU (user+sys) and max RSS are reported.

    python bench/hive_merge.py [--work-dir bench/work/hive] [--runs 3]

The hives are generated once into the work directory (git-ignored) with cimfs.regf's own writer and reused.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from cimfs.regf import (
    REG_BINARY,
    REG_DWORD,
    REG_SZ,
    SUPERSEDE_LOCAL,
    SUPERSEDE_TREE,
    TOMBSTONE,
    NewKey,
    NewValue,
    write_hive,
)
from cimfs.regf import layout as L
from cimfs.regf.names import encode_name, order_key, upcase, utf16_bytes
from cimfs.regf.writer import HiveBuilder

FANOUT = (12, 40, 30, 36)  # 509 K keys in all (one depth-1 key has WIDE children instead of its subtree)
WIDE = 20_000  # one CLSID-like key with this many children
SDS = [L.default_security_descriptor()[:-4] + i.to_bytes(4, "little") for i in range(1, 40)]


def key_name(depth: int, i: int) -> str:
    return f"{'ABCD'[depth]}{i:03d}{'Ε' if i % 97 == 0 else 'e'}"


def values_of(rng: random.Random, path_id: int) -> list[tuple[str, int, bytes]]:
    vals = [
        ("Start", REG_DWORD, (path_id & 0xFFFFFFFF).to_bytes(4, "little")),
        ("Name", REG_SZ, f"N{path_id}\0".encode("utf-16-le")),
    ]
    r = rng.random()
    if r < 0.001:
        vals.append(("Blob", REG_BINARY, rng.randbytes(rng.randrange(1000, 40000))))
    elif r < 0.2:
        vals.append(("Data", REG_BINARY, rng.randbytes(rng.randrange(5, 40))))
    else:
        vals.append(("Type", REG_DWORD, rng.randbytes(4)))
    return vals


def generate_base(path: str) -> None:
    """The base, streamed through HiveBuilder (no tree in memory)."""
    rng = random.Random(21)
    b = HiveBuilder(minor=5)
    counter = [0]

    def write(name: str, parent: int, depth: int, leaf: bool = False) -> tuple:
        raw, comp = encode_name(name)
        off = b.alloc(b.key_size(len(raw)))
        sk = b.sk(SDS[rng.randrange(len(SDS))] if depth < 2 else SDS[0])
        counter[0] += 1
        pid = counter[0]
        if depth == 1 and name == key_name(0, 0):
            kids = [f"{{{i:08X}-0000-0000-C000-000000000046}}" for i in range(WIDE)]
        elif depth < len(FANOUT) and not leaf:
            kids = [key_name(depth, i) for i in range(FANOUT[depth])]
        else:
            kids = []
        kids.sort(key=lambda n: (upcase(n), n))
        entries = []
        for k in kids:
            e = write(k, off, depth + 1, leaf or k.startswith("{"))
            entries.append(e)
        ks = order_key([e[1] for e in entries])
        if ks:
            entries.sort(key=lambda e: ks(e[1]))
        vals = values_of(rng, pid) if depth else []
        voffs = [b.value(*encode_name(n), t, d) for n, t, d in vals]
        b.key(
            off,
            raw,
            comp,
            flags=0,
            last_written=132_500_000_000_000_000 + pid,
            layer=0,
            parent=parent,
            nsub=len(entries),
            sublist=b.subkey_list(entries),
            nval=len(voffs),
            vallist=b.value_list(voffs),
            sk=sk,
            class_off=L.NONE,
            class_len=0,
            maxname=max((utf16_bytes(e[4]) for e in entries), default=0),
            user_flags=0,
            maxclass=0,
            maxvalname=max((utf16_bytes(v[0]) for v in vals), default=0),
            maxvaldata=max((len(v[2]) for v in vals), default=0),
        )
        return off, upcase(name), raw, comp, name

    root = write("ROOT", L.NONE, 0)[0]
    data = b.finish(root, file_name="SOFTWARE")
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    print(f"base: {counter[0]} keys, {len(data) / 1e6:.1f} MB", file=sys.stderr)


def generate_delta(path: str) -> None:
    """A ~1 MB delta: merge placeholders (0x80) down to changed keys, changed and tombstoned values, new keys,
    tombstones over whole subtrees, supersede-tree and supersede-local keys."""
    rng = random.Random(2101)
    top: dict = {}

    def node(parts):
        cur = top
        for p in parts:
            cur = cur.setdefault(p, {"__vals": {}, "__sem": 0})
        return cur

    for _ in range(3000):
        parts = [key_name(d, rng.randrange(FANOUT[d])) for d in range(rng.randrange(2, 5))]
        n = node(parts)
        r = rng.random()
        if r < 0.5:
            for v in (
                NewValue("Start", REG_SZ, f"changed {rng.random()}\0".encode("utf-16-le")),
                NewValue("Data", 0, b"", tombstone=True),
                NewValue("New", REG_BINARY, rng.randbytes(200)),
            ):
                n["__vals"][v.name] = v
        elif r < 0.8:
            n[f"NewKey{rng.randrange(10**6)}"] = {"__vals": {"v": NewValue("v", REG_DWORD, b"\1\0\0\0")}, "__sem": 0}
        elif r < 0.9 and len(parts) >= 3:
            n.clear()
            n.update({"__vals": {}, "__sem": TOMBSTONE})
        elif r < 0.97 and len(parts) == 4:
            n["__sem"] = SUPERSEDE_TREE
            n["__vals"] = {"Replaced": NewValue("Replaced", REG_SZ, b"r\0\0\0")}
        else:
            n["__sem"] = SUPERSEDE_LOCAL

    def build(name, d, inherited_tree=False):
        sem = d.get("__sem", 0)
        if inherited_tree and sem != TOMBSTONE:
            sem = SUPERSEDE_TREE
        kids = [build(k, v, sem == SUPERSEDE_TREE) for k, v in d.items() if not k.startswith("__")]
        if sem == TOMBSTONE:
            return NewKey(name, layer_semantics=TOMBSTONE)
        return NewKey(
            name,
            values=list(d.get("__vals", {}).values()),
            subkeys=kids,
            layer_semantics=sem,
            inherit_class=sem != SUPERSEDE_TREE or not inherited_tree,
        )

    data = write_hive(build("ROOT", top), minor=6, layered=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    print(f"delta: {len(data) / 1e6:.2f} MB", file=sys.stderr)


MERGE = """
import sys; sys.path.insert(0, {src!r})
from cimfs.regf import merge_files
merge_files({base!r}, [{delta!r}], {out!r})
"""
WALK = """
import sys; sys.path.insert(0, {src!r})
from cimfs.regf import open_hive
n = v = 0
with open_hive({base!r}) as h:
    for _, k in h.walk():
        n += 1
        for val in k.values():
            v += 1
            val.data
print(n, v, file=sys.stderr)
"""


def timed(code: str) -> dict:
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)

    def field(name):
        return re.search(rf"{re.escape(name)}: (.*)", r.stderr).group(1).strip()

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")
    return {
        "wall": sum(float(x) * 60**i for i, x in enumerate(reversed(wall))),
        "cpu": float(field("User time (seconds)")) + float(field("System time (seconds)")),
        "rss_mb": int(field("Maximum resident set size (kbytes)")) / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default=os.path.join(HERE, "work", "hive"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    base, delta = os.path.join(args.work_dir, "SOFTWARE_BASE"), os.path.join(args.work_dir, "SOFTWARE_DELTA")
    out = os.path.join(args.work_dir, "SOFTWARE_MERGED")
    if not os.path.exists(base):
        t = time.time()
        generate_base(base)
        print(f"generated the base in {time.time() - t:.0f} s", file=sys.stderr)
    if not os.path.exists(delta):
        generate_delta(delta)
    src = os.path.join(os.path.dirname(HERE), "src")
    rows = {"merge": [], "walk": []}
    for _ in range(args.runs):
        rows["merge"].append(timed(MERGE.format(src=src, base=base, delta=delta, out=out)))
        rows["walk"].append(timed(WALK.format(src=src, base=base)))
    print(
        f"base {os.path.getsize(base) / 1e6:.1f} MB, delta {os.path.getsize(delta) / 1e6:.2f} MB, "
        f"merged {os.path.getsize(out) / 1e6:.1f} MB; the run with the least CPU of {args.runs} (wall / CPU / max RSS):"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    best = {op: min(runs, key=lambda r: r["cpu"]) for op, runs in rows.items()}
    for op, runs in rows.items():
        b = best[op]
        walls = ", ".join(f"{r['wall']:.1f}" for r in runs)
        print(f"| {op} | {b['wall']:.1f} s | {b['cpu']:.1f} s | {b['rss_mb']:.0f} MiB | all walls: {walls} s |")
    print(f"merge / walk (CPU): {best['merge']['cpu'] / best['walk']['cpu']:.2f}")


if __name__ == "__main__":
    main()
