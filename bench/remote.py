"""Bytes and requests of remote reads: ``python3 bench/remote.py [WORKDIR]``.

Builds a ~1 GB image (the stdlib + site-packages image of workload 1, forked
with one 224 MiB file so its region files come from two sets), serves it from
moto's S3 server and from a Range-serving HTTP server on 127.0.0.1
(``tests/remote_servers.py``), and counts on the server side what these cost:

- ``cimfs cat`` of one small file (target: < 1 MiB transferred in total);
- ``cimfs ls`` of the root and ``cimfs stat`` of one file;
- ``cimfs extract`` of the whole image from S3 (target: <= 1.05 x the bytes
  the image stores: its ``.cim`` and region files), checked identical to a
  local extract (``diff -r``), with wall times for context.

The same extract over HTTP shows what the S3 run's wall time owes to moto
(which copies the whole object for every ranged GET).  ``--no-s3-extract``
skips the S3 extract (~10 min on 2 loaded cores).

Prints a Markdown table (paste into bench/NOTES.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from remote_servers import RangeHTTPServer, S3Server  # noqa: E402

SMALL = "json/decoder.py"
PAD = 224 << 20


def cimfs(*args, env=None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "cimfs.cli", *map(str, args)],
        env=full,
        stdout=stdout,
        stderr=subprocess.PIPE,
        check=True,
    )


def build(work: str) -> str:
    images = os.path.join(work, "images")
    if os.path.exists(os.path.join(images, "layer.cim")):
        return images
    os.makedirs(images, exist_ok=True)
    cimfs("create", sysconfig.get_paths()["stdlib"], os.path.join(images, "base.cim"))
    pad = os.path.join(work, "pad.bin")
    with open(pad, "wb") as f:
        for _ in range(PAD >> 20):
            f.write(os.urandom(1 << 20))
    cimfs("fork", os.path.join(images, "base.cim"), os.path.join(images, "layer.cim"), "--add", f"{pad}:pad/big.bin")
    os.unlink(pad)
    return images


def stored(images: str) -> int:
    """Bytes the image needs: its .cim and the region files of its sets (the base's and its own)."""
    return sum(
        os.path.getsize(os.path.join(images, n))
        for n in os.listdir(images)
        if n == "layer.cim" or n.startswith("region_")
    )


def measure(server, label, fn) -> tuple[int, int, float]:
    server.counter.reset()
    t0 = time.perf_counter()
    fn()
    return server.counter.requests, server.counter.bytes, time.perf_counter() - t0


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    s3_extract = "--no-s3-extract" not in sys.argv
    work = args[0] if args else os.path.join(tempfile.gettempdir(), "cimfs-bench-remote")
    os.makedirs(work, exist_ok=True)
    images = build(work)
    total = stored(images)
    print(f"image: {images}/layer.cim, {total / 2**30:.2f} GiB stored (.cim + region files)")
    with open(os.path.join(sysconfig.get_paths()["stdlib"], SMALL), "rb") as f:
        small = f.read()
    rows = []
    with S3Server() as s3, RangeHTTPServer(work) as http:
        t0 = time.perf_counter()
        s3.upload_dir(images, "bench", "images")
        print(f"upload to moto: {time.perf_counter() - t0:.1f} s")
        targets = [
            ("S3 (moto)", "s3://bench/images/layer.cim", s3, s3.env()),
            ("HTTP", f"{http.url}/images/layer.cim", http, {}),
        ]
        for name, url, server, env in targets:
            out = {}
            r = measure(server, name, lambda: out.setdefault("cat", cimfs("cat", url, SMALL, env=env).stdout))
            assert out["cat"] == small, "cat gave other bytes"
            rows.append((name, f"cat {SMALL} ({len(small)} B)", *r, "< 1 MiB", r[1] < 1 << 20))
            r = measure(server, name, lambda: cimfs("ls", url, env=env))
            rows.append((name, "ls /", *r, "", None))
            r = measure(server, name, lambda: cimfs("stat", url, "pad/big.bin", env=env))
            rows.append((name, "stat pad/big.bin", *r, "", None))
        local_dest = os.path.join(work, "x-local")
        remote_dest = os.path.join(work, "x-remote")
        shutil.rmtree(local_dest, ignore_errors=True)
        t0 = time.perf_counter()
        cimfs("extract", os.path.join(images, "layer.cim"), local_dest)
        local_time = time.perf_counter() - t0
        same = []
        for name, url, server, env in targets:
            if name.startswith("S3") and not s3_extract:
                continue
            shutil.rmtree(remote_dest, ignore_errors=True)
            r = measure(server, name, lambda: cimfs("extract", url, remote_dest, env=env))
            same.append(
                subprocess.run(["diff", "-r", "-q", local_dest, remote_dest], capture_output=True).returncode == 0
            )
            rows.append((name, "extract (whole image)", *r, f"<= 1.05 x {total} B", r[1] <= 1.05 * total))
        for d in (local_dest, remote_dest):
            shutil.rmtree(d, ignore_errors=True)
    print()
    print("| storage | command | requests | bytes transferred | wall | target | met |")
    print("|---|---|---:|---:|---:|---|---|")
    for name, what, requests, nbytes, wall, target, ok in rows:
        ratio = f" ({nbytes / total:.4f} x stored)" if what.startswith("extract") else ""
        met = "" if ok is None else ("yes" if ok else "NO")
        print(f"| {name} | {what} | {requests} | {nbytes:,}{ratio} | {wall:.2f} s | {target} | {met} |")
    print()
    print(f"extract: local {local_time:.2f} s; remote trees identical to the local extract: {all(same)}")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
