#!/usr/bin/env python3
"""import-image --jobs 2 against --jobs 1: an OCI layout of 3 gzip layers made
of real files (the running interpreter's stdlib + site-packages, split in
three by size), imported into a fresh store with each, alternating, same run.

    python bench/import_jobs.py                  # ~750 MB of files, 3 pairs of runs
    python bench/import_jobs.py --mib 150 --runs 2
    python bench/import_jobs.py --work-dir /var/tmp/x --out bench/IMAGE-RESULTS.md
    python bench/import_jobs.py --boost -20     # root: the runs' session above the machine's other sessions

Each run is a fresh ``cimfs import-image`` process; wall time (with a final
``sync``), CPU time (user + sys of the process and its children) and the load
average before the run are recorded.  The figure to read is the median of the
per-pair ratios jobs2 / jobs1 (the machine is shared: pairs run back to back
see about the same load).  The section between the markers in --out is
replaced (the rest of the file kept); the raw figures go to
bench/work/import_jobs/results.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import time
import zlib

from image import warm, write_oci_image  # bench/image.py: the same image layout and cache warming

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(ROOT, "src")
BEGIN, END = "<!-- import_jobs.py: begin -->", "<!-- import_jobs.py: end -->"


def _source_files(limit: int) -> list[tuple[str, str, int]]:
    """(host path, layer path, size) of regular files of the stdlib tree, sorted, up to ``limit`` bytes."""
    top = sysconfig.get_paths()["stdlib"]
    out, total = [], 0
    for root, dirs, files in os.walk(top):
        dirs.sort()
        for n in sorted(files):
            p = os.path.join(root, n)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            size = os.path.getsize(p)
            rel = os.path.relpath(p, top).replace(os.sep, "/")
            out.append((p, "Files/Python/" + rel, size))
            total += size
            if total >= limit:
                return out
    return out


def _split(files, parts: int):
    total = sum(s for _, _, s in files)
    groups, cur, done = [[] for _ in range(parts)], 0, 0
    for f in files:
        if done >= total * (cur + 1) / parts and cur < parts - 1:
            cur += 1
        groups[cur].append(f)
        done += f[2]
    return groups


def _write_layer(blobs: str, index: int, files, whiteouts=()) -> tuple[dict, str, int]:
    """One gzip layer (hcsshim PAX records); returns (descriptor, diff ID, uncompressed bytes)."""
    raw, blob, comp = hashlib.sha256(), hashlib.sha256(), zlib.compressobj(6, zlib.DEFLATED, 31)
    tmp = os.path.join(blobs, f".layer{index}.tmp")
    size = 0
    with open(tmp, "wb") as out:

        class Sink:
            def write(self, b):
                nonlocal size
                raw.update(b)
                size += len(b)
                c = comp.compress(b)
                blob.update(c)
                out.write(c)
                return len(b)

        with tarfile.open(fileobj=Sink(), mode="w|", format=tarfile.PAX_FORMAT) as tf:
            made = set()

            def add_dir(d):
                if d in made:
                    return
                parent = d.rpartition("/")[0]
                if parent:
                    add_dir(parent)
                ti = tarfile.TarInfo(d)
                ti.type = tarfile.DIRTYPE
                ti.pax_headers = {"MSWINDOWS.fileattr": "16", "mtime": "1700000000.0"}
                tf.addfile(ti)
                made.add(d)

            add_dir("Files")
            if index == 0:
                add_dir("Files/Windows/System32/config")
                for h in ("SYSTEM", "SOFTWARE", "SAM", "SECURITY", "DEFAULT"):
                    data = (f"not a real hive: {h}\n".encode()) * 4096
                    ti = tarfile.TarInfo(f"Files/Windows/System32/config/{h}")
                    ti.size = len(data)
                    ti.pax_headers = {"MSWINDOWS.fileattr": "32", "mtime": "1700000000.0"}
                    import io

                    tf.addfile(ti, io.BytesIO(data))
            for w in whiteouts:
                d, _, base = w.rpartition("/")
                tf.addfile(tarfile.TarInfo(f"{d}/.wh.{base}"))
            for host, name, fsize in files:
                add_dir(name.rpartition("/")[0])
                ti = tarfile.TarInfo(name)
                ti.size = fsize
                ti.mtime = 1700000000
                ti.pax_headers = {"MSWINDOWS.fileattr": "32", "mtime": "1700000000.5"}
                with open(host, "rb") as f:
                    tf.addfile(ti, f)
        tail = comp.flush()
        blob.update(tail)
        out.write(tail)
    digest = "sha256:" + blob.hexdigest()
    os.replace(tmp, os.path.join(blobs, digest[7:]))
    desc = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": digest,
        "size": os.path.getsize(os.path.join(blobs, digest[7:])),
    }
    return desc, "sha256:" + raw.hexdigest(), size


def make_layout(layout: str, mib: int, log) -> dict:
    params = {"mib": mib, "version": 1, "python": sys.version}
    stamp = os.path.join(layout, ".params")
    if os.path.exists(stamp) and json.load(open(stamp)) == params:
        return json.load(open(os.path.join(layout, ".info")))
    shutil.rmtree(layout, ignore_errors=True)
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    groups = _split(_source_files(mib << 20), 3)
    layers, diff_ids, sizes = [], [], []
    for i, g in enumerate(groups):
        t0 = time.monotonic()
        # the second layer deletes a few of the first's files (whiteouts), as updates do
        wh = [name for _, name, _ in groups[0][:: max(1, len(groups[0]) // 5)]][:5] if i == 1 else ()
        desc, diff_id, size = _write_layer(blobs, i, g, wh)
        log(
            f"  layer {i}: {len(g)} files, {size / 2**20:.0f} MiB tar, {desc['size'] / 2**20:.0f} MiB gzip "
            f"({time.monotonic() - t0:.0f} s)"
        )
        layers.append(desc)
        diff_ids.append(diff_id)
        sizes.append(size)

    write_oci_image(layout, layers, diff_ids)
    info = {"layers": layers, "tar_bytes": sizes, "files": [len(g) for g in groups]}
    json.dump(info, open(os.path.join(layout, ".info"), "w"))
    json.dump(params, open(stamp, "w"))
    return info


def run_once(cmd, env) -> tuple[float, float]:
    """(wall, CPU user + sys) of one command and its children, with a final sync."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["sync"], check=True)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=750, help="MiB of files in the three layers (default 750)")
    ap.add_argument("--runs", type=int, default=3, help="pairs of runs (default 3)")
    ap.add_argument("--work-dir", default=os.path.join(HERE, "work", "import_jobs"))
    ap.add_argument("--out", default=os.path.join(HERE, "IMAGE-RESULTS.md"))
    ap.add_argument(
        "--boost",
        type=int,
        metavar="NICE",
        help="set this session's autogroup niceness (e.g. -20, as root) for the runs: see below",
    )
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    os.makedirs(args.work_dir, exist_ok=True)
    layout = os.path.join(args.work_dir, "layout")
    log(f"layout of {args.mib} MiB of stdlib files ...")
    info = make_layout(layout, args.mib, log)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    store = os.path.join(args.work_dir, "store")
    boost = "none"
    if args.boost is not None:
        # With autogroup scheduling every session gets an equal share of the
        # machine whatever its thread count: on a machine other sessions keep
        # busy, a second process of the import's session only trades places
        # with the first.  A session weighted far above the others gets both
        # cores, as an import on an otherwise idle machine does.
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(args.boost))
            boost = open("/proc/self/autogroup").read().strip()
        except OSError as e:
            log(f"cannot set the autogroup niceness: {e}")
    runs: dict[str, list] = {"1": [], "2": []}
    for r in range(args.runs):
        for jobs in ("1", "2") if r % 2 == 0 else ("2", "1"):
            shutil.rmtree(store, ignore_errors=True)
            warm(layout)
            load = os.getloadavg()[0]
            wall, cpu = run_once(
                [sys.executable, "-m", "cimfs.cli", "import-image", layout, store, "--jobs", jobs], env
            )
            runs[jobs].append({"wall": wall, "cpu": cpu, "load": load})
            log(f"pair {r + 1}: --jobs {jobs}: wall {wall:.2f} s, CPU {cpu:.2f} s, load {load:.1f}")
    shutil.rmtree(store, ignore_errors=True)
    ratios = [b["wall"] / a["wall"] for a, b in zip(runs["1"], runs["2"])]
    cpu_ratios = [b["cpu"] / a["cpu"] for a, b in zip(runs["1"], runs["2"])]
    commit = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    med = {j: statistics.median(x["wall"] for x in v) for j, v in runs.items()}
    cpu = {j: statistics.median(x["cpu"] for x in v) for j, v in runs.items()}
    loads = [x["load"] for v in runs.values() for x in v]
    lines = [
        BEGIN,
        "## import-image --jobs 2 vs --jobs 1 (bench/import_jobs.py)",
        "",
        f"- measured {_dt.datetime.now().isoformat(timespec='seconds')} at commit {commit}; {os.cpu_count()} cores; "
        f"1-minute load average before the runs {min(loads):.1f}–{max(loads):.1f} (other work was running)",
        f"- workload: 3 gzip layers of stdlib files ({', '.join(str(n) for n in info['files'])} files; "
        f"{', '.join('%.0f' % (s / 2**20) for s in info['tar_bytes'])} MiB of tar; "
        f"{', '.join('%.0f' % (x['size'] / 2**20) for x in info['layers'])} MiB of gzip); the second layer has whiteouts",
        f"- {args.runs} pairs, alternating (1 2, 2 1, ...); a fresh store and warm inputs for each run; "
        "wall includes a final `sync`; CPU is user + sys of the import process and its children",
        f"- the session's autogroup: {boost}"
        + (
            " (raised above the other sessions: the runs have both cores, as on an idle machine)"
            if boost != "none"
            else " (an equal share with the other sessions: see bench/NOTES.md)"
        ),
        "",
        "| --jobs | median wall | median CPU | runs (wall / CPU / load) |",
        "|---:|---:|---:|---|",
    ]
    for j in ("1", "2"):
        lines.append(
            f"| {j} | {med[j]:.2f} s | {cpu[j]:.2f} s | "
            + ", ".join(f"{x['wall']:.1f} / {x['cpu']:.1f} / {x['load']:.1f}" for x in runs[j])
            + " |"
        )
    lines += [
        "",
        f"- wall jobs2 / jobs1, median of the per-pair ratios: **{statistics.median(ratios):.2f}** "
        f"({', '.join(f'{x:.2f}' for x in ratios)}; target ≤ 0.7)",
        f"- CPU jobs2 / jobs1: {statistics.median(cpu_ratios):.2f} (both processes)",
        END,
    ]
    text = "\n".join(lines)
    print(text)
    old = open(args.out).read() if os.path.exists(args.out) else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text + "\n"
    with open(args.out, "w") as f:
        f.write(new)
    with open(os.path.join(args.work_dir, "results.json"), "w") as f:
        json.dump(
            {"runs": runs, "ratios": ratios, "cpu_ratios": cpu_ratios, "commit": commit, "info": info}, f, indent=1
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
