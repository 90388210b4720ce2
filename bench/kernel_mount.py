#!/usr/bin/env python3
"""The kernel engine against squashfuse and the source directory, in one run.

    python bench/kernel_mount.py [--src DIR] [--work DIR] [--runs 3]    # root

Measures, alternating the contenders within every run and reporting medians:

- build: ``cimfs create SRC`` vs ``cimfs to-erofs`` of that image (the index
  the kernel engine mounts) -- and the sizes: image, index, squashfs;
- ``tar cf - .`` (piped, so tar reads every byte) and a stat walk
  (``bench/fsops.py stat``) through ``cimfs mount --kernel``, ``squashfuse`` and
  on SRC itself; warm (each contender's tree read once before the timed
  runs) and cold (page cache dropped before each timed run).

Prints a Markdown table; ``--out FILE`` writes it there too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
CIMFS = [PY, "-m", "cimfs.cli"]


def timed(cmd, **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def tree_bytes(d: str, prefix: str = "") -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.startswith(prefix))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--src", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--work", default=None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out")
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("kernel_mount.py: the kernel engine (and drop_caches) need root")
    work = a.work or tempfile.mkdtemp(prefix="cimfs-kbench-")
    env = dict(os.environ, CIMFS_CACHE_DIR=os.path.join(work, "cache"), CIMFS_RUNTIME_DIR=os.path.join(work, "run"))
    img_dir, sq = os.path.join(work, "img"), os.path.join(work, "sq.img")
    rows: list[tuple[str, str, float, str]] = []
    times: dict[str, list[float]] = {}

    def note(key, t):
        times.setdefault(key, []).append(t)

    # ---------------------------------------------------------------- build
    for r in range(a.runs):
        shutil.rmtree(img_dir, ignore_errors=True)
        os.makedirs(img_dir)
        drop_caches()
        note("cimfs create", timed(CIMFS + ["create", a.src, os.path.join(img_dir, "i.cim")], env=env))
        drop_caches()
        note("cimfs to-erofs", timed(CIMFS + ["to-erofs", os.path.join(img_dir, "i.cim"), os.path.join(work, "i.erofs")],
                                     env=env, stderr=subprocess.DEVNULL))
    if not os.path.exists(sq):
        subprocess.run(["mksquashfs", a.src, sq, "-noI", "-noD", "-noF", "-noX", "-no-xattrs", "-noappend",
                        "-no-progress", "-quiet"], check=True)
    image_size = tree_bytes(img_dir)
    index_size = os.path.getsize(os.path.join(work, "i.erofs"))
    sq_size = os.path.getsize(sq)

    # ---------------------------------------------------------------- mounted
    km, sm = os.path.join(work, "km"), os.path.join(work, "sm")
    os.makedirs(km, exist_ok=True)
    os.makedirs(sm, exist_ok=True)
    subprocess.run(CIMFS + ["mount", "--kernel", os.path.join(img_dir, "i.cim"), km], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["squashfuse", sq, sm], check=True)
    try:
        trees = {"kernel mount": km, "squashfuse": sm, "source dir": a.src}
        ops = {
            "tar": lambda d: timed(["sh", "-c", "tar cf - . 2>/dev/null | cat > /dev/null"], cwd=d),
            "stat": lambda d: timed([PY, os.path.join(HERE, "fsops.py"), "stat", d]),
        }
        for op, fn in ops.items():
            for name, d in trees.items():
                fn(d)  # warm
            for r in range(a.runs):
                for name, d in trees.items():
                    note(f"{op} warm/{name}", fn(d))
            for r in range(a.runs):
                for name, d in trees.items():
                    drop_caches()
                    note(f"{op} cold/{name}", fn(d))
    finally:
        subprocess.run(CIMFS + ["umount", km], env=env)
        subprocess.run(["fusermount3", "-u", sm])

    med = {k: statistics.median(v) for k, v in times.items()}
    load = os.getloadavg()
    out = [f"Source: `{a.src}`; {a.runs} alternating runs, medians; load average at the end "
           f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs.", "",
           "| measure | cimfs | peer | ratio |", "|---|---|---|---|",
           f"| build: `cimfs to-erofs` vs `cimfs create` | {med['cimfs to-erofs']:.2f} s | {med['cimfs create']:.2f} s "
           f"| {med['cimfs to-erofs'] / med['cimfs create']:.2f} |",
           f"| size: index vs image | {index_size / 1e6:.1f} MB | {image_size / 1e6:.1f} MB | {index_size / image_size:.3f} |",
           f"| size: image vs squashfs (uncompressed) | {image_size / 1e6:.1f} MB | {sq_size / 1e6:.1f} MB "
           f"| {image_size / sq_size:.3f} |"]
    for op in ("tar", "stat"):
        for state in ("warm", "cold"):
            k = med[f"{op} {state}/kernel mount"]
            for peer in ("squashfuse", "source dir"):
                s = med[f"{op} {state}/{peer}"]
                out.append(f"| {op} ({state}): kernel mount vs {peer} | {k:.2f} s | {s:.2f} s | {k / s:.2f} |")
    text = "\n".join(out) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
