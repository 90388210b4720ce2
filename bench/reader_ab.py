"""A/B of the local reader between two source trees (e.g. main and a branch),
alternating fresh processes: ``python3 bench/reader_ab.py SRC_A SRC_B IMAGE.cim [RUNS]``.

Each run, in a new process with ``PYTHONPATH=SRC``: open the image, a cold
walk (every entry's ``stat``), the same walk again (warm: the reader's caches
filled), then a read of every file's bytes (``read_bytes``) and a copy of
every file to /dev/null (``copy_stream``, the extract path).  Prints per-run
CPU times (``time.process_time``: user + system of the process, which a
machine loaded by others disturbs far less than wall time) and the medians
with B/A ratios.  The page cache is warm (the image is
read once before the first run); run it on an otherwise idle machine or
report the load.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
import cimfs
t = time.process_time  # CPU time of this process: far less disturbed by a loaded machine than wall time
out = {}
t0 = t()
img = cimfs.open(sys.argv[1])
def walk():
    n = 0
    files = []
    for dirpath, dirs, names in img.walk():
        for name in dirs + names:
            p = dirpath + "\\" + name if dirpath else name
            st = img.stat(p, links=False)
            n += 1
            if not st.is_dir:
                files.append(st.file_id)
    return n, files
n, files = walk()
out["walk_cold"] = t() - t0
t0 = t(); walk(); out["walk_warm"] = t() - t0
t0 = t()
total = 0
for fid in files:
    total += len(img.read_bytes(fid))
out["cat_all"] = t() - t0
fd = os.open("/dev/null", os.O_WRONLY)
t0 = t()
for fid in files:
    img.copy_stream(fid, fd)
out["copy_all"] = t() - t0
out["entries"], out["bytes"] = n, total
print(json.dumps(out))
"""


def run(src: str, image: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    p = subprocess.run([sys.executable, "-c", CHILD, image], env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def main() -> None:
    a, b, image = sys.argv[1:4]
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    with open(image, "rb") as f:
        f.read()
    directory = os.path.dirname(os.path.abspath(image))
    for name in os.listdir(directory):  # the page cache holds the whole image
        with open(os.path.join(directory, name), "rb") as f:
            while f.read(8 << 20):
                pass
    results = {a: [], b: []}
    for i in range(runs):
        for src in (a, b) if i % 2 == 0 else (b, a):
            r = run(src, image)
            results[src].append(r)
            print(
                f"run {i} {src}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)), flush=True
            )
    print(f"load average: {os.getloadavg()}")
    for key in ("walk_cold", "walk_warm", "cat_all", "copy_all"):
        ma = statistics.median(r[key] for r in results[a])
        mb = statistics.median(r[key] for r in results[b])
        print(f"{key:10s} A {ma:.3f} s  B {mb:.3f} s  B/A {mb / ma:.3f}")


if __name__ == "__main__":
    main()
