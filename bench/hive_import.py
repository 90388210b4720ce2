"""Non-base layer import with registry hive deltas (issue 21): the import of a
layer that brings three ``Hives\\<X>_DELTA`` (so three merges into the parent's
base hives) against the same layer with the deltas under other names (no hive
work) plus the three merges alone.  Target: with-hives <= 1.5 x (without +
merges).  The floor, reading the base hives alone (open + full walk), is
reported beside it.

    python bench/hive_import.py [--keys 200000] [--work-dir bench/work/hive-import] [--runs 3]

Each measurement runs in a fresh process; wall time and the process's peak RSS
are reported (best of --runs for time, max for RSS).  The hives are made with
cimfs.regf's writer: three base hives of --keys keys (3 values each, a 2 %
share of 1-40 KB binaries) and ~1 MB deltas (changed values, tombstones, new
and superseded keys).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

HIVES = ("SYSTEM", "SOFTWARE", "DEFAULTUSER")


def _names(keys: int):
    """(top, mid, leaf) counts giving about ``keys`` leaves."""
    top = 20
    mid = 50
    return top, mid, max(1, keys // (top * mid))


def make_base(keys: int, seed: int) -> bytes:
    from cimfs.regf import REG_BINARY, REG_DWORD, REG_SZ, NewKey, NewValue, write_hive

    rng = random.Random(seed)
    top, mid, leaf = _names(keys)

    def values(i):
        blob = rng.randbytes(rng.randrange(1000, 40000)) if rng.random() < 0.02 else rng.randbytes(rng.randrange(5, 40))
        return [
            NewValue("Start", REG_DWORD, (i & 0xFFFFFFFF).to_bytes(4, "little")),
            NewValue("DisplayName", REG_SZ, f"Display name {i}\0".encode("utf-16-le")),
            NewValue("Data", REG_BINARY, blob),
        ]

    n = 0
    tops = []
    for t in range(top):
        mids = []
        for m in range(mid):
            leaves = []
            for k in range(leaf):
                n += 1
                leaves.append(NewKey(f"L{k:04d}-element", values=values(n)))
            mids.append(NewKey(f"M{m:03d}", subkeys=leaves))
        tops.append(NewKey(f"T{t:02d}", subkeys=mids))
    return write_hive(NewKey("ROOT", subkeys=tops))


def make_delta(keys: int, seed: int, target: int = 1 << 20) -> bytes:
    """About ``target`` bytes of changes over ``make_base(keys)``."""
    from cimfs.regf import REG_DWORD, REG_SZ, SUPERSEDE_TREE, TOMBSTONE, NewKey, NewValue, write_hive

    rng = random.Random(seed)
    top, mid, leaf = _names(keys)
    per_key = 200  # bytes a changed key costs, roughly
    changes = max(1, target // per_key)
    picked: dict = {}
    for _ in range(changes):
        t, m, k = rng.randrange(top), rng.randrange(mid), rng.randrange(leaf + 3)
        picked.setdefault(t, {}).setdefault(m, {})[k] = rng.random()
    tops = []
    for t, mids in sorted(picked.items()):
        ms = []
        for m, ks in sorted(mids.items()):
            leaves = []
            for k, r in sorted(ks.items()):
                name = f"L{k:04d}-element"
                if k >= leaf:  # a new key
                    leaves.append(NewKey(name, values=[NewValue("New", REG_SZ, f"new {k}\0".encode("utf-16-le"))]))
                elif r < 0.1:
                    leaves.append(NewKey(name, layer_semantics=TOMBSTONE))
                elif r < 0.2:
                    leaves.append(
                        NewKey(
                            name,
                            layer_semantics=SUPERSEDE_TREE,
                            inherit_class=True,
                            values=[NewValue("Start", REG_DWORD, b"\1\0\0\0")],
                        )
                    )
                else:
                    leaves.append(
                        NewKey(
                            name,
                            inherit_class=True,
                            values=[
                                NewValue("Start", REG_DWORD, b"\4\0\0\0"),
                                NewValue("Data", 0, b"", tombstone=True),
                            ],
                        )
                    )
            ms.append(NewKey(f"M{m:03d}", inherit_class=True, subkeys=leaves))
        tops.append(NewKey(f"T{t:02d}", inherit_class=True, subkeys=ms))
    return write_hive(NewKey("ROOT", inherit_class=True, subkeys=tops), layered=True)


def _tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.pax_headers = {"MSWINDOWS.fileattr": "16" if data is None else "32"}
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def prepare(work: str, keys: int) -> None:
    stamp = os.path.join(work, "keys")
    if os.path.exists(stamp) and open(stamp).read() == str(keys):
        return
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    base_entries = [("Files", None), ("Files/app.txt", b"base"), ("Hives", None)]
    layer = [("Files", None), ("Files/app.txt", b"layer"), ("Hives", None)]
    plain = [("Files", None), ("Files/app.txt", b"layer"), ("Hives", None)]
    for i, h in enumerate(HIVES):
        base = make_base(keys, i)
        delta = make_delta(keys, 100 + i)
        with open(os.path.join(work, f"{h}_BASE"), "wb") as f:
            f.write(base)
        with open(os.path.join(work, f"{h}_DELTA"), "wb") as f:
            f.write(delta)
        base_entries.append((f"Hives/{h}_BASE", base))
        layer.append((f"Hives/{h}_DELTA", delta))
        plain.append((f"Hives/{h}_DELTA.saved", delta))  # the same bytes under a name that is no delta
    for name, entries in (("base.tar", base_entries), ("layer.tar", layer), ("plain.tar", plain)):
        with open(os.path.join(work, name), "wb") as f:
            f.write(_tar(entries))
    from cimfs import winlayer

    winlayer.import_layer(os.path.join(work, "base.tar"), work, "base.cim")
    with open(stamp, "w") as f:
        f.write(str(keys))


def one(mode: str, work: str) -> dict:
    """One measurement in this (fresh) process."""
    from cimfs import regf, tools, winlayer

    t0 = time.perf_counter()
    if mode in ("with", "without"):
        name = f"{mode}.cim"
        tar = "layer.tar" if mode == "with" else "plain.tar"
        winlayer.import_layer(os.path.join(work, tar), work, name, parent="base.cim")
        elapsed = time.perf_counter() - t0
        tools.rm_image(os.path.join(work, name))
    elif mode == "merges":
        for h in HIVES:
            regf.merge(
                regf.open_hive(os.path.join(work, f"{h}_BASE")), [regf.open_hive(os.path.join(work, f"{h}_DELTA"))]
            )
        elapsed = time.perf_counter() - t0
    elif mode == "read":
        for h in HIVES:
            with regf.open_hive(os.path.join(work, f"{h}_BASE")) as hv:
                for _, k in hv.walk():
                    for v in k.values():
                        _ = v.data
        elapsed = time.perf_counter() - t0
    else:
        raise SystemExit(f"unknown mode {mode}")
    return {"seconds": elapsed, "max_rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=200_000, help="leaf keys per base hive")
    ap.add_argument("--work-dir", default=os.path.join(HERE, "work", "hive-import"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.work_dir)))
        return
    prepare(args.work_dir, args.keys)
    sizes = {
        h: (
            os.path.getsize(os.path.join(args.work_dir, f"{h}_BASE")),
            os.path.getsize(os.path.join(args.work_dir, f"{h}_DELTA")),
        )
        for h in HIVES
    }
    results = {}
    for mode in ("read", "merges", "without", "with"):
        runs = []
        for _ in range(args.runs):
            p = subprocess.run(
                [sys.executable, __file__, "--one", mode, "--work-dir", args.work_dir],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(p.stdout))
        results[mode] = {"seconds": min(r["seconds"] for r in runs), "max_rss_mib": max(r["max_rss_mib"] for r in runs)}
    ratio = results["with"]["seconds"] / (results["without"]["seconds"] + results["merges"]["seconds"])
    print(
        json.dumps(
            {
                "keys_per_base": args.keys,
                "hive_bytes": sizes,
                "results": results,
                "with_over_without_plus_merges": round(ratio, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
