#!/usr/bin/env python3
"""Image workload: a 3-layer Windows container image (OCI layout, gzip layers,
~1 GB of gzip by default) imported three ways, alternating, same run:

  A  cimfs import-image LAYOUT STORE --jobs 2     (verified, one CIM per layer)
  B  skopeo copy oci:LAYOUT dir:D + tar -xzf of each layer into one directory
     (what a user would otherwise do to unpack an image by hand)
  C  cimfs create of the layer blobs one by one (each a fork of the one below)

    python bench/image.py                    # ~1 GB gzip, 3 alternating runs, writes bench/IMAGE-RESULTS.md
    python bench/image.py --scale 0.1        # ~100 MB
    python bench/image.py --runs 5 --work-dir /var/tmp/x

The layers hold files of 4 KiB - 8 MiB whose bytes are 60 % random and 40 %
repeated text (gzip keeps ~62 %), with hcsshim's PAX records (fileattr, times).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(ROOT, "src")
LAYER_SHARES = (0.6, 0.3, 0.1)  # of the uncompressed bytes
TEXT = b"The quick brown fox jumps over the lazy dog; C:\\Windows\\System32\\config\\SYSTEM 0123456789\r\n" * 64


def _file_bytes(rng: random.Random, size: int) -> bytes:
    rand = rng.randbytes(size * 6 // 10)
    text = (TEXT * (size // len(TEXT) + 1))[: size - len(rand)]
    return rand + text


def _layer(path: str, index: int, total: int, rng: random.Random) -> tuple[str, int]:
    """One gzip layer tar of about ``total`` uncompressed bytes; returns (digest, uncompressed size)."""
    raw = hashlib.sha256()
    blob = hashlib.sha256()
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    tmp = path + ".tmp"
    size = 0

    class Sink:
        def write(self, b):
            nonlocal size
            raw.update(b)
            size += len(b)
            c = comp.compress(b)
            blob.update(c)
            f.write(c)
            return len(b)

    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=Sink(), mode="w|", format=tarfile.PAX_FORMAT) as tf:

            def add_dir(name):
                ti = tarfile.TarInfo(name)
                ti.type = tarfile.DIRTYPE
                ti.pax_headers = {"MSWINDOWS.fileattr": "16", "mtime": "1700000000.0"}
                tf.addfile(ti)

            add_dir("Files")
            if index == 0:
                add_dir("Files/Windows")
                add_dir("Files/Windows/System32")
                add_dir("Files/Windows/System32/config")
                for h in ("SYSTEM", "SOFTWARE", "SAM", "SECURITY", "DEFAULT"):
                    data = _file_bytes(rng, 256 << 10)
                    ti = tarfile.TarInfo(f"Files/Windows/System32/config/{h}")
                    ti.size = len(data)
                    ti.pax_headers = {"MSWINDOWS.fileattr": "32", "mtime": "1700000000.0"}
                    tf.addfile(ti, io.BytesIO(data))
            done, n = 0, 0
            while done < total:
                d = f"Files/layer{index}/d{n // 200:04d}"
                if n % 200 == 0:
                    if n == 0:
                        add_dir(f"Files/layer{index}")
                    add_dir(d)
                fsize = min(int(rng.paretovariate(1.2) * 16384), 8 << 20)
                data = _file_bytes(rng, fsize)
                ti = tarfile.TarInfo(f"{d}/f{n:06d}.bin")
                ti.size = len(data)
                ti.pax_headers = {"MSWINDOWS.fileattr": "32", "mtime": "1700000000.5"}
                tf.addfile(ti, io.BytesIO(data))
                done += fsize
                n += 1
        tail = comp.flush()
        blob.update(tail)
        f.write(tail)
    digest = "sha256:" + blob.hexdigest()
    os.replace(tmp, os.path.join(os.path.dirname(path), digest[7:]))
    return digest, "sha256:" + raw.hexdigest(), os.path.getsize(os.path.join(os.path.dirname(path), digest[7:]))


def write_oci_image(layout: str, layers: list[dict], diff_ids: list[str]) -> None:
    """The config, manifest, index.json and oci-layout of a Windows image whose
    layer blobs (``layers``: descriptors) are already in ``layout``'s blobs."""
    blobs = os.path.join(layout, "blobs", "sha256")

    def put(obj) -> dict:
        data = json.dumps(obj).encode()
        d = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, d), "wb") as f:
            f.write(data)
        return {"digest": "sha256:" + d, "size": len(data)}

    config = put(
        {
            "architecture": "amd64",
            "os": "windows",
            "created": "2024-01-01T00:00:00Z",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    )
    manifest = put(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
            "layers": layers,
        }
    )
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(
            {
                "schemaVersion": 2,
                "manifests": [
                    dict(
                        manifest,
                        mediaType="application/vnd.oci.image.manifest.v1+json",
                        annotations={"org.opencontainers.image.ref.name": "bench"},
                    )
                ],
            },
            f,
        )
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


def make_layout(layout: str, scale: float, log) -> dict:
    stamp = os.path.join(layout, ".params")
    params = {"scale": scale, "version": 1}
    if os.path.exists(stamp) and json.load(open(stamp)) == params:
        return json.load(open(os.path.join(layout, ".info")))
    shutil.rmtree(layout, ignore_errors=True)
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    rng = random.Random(14)
    total = int(scale * (1 << 30) / 0.62)  # uncompressed bytes for ~scale GiB of gzip
    layers, diff_ids = [], []
    for i, share in enumerate(LAYER_SHARES):
        t0 = time.monotonic()
        digest, diff_id, size = _layer(os.path.join(blobs, f"layer{i}"), i, int(total * share), rng)
        log(f"  layer {i}: {size / 2**20:.0f} MiB gzip ({time.monotonic() - t0:.0f} s)")
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size})
        diff_ids.append(diff_id)

    write_oci_image(layout, layers, diff_ids)
    info = {"layers": layers, "gzip_bytes": sum(x["size"] for x in layers)}
    json.dump(info, open(os.path.join(layout, ".info"), "w"))
    json.dump(params, open(stamp, "w"))
    return info


def warm(path: str) -> None:
    """Every contender starts with the inputs in the page cache: read them once."""
    for root, _d, files in os.walk(path):
        for n in files:
            with open(os.path.join(root, n), "rb") as f:
                while f.read(1 << 22):
                    pass


def timed(cmds: list[list[str]], env) -> float:
    t0 = time.monotonic()
    for c in cmds:
        subprocess.run(c, check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["sync"], check=True)
    return time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="GiB of gzip (default 1.0)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work-dir", default=os.path.join(HERE, "work", "image"))
    ap.add_argument("--out", default=os.path.join(HERE, "IMAGE-RESULTS.md"))
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    os.makedirs(args.work_dir, exist_ok=True)
    layout = os.path.join(args.work_dir, "layout")
    log(f"generating the layout ({args.scale} GiB gzip) ...")
    info = make_layout(layout, args.scale, log)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cimfs = [sys.executable, "-m", "cimfs.cli"]
    scratch = os.path.join(args.work_dir, "scratch")
    blobs = os.path.join(layout, "blobs", "sha256")

    def a_import():
        return [cimfs + ["import-image", layout, os.path.join(scratch, "store"), "--jobs", str(args.jobs)]]

    def b_by_hand():
        d, rootfs = os.path.join(scratch, "dir"), os.path.join(scratch, "rootfs")
        os.makedirs(rootfs)
        return [["skopeo", "--insecure-policy", "copy", "-q", f"oci:{layout}", f"dir:{d}"]] + [
            ["tar", "--warning=no-unknown-keyword", "-xzf", os.path.join(d, x["digest"][7:]), "-C", rootfs]
            for x in info["layers"]
        ]

    def c_create():
        cmds, parent = [], None
        for i, x in enumerate(info["layers"]):
            c = cimfs + [
                "create",
                os.path.join(blobs, x["digest"][7:]),
                os.path.join(scratch, f"l{i}.cim"),
                "--format",
                "windows-layer",
            ]
            if parent:
                c += ["--fork-from", parent]
            cmds.append(c)
            parent = os.path.join(scratch, f"l{i}.cim")
        return cmds

    contenders = [
        ("cimfs import-image --jobs %d" % args.jobs, a_import),
        ("skopeo copy + tar -xzf (by hand)", b_by_hand),
        ("cimfs create per layer", c_create),
    ]
    times: dict[str, list[float]] = {n: [] for n, _ in contenders}
    for r in range(args.runs):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for name, make in order:
            shutil.rmtree(scratch, ignore_errors=True)
            os.makedirs(scratch)
            warm(layout)
            t = timed(make(), env)
            times[name].append(t)
            log(f"run {r + 1}: {name}: {t:.2f} s")
    shutil.rmtree(scratch, ignore_errors=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    a, b, c = (n for n, _ in contenders)
    ratio_b = statistics.median(x / y for x, y in zip(times[a], times[b]))
    ratio_c = statistics.median(x / y for x, y in zip(times[a], times[c]))
    load = os.getloadavg()
    commit = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    sizes = ", ".join("%.0f" % (x["size"] / 2**20) for x in info["layers"])
    lines = [
        "# Image import benchmark (bench/image.py)",
        "",
        f"- measured {_dt.datetime.now().isoformat(timespec='seconds')} at commit {commit}; "
        f"{os.cpu_count()} cores; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(other work was running on the machine)",
        f"- workload: 3 gzip layers, {info['gzip_bytes'] / 2**20:.0f} MiB of gzip ({sizes} MiB), scale {args.scale}",
        f"- {args.runs} runs, contenders alternating (A B C, C B A, ...); inputs read once before each run; "
        "each time includes a final `sync`",
        "",
        "| contender | median | runs |",
        "|---|---:|---|",
    ]
    for n, _ in contenders:
        lines.append(f"| {n} | {med[n]:.2f} s | {', '.join(f'{x:.2f}' for x in times[n])} |")
    lines += [
        "",
        f"- import / by hand (median of per-run ratios): **{ratio_b:.2f}** (target ≤ 1.0)",
        f"- import / cimfs create per layer: **{ratio_c:.2f}**",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(
            {
                "times": times,
                "median": med,
                "ratio_vs_by_hand": ratio_b,
                "ratio_vs_create": ratio_c,
                "commit": commit,
                "load": load,
                "gzip_bytes": info["gzip_bytes"],
                "scale": args.scale,
            },
            f,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
