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

``--fuse`` instead compares the FUSE engine (``cimfs mount``) with
``squashfuse`` (no root needed): ``tar cf - .`` through a fresh mount (the
image files in the page cache, the mount new: the daemon serves every
request) and a second tar on that mount ("warm"), contenders alternated,
with the wall time, the daemon's CPU time (``/proc/PID/stat``) and tar's.
``CIMFS_FUSE_LOOP=pyfuse3`` in the environment measures pyfuse3's loop.

Prints a Markdown table; ``--out FILE`` writes it there too.
"""

from __future__ import annotations

import argparse
import os
import resource
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


def _make_squashfs(src: str, sq: str) -> None:
    """The peer's image: uncompressed squashfs, as bench/run.py makes it."""
    flags = ["-noI", "-noD", "-noF", "-noX", "-no-xattrs", "-noappend", "-no-progress", "-quiet"]
    subprocess.run(["mksquashfs", src, sq, *flags], check=True)


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


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tar_measured(d: str) -> tuple[float, float]:
    """(wall, CPU of tar and cat) of ``tar cf - . | cat > /dev/null`` in ``d``."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(["sh", "-c", "tar cf - . 2>/dev/null | cat > /dev/null"], cwd=d, check=True)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def fuse_main(a, work: str, env: dict) -> str:
    """The FUSE engine against squashfuse: tar through fresh and warm mounts."""
    img_dir, sq = os.path.join(work, "img"), os.path.join(work, "sq.img")
    image = os.path.join(img_dir, "i.cim")
    if not os.path.exists(image):
        os.makedirs(img_dir, exist_ok=True)
        subprocess.run(CIMFS + ["create", a.src, image], check=True, env=env, stdout=subprocess.DEVNULL)
    if not os.path.exists(sq):
        _make_squashfs(a.src, sq)
    for f in [sq] + [os.path.join(img_dir, n) for n in os.listdir(img_dir)]:
        subprocess.run(["cat", f], check=True, stdout=subprocess.DEVNULL)  # both images start in the page cache
    mnt = os.path.join(work, "fm")
    os.makedirs(mnt, exist_ok=True)

    def cimfs_mount():
        before = {int(p) for p in os.listdir("/proc") if p.isdigit()}
        subprocess.run(CIMFS + ["mount", image, mnt], check=True, env=env, stdout=subprocess.DEVNULL)
        for p in sorted({int(p) for p in os.listdir("/proc") if p.isdigit()} - before):
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if b"cimfs.mount.daemon" in f.read():
                        return p, lambda: subprocess.run(CIMFS + ["umount", mnt], check=True, env=env)
            except OSError:
                continue
        raise RuntimeError("no cimfs mount daemon found")

    def squashfuse_mount():
        proc = subprocess.Popen(["squashfuse", "-f", sq, mnt])
        for _ in range(400):
            if os.path.ismount(mnt):
                break
            time.sleep(0.05)

        def stop():
            subprocess.run(["fusermount3", "-u", mnt], check=True)
            proc.wait()

        return proc.pid, stop

    contenders = {"cimfs mount": cimfs_mount, "squashfuse": squashfuse_mount}
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in range(a.runs):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            pid, stop = contenders[name]()
            try:
                for state in ("fresh", "warm"):
                    c0 = _cpu_s(pid)
                    wall, client = _tar_measured(mnt)
                    rows.setdefault((name, state), []).append((wall, _cpu_s(pid) - c0, client))
            finally:
                stop()
            w, d, c = rows[(name, "fresh")][-1]
            print(
                f"run {r} {name}: fresh wall {w:.2f} s daemon {d:.2f} s tar {c:.2f} s; warm wall "
                f"{rows[(name, 'warm')][-1][0]:.2f} s; load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    load = os.getloadavg()
    out = [
        f"Source: `{a.src}`; {a.runs} alternating runs, medians (ratios: median of the per-run ratios); "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs; "
        f"request loop: {os.environ.get('CIMFS_FUSE_LOOP') or 'wire'}.",
        "",
        "| tar through the mount | cimfs wall | squashfuse wall | ratio (wall) | cimfs daemon CPU | squashfuse CPU "
        "| ratio (daemon CPU) | tar+cat CPU (cimfs / squashfuse) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for state in ("fresh", "warm"):
        c, s_ = rows[("cimfs mount", state)], rows[("squashfuse", state)]
        med = statistics.median
        out.append(
            f"| {state} | {med(x[0] for x in c):.2f} s | {med(x[0] for x in s_):.2f} s "
            f"| {med(x[0] / y[0] for x, y in zip(c, s_)):.2f} | {med(x[1] for x in c):.2f} s "
            f"| {med(x[1] for x in s_):.2f} s | {med(x[1] / max(y[1], 0.01) for x, y in zip(c, s_)):.2f} "
            f"| {med(x[2] for x in c):.2f} / {med(x[2] for x in s_):.2f} s |"
        )
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--src", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--work", default=None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--fuse", action="store_true", help="the FUSE engine against squashfuse (tar, fresh and warm)")
    a = p.parse_args()
    if a.fuse:
        work = a.work or tempfile.mkdtemp(prefix="cimfs-fbench-")
        env = dict(os.environ, CIMFS_RUNTIME_DIR=os.path.join(work, "run"))
        text = fuse_main(a, work, env)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    if os.geteuid() != 0:
        sys.exit("kernel_mount.py: the kernel engine (and drop_caches) need root")
    work = a.work or tempfile.mkdtemp(prefix="cimfs-kbench-")
    env = dict(os.environ, CIMFS_CACHE_DIR=os.path.join(work, "cache"), CIMFS_RUNTIME_DIR=os.path.join(work, "run"))
    img_dir, sq = os.path.join(work, "img"), os.path.join(work, "sq.img")
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
        note(
            "cimfs to-erofs",
            timed(
                CIMFS + ["to-erofs", os.path.join(img_dir, "i.cim"), os.path.join(work, "i.erofs")],
                env=env,
                stderr=subprocess.DEVNULL,
            ),
        )
    if not os.path.exists(sq):
        _make_squashfs(a.src, sq)
    image_size = tree_bytes(img_dir)
    index_size = os.path.getsize(os.path.join(work, "i.erofs"))
    sq_size = os.path.getsize(sq)

    # ---------------------------------------------------------------- mounted
    km, sm = os.path.join(work, "km"), os.path.join(work, "sm")
    os.makedirs(km, exist_ok=True)
    os.makedirs(sm, exist_ok=True)
    subprocess.run(
        CIMFS + ["mount", "--kernel", os.path.join(img_dir, "i.cim"), km],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
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
    out = [
        f"Source: `{a.src}`; {a.runs} alternating runs, medians; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs.",
        "",
        "| measure | cimfs | peer | ratio |",
        "|---|---|---|---|",
        f"| build: `cimfs to-erofs` vs `cimfs create` | {med['cimfs to-erofs']:.2f} s | {med['cimfs create']:.2f} s "
        f"| {med['cimfs to-erofs'] / med['cimfs create']:.2f} |",
        f"| size: index vs image | {index_size / 1e6:.1f} MB | {image_size / 1e6:.1f} MB | {index_size / image_size:.3f} |",
        f"| size: image vs squashfs (uncompressed) | {image_size / 1e6:.1f} MB | {sq_size / 1e6:.1f} MB "
        f"| {image_size / sq_size:.3f} |",
    ]
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
