"""Start-up of the ``cimfs`` command (issue 23): ``--version``, ``--help``,
``cat`` of a small file and ``fork --add`` of a 10-file directory, each run N
times; the minimum and median of wall time and of user+sys CPU (wall alone is
noisy on a shared machine), the load average beside them, and ``python -c
pass`` and ``import click`` as the floor.  With ``--create DIR`` also
``cimfs create DIR`` and the ratio fork / create.

    python bench/startup.py [--runs 10] [--create /usr/lib/python3.11]

The program is the installed ``cimfs`` console script beside this Python when
there is one (what a user runs), else ``python -m cimfs.cli``.  Python reads
compiled bytecode when it finds it: with PYTHONDONTWRITEBYTECODE set and no
``__pycache__`` in the source tree every run compiles every module it imports.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def measure(cmd: list[str], runs: int, before=None) -> dict:
    walls, cpus = [], []
    for _ in range(runs):
        if before:
            before()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
        wall = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode:
            raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.decode()[-300:]}")
        walls.append(wall)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return {
        "wall_min": min(walls),
        "wall_median": statistics.median(walls),
        "cpu_min": min(cpus),
        "cpu_median": statistics.median(cpus),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--create", metavar="DIR", help="also time 'cimfs create DIR' (once per run)")
    args = ap.parse_args()
    script = os.path.join(os.path.dirname(sys.executable), "cimfs")
    cimfs = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "cimfs.cli"]
    work = tempfile.mkdtemp(prefix="cimfs-startup-")
    try:
        add = os.path.join(work, "add")
        os.makedirs(add)
        for i in range(10):
            with open(os.path.join(add, f"f{i}.txt"), "w") as f:
                f.write(f"file {i}\n" * (i + 1))
        imgs = os.path.join(work, "imgs")
        os.makedirs(imgs)
        subprocess.run([*cimfs, "create", add, os.path.join(imgs, "t.cim")], check=True)
        fork_img = os.path.join(imgs, "f.cim")

        def no_fork():
            if os.path.exists(fork_img):
                subprocess.run([*cimfs, "rm", fork_img], check=True)

        rows = [
            ("python -c pass", [sys.executable, "-c", "pass"], None),
            ("python -c 'import click'", [sys.executable, "-c", "import click"], None),
            ("cimfs --version", [*cimfs, "--version"], None),
            ("cimfs --help", [*cimfs, "--help"], None),
            ("cimfs cat IMG small-file", [*cimfs, "cat", os.path.join(imgs, "t.cim"), "f3.txt"], None),
            (
                "cimfs fork --add DIR (10 files)",
                [*cimfs, "fork", os.path.join(imgs, "t.cim"), fork_img, "--add", add],
                no_fork,
            ),
        ]
        results = {}
        print(f"{'command':34} {'wall min':>9} {'median':>7} {'cpu min':>8} {'median':>7}  load")
        for label, cmd, before in rows:
            r = results[label] = measure(cmd, args.runs, before)
            print(
                f"{label:34} {r['wall_min']:9.3f} {r['wall_median']:7.3f} {r['cpu_min']:8.3f} "
                f"{r['cpu_median']:7.3f}  {r['load']:.2f}",
                flush=True,
            )
        if args.create:
            out = os.path.join(work, "big")
            os.makedirs(out)

            def fresh():
                shutil.rmtree(out)
                os.makedirs(out)

            r = measure([*cimfs, "create", args.create, os.path.join(out, "c.cim")], max(1, args.runs // 5), fresh)
            print(
                f"{'cimfs create ' + args.create:34} {r['wall_min']:9.3f} {r['wall_median']:7.3f} "
                f"{r['cpu_min']:8.3f} {r['cpu_median']:7.3f}  {r['load']:.2f}"
            )
            fork = results["cimfs fork --add DIR (10 files)"]
            print(
                f"fork / create: wall {fork['wall_median'] / r['wall_median']:.3f} (medians), "
                f"cpu {fork['cpu_median'] / r['cpu_median']:.3f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
